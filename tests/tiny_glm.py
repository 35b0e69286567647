"""Builds a tiny GLM-4-shaped chat model folder for tests: the same architecture class as
glm-4-9b-chat-hf (`GlmForCausalLM`, model_type "glm"), random weights, and a small byte-level BPE
tokenizer carrying GLM-4's special tokens and chat template.

`build(path)` writes config.json, generation_config.json, model.safetensors and the tokenizer files
(a few hundred KB in all); nothing is downloaded. The weights are random, so the model's text is
noise; what it checks is the plumbing: loading, the template, stop ids, constrained decoding."""

from __future__ import annotations

from pathlib import Path

# GLM-4's own special tokens (glm-4-9b-chat-hf tokenizer_config.json), in its order. As in GLM-4
# they come after the BPE vocabulary, so their ids are the highest of the tokenizer.
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                  "<|user|>", "<|assistant|>", "<|observation|>")
# What GLM-4's generation_config.json lists as eos: the three end-of-turn tokens.
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

# GLM-4's chat template (glm-4-9b-chat), with its function-tool branch and without the branches of
# its built-in python/browser/cogview tools: "[gMASK]<sop>" once; a message carrying `tools` first
# puts them in a system turn ("# 可用工具", one "## name" section each with the function as JSON);
# then "<|role|>{metadata}\n" + content per message — an assistant tool call is role assistant with
# the function's name as metadata and its arguments as content, a tool's result role observation —
# and "<|assistant|>" to ask for a reply (a text reply then starts with "\n", a call with the name).
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %}"
    "{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "线性代数：从基础到前沿", "矩阵的魔力：线性代数的探索", "微积分入门：函数、极限与导数",
    "法语入门：从字母到会话", "Python 编程：从入门到实践", "深度学习与神经网络",
    "帮我找找有关函数求导的书", "我想学法语", "你好，请介绍一下你自己。", "今天天气怎么样？",
    "You are a library assistant. You choose, from a numbered catalogue, the books that match.",
    "Answer only with JSON of the form {\"ids\": [1, 2, 3]}; if no book matches, answer {\"ids\": []}.",
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog.",
    "id 1: \"Linear Algebra\"\nid 2: \"Calculus\"\nid 10: \"French for Beginners\"\nRequest: \"math\"",
    "0123456789 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
]


def build_tokenizer(vocab_size: int = 800):
    """A PreTrainedTokenizerFast: byte-level BPE trained on a few lines, plus GLM-4's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS
                                                                 if t != "<|endoftext|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 context: int = 2048):
    """A GlmConfig shaped like glm-4-9b-chat-hf's, scaled down."""
    from transformers import GlmConfig

    eos = [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS]
    # GLM-4 pads its embedding past the tokenizer (151552 rows for ~151343 tokens); so does this one,
    # which keeps the "logits wider than the tokenizer" path exercised.
    vocab = (len(tokenizer) + 63) // 64 * 64
    return GlmConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads, partial_rotary_factor=0.5, max_position_embeddings=context,
        rms_norm_eps=1.5625e-07, attention_bias=True, tie_word_embeddings=False,
        eos_token_id=eos, pad_token_id=eos[0],
    )


def build(path: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Writes the tiny model folder to `path` (created if missing) and returns it."""
    import torch
    from transformers import GenerationConfig, GlmForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, hidden_size=hidden_size, layers=layers)
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny-glm"))
