"""The GLM-4 production path on CPU, with a tiny random GLM-4-shaped model (tests/tiny_glm.py):
loading through modelload, GLM-4's template and stop ids, chat and book search through the kernel,
and the engine ending a turn on GLM-4's end-of-turn tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_glm
from chatglm4 import book_task
from chatglm4.engine import modelload
from chatglm4 import config as cfg
from chatglm4.engine.scheduler import LocalEngine
from chatglm4.engine.modelload import LoadedModel, ModelLoadError
from chatglm4.protocol import ChatCompletionRequest
from chatglm4.engine.sampling import SamplingParams

BOOKS = [{"id": 3, "title": "线性代数：从基础到前沿"}, {"id": 7, "title": "法语入门：从字母到会话"},
         {"id": 12, "title": "微积分入门：函数、极限与导数"}, {"id": 20, "title": "Python 编程：从入门到实践"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_glm.build(tmp_path_factory.mktemp("tiny") / "glm-4-tiny-chat-hf")


@pytest.fixture(scope="module")
def loaded(folder) -> LoadedModel:
    return modelload.load(str(folder))


@pytest.fixture(scope="module")
def kernel(folder):
    from LLMapis import load_kernel

    kernel = load_kernel(cfg.ModelServerConfig(model=str(folder), default_temperature=0.0, default_max_tokens=8))
    yield kernel
    kernel.engine.shutdown()


def token_id(loaded: LoadedModel, token: str) -> int:
    return loaded.tokenizer.convert_tokens_to_ids(token)


def test_load_reads_the_glm_folder(loaded, folder):
    assert type(loaded.model).__name__ == "GlmForCausalLM"
    assert loaded.model.config.model_type == "glm"
    assert loaded.name == folder.name
    assert loaded.context_length == 2048  # max_position_embeddings
    assert str(loaded.input_device) == "cpu"
    # All three end-of-turn tokens, not only the tokenizer's eos (<|endoftext|>).
    ends = {token_id(loaded, t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert ends <= set(loaded.stop_token_ids)
    assert loaded.tokenizer.eos_token == "<|endoftext|>"


def test_template_renders_like_glm4(loaded):
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}]
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "[gMASK]<sop><|system|>\n你是助手<|user|>\n你好<|assistant|>"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    # The role markers are single special tokens, as in GLM-4, not spelled out in bytes.
    for marker in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"):
        assert token_id(loaded, marker) in ids
    assert ids[-1] == token_id(loaded, "<|assistant|>")


def test_original_glm4_release_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    with pytest.raises(ModelLoadError, match=r"glm-4-9b-chat-hf"):
        modelload.load(str(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": "3bit"}, "choose int8 or int4"),
    ({"gpus": "0,x"}, "not a GPU index"),
])
def test_bad_quantize_and_gpus_are_refused_before_loading(folder, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        modelload.load(str(folder), **kwargs)


def test_gpus_restrict_placement_through_max_memory():
    # accelerate places weights only on devices max_memory names: GPU 0 is left out, CPU offload
    # stays where the operator put it.
    assert modelload._gpu_memory_budget([1], {0: "10GiB", 1: "20GiB", "cpu": "0"}, visible=2) == \
        {1: "20GiB", "cpu": "0"}
    with pytest.raises(ModelLoadError, match="only 2 GPU"):
        modelload._gpu_memory_budget([2], {2: "20GiB"}, visible=2)


def test_gpus_without_a_gpu_say_what_is_missing(folder):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only answer")
    with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
        modelload.load(str(folder), gpus="0")


@pytest.mark.parametrize("quantize, kernel", [("int8", "_weight_int8pack_mm"), ("4bit", "_weight_int4pack_mm_for_cpu")])
def test_int_weights_on_cpu_answer_the_same_alone_and_batched(folder, quantize, kernel):
    import torch
    from torch.profiler import profile

    loaded = modelload.load(str(folder), dtype="float32", quantize=quantize)
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    with profile() as prof, torch.inference_mode():
        loaded.model(input_ids=torch.tensor([ids]))
    assert any(kernel in e.key for e in prof.key_averages())  # the integer kernel ran, not a float matmul
    engine = LocalEngine(loaded, prefix_cache_tokens=0)
    try:
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        alone = engine.generate(ids, params).collect().text
        together = [engine.generate(ids, params) for _ in range(3)]
        assert [s.collect().text for s in together] == [alone] * 3
    finally:
        engine.shutdown()


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_glm_attention_fused_computes_what_it_did_apart(folder, quantize):
    """GLM's q, k and v (with their biases) as one product: the same logits, bit for bit."""
    import torch

    from chatglm4.engine.fusion import FusedAttention

    fused = modelload.load(str(folder), dtype="float32", quantize=quantize)
    apart = modelload.load(str(folder), dtype="float32", quantize=quantize, fuse=False)
    assert isinstance(fused.model.model.layers[0].self_attn, FusedAttention)
    qkv = fused.model.model.layers[0].self_attn.qkv_proj
    assert qkv.bias is not None  # GLM has attention biases
    if quantize:  # torchao quantized it, and its kernel is called without torchao's tensor subclass
        assert type(qkv).__name__ == "_Int4Linear"
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    with torch.inference_mode():
        assert torch.equal(fused.model(input_ids=ids).logits, apart.model(input_ids=ids).logits)


def test_chat_through_the_kernel(kernel):
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "你好"}], max_tokens=8)
    prompt = kernel.engine.encode_chat([{"role": "user", "content": "你好"}])
    result = kernel.chat(request).collect()
    assert result.finish_reason in ("stop", "length")
    assert 1 <= result.completion_tokens <= 8
    assert result.prompt_tokens == len(prompt)
    assert isinstance(result.text, str)


def test_book_search_through_the_kernel(kernel):
    answer = kernel.run_task("book_search", {"query": "线性代数", "books": BOOKS})
    assert set(answer["ids"]) <= {b["id"] for b in BOOKS}
    assert answer["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_constrained_output_is_valid_json_even_when_sampling(kernel, seed):
    engine = kernel.engine
    ids = [b["id"] for b in BOOKS]
    grammar = engine.compile_json_schema(book_task.ids_schema(ids))
    prompt = engine.encode_chat([{"role": "user", "content": "找书"}])
    # temperature 1.5: a random model sampling hot is the worst case the grammar must hold against
    result = engine.generate(prompt, SamplingParams(max_tokens=book_task.max_answer_tokens(ids), temperature=1.5,
                                                    seed=seed, grammar=grammar)).collect()
    assert result.finish_reason == "stop", result
    value = json.loads(result.text)
    assert list(value) == ["ids"] and set(value["ids"]) <= set(ids)
    assert len(value["ids"]) == len(set(value["ids"]))


@pytest.fixture(scope="module")
def forcing_engine(folder, loaded):
    """An engine over a copy of the model whose output layer always prefers one token, set per test."""
    import torch

    model = modelload.load(str(folder)).model  # a copy of its own (packed weights cannot be deep-copied)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, dtype=model.dtype)
    head.weight.data.zero_()
    head.bias.data.zero_()
    model.lm_head = head
    forced = LoadedModel(model=model, tokenizer=loaded.tokenizer, name="forced", context_length=256,
                         stop_token_ids=modelload.stop_token_ids(model, loaded.tokenizer),
                         input_device=loaded.input_device)
    engine = LocalEngine(forced)

    def force(token: str) -> LocalEngine:
        head.bias.data.zero_()
        head.bias.data[loaded.tokenizer.convert_tokens_to_ids(token)] = 10.0
        return engine

    yield force
    engine.shutdown()


@pytest.mark.parametrize("token", ["<|user|>", "<|observation|>", "<|endoftext|>"])
def test_engine_ends_the_turn_on_each_glm4_end_token(forcing_engine, token):
    engine = forcing_engine(token)
    prompt = engine.encode_chat([{"role": "user", "content": "你好"}])
    result = engine.generate(prompt, SamplingParams(max_tokens=16)).collect()
    assert (result.finish_reason, result.completion_tokens, result.text) == ("stop", 1, "")
    # The same model told to ignore end-of-turn runs on: the stop came from the stop-id list.
    result = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True)).collect()
    assert (result.finish_reason, result.completion_tokens) == ("length", 16)


def test_other_special_tokens_do_not_end_the_turn(forcing_engine):
    engine = forcing_engine("<|assistant|>")
    prompt = engine.encode_chat([{"role": "user", "content": "你好"}])
    result = engine.generate(prompt, SamplingParams(max_tokens=6)).collect()
    assert (result.finish_reason, result.completion_tokens) == ("length", 6)


def test_glm_reply_loses_its_leading_newline(forcing_engine, loaded):
    assert loaded.strip_leading_newline  # set for model_type glm
    newline = loaded.tokenizer.convert_tokens_to_ids(loaded.tokenizer.tokenize("\n"))[0]
    engine = forcing_engine(loaded.tokenizer.convert_ids_to_tokens(newline))
    prompt = engine.encode_chat([{"role": "user", "content": "你好"}])
    try:
        engine.loaded.strip_leading_newline = True
        assert engine.generate(prompt, SamplingParams(max_tokens=4)).collect().text == ""
        engine.loaded.strip_leading_newline = False
        assert engine.generate(prompt, SamplingParams(max_tokens=4)).collect().text == "\n" * 4
    finally:
        engine.loaded.strip_leading_newline = False


FORECAST = {"type": "function", "function": {
    "name": "get_forecast", "description": "天气预报",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "tomorrow": {"type": "boolean"}},
                   "required": ["unit", "tomorrow"], "additionalProperties": False}}}


def test_glm4_tool_call_in_its_own_format_streamed_through_the_model_server(kernel, serve):
    from openai import OpenAI

    from chatglm4 import toolcalls

    assert kernel.engine.tool_dialect == "glm4"
    # GLM-4's template lists the tool in its system turn; a call and its result render as GLM-4's
    # assistant-with-metadata and observation turns.
    history = [{"role": "user", "content": "明天北京天气？"},
               {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_forecast", "arguments": '{"unit":"c","tomorrow":true}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "晴，25度"}]
    listed = [FORECAST]
    ids = kernel.engine.encode_chat(toolcalls.with_tools(toolcalls.prompt_messages(history, None, toolcalls.GLM4),
                                                         listed), tools=listed)
    text = kernel.engine.tokenizer.decode(ids)
    assert "# 可用工具" in text and "## get_forecast" in text and '"name": "get_forecast"' in text
    assert text.endswith('<|assistant|>get_forecast\n{"unit":"c","tomorrow":true}<|observation|>\n晴，25度<|assistant|>')

    # The random model can only write a call the grammar allows: a streamed call through the real
    # model server, read with the OpenAI SDK.
    server = serve.model_server(kernel, name="glm-4-tiny")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="glm-4-tiny", messages=history[:1], tools=listed, stream=True, max_tokens=160,
        tool_choice={"type": "function", "function": {"name": "get_forecast"}})
    name, arguments, finish = None, "", None
    for chunk in stream:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert (name, finish) == ("get_forecast", "tool_calls")
    value = json.loads(arguments)
    assert value["unit"] in ("c", "f") and isinstance(value["tomorrow"], bool) and len(value) == 2


def test_compiled_decode_answers_alone_as_batched_without_compiling_while_serving(folder):
    """COMPILE=on: the warm-up compiles every graph decode steps need, so serving compiles none (a
    compile there would fail the step); a request answers the same alone and beside others, and as
    the eager step answers it."""
    import torch

    loaded = modelload.load(str(folder), dtype="float32")
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # past two width boundaries of the cache
    eager = LocalEngine(loaded, prefix_cache_tokens=0)
    try:
        expected = eager.generate(ids, params).collect().text
    finally:
        eager.shutdown()
    engine = LocalEngine(loaded, prefix_cache_tokens=0, compile_decode=True)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        alone = engine.generate(ids, params).collect()
        together = [engine.generate(ids, params) for _ in range(3)]
        longer = engine.generate(ids + ids, SamplingParams(max_tokens=8, ignore_eos=True))
        answers = [s.collect() for s in together] + [longer.collect()]
        assert alone.finish_reason == "length" and alone.text == expected
        assert [a.text for a in answers[:3]] == [expected] * 3
        assert answers[3].finish_reason == "length"
    finally:
        torch.compiler.set_stance("default")
        engine.shutdown()
