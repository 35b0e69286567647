"""The OpenAI sampling parameters that are accepted must work: penalties, logit_bias, logprobs,
n > 1, and defaults from the model — through the official SDK against the real servers, with the
embedded model (greedy unless said otherwise, so every comparison is deterministic)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from chatglm4.engine import gendefaults

PROMPT = [{"role": "user", "content": "Write a long story about a robot."}]


@pytest.fixture(scope="module")
def client(model_server):
    return OpenAI(base_url=model_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reply(client, **kwargs):
    body = {"model": "m", "messages": PROMPT, "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    return client.chat.completions.create(**{**body, **kwargs})


def test_logprobs_describe_each_chosen_token(client):
    r = reply(client, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 40
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest, and the list is best first.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert reply(client).choices[0].logprobs is None     # not asked, not sent


def test_penalties_make_the_reply_repeat_less(client, kernel):
    tokenizer = kernel.engine.tokenizer

    def distinct(**kwargs) -> int:
        text = reply(client, max_tokens=60, **kwargs).choices[0].message.content
        return len(set(tokenizer(text, add_special_tokens=False)["input_ids"]))

    plain = distinct(extra_body={"ignore_eos": True, "repetition_penalty": 1.0})
    assert distinct(frequency_penalty=1.5, extra_body={"ignore_eos": True, "repetition_penalty": 1.0}) > plain
    assert distinct(presence_penalty=2.0, extra_body={"ignore_eos": True, "repetition_penalty": 1.0}) > plain
    assert distinct(extra_body={"ignore_eos": True, "repetition_penalty": 1.5}) > plain


def test_logit_bias_forces_and_forbids_tokens(client, kernel):
    tokenizer = kernel.engine.tokenizer
    forced = tokenizer(" robot", add_special_tokens=False)["input_ids"][0]
    r = reply(client, max_tokens=5, logit_bias={str(forced): 100}, logprobs=True)
    assert r.choices[0].message.content == tokenizer.decode([forced] * 5)
    first = reply(client, max_tokens=1).choices[0].message.content
    first_id = tokenizer(first, add_special_tokens=False)["input_ids"][0]
    assert reply(client, max_tokens=1, logit_bias={str(first_id): -100}).choices[0].message.content != first


def test_n_choices_are_generated_together(client):
    r = reply(client, n=3, max_tokens=12, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 36
    assert len({c.message.content for c in r.choices}) > 1        # seeds 7, 8, 9: different samples
    again = reply(client, n=3, max_tokens=12, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    greedy = reply(client, n=2, max_tokens=12)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content

    texts: dict[int, str] = {}
    finishes = {}
    for chunk in reply(client, n=2, max_tokens=12, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {0: greedy.choices[0].message.content, 1: greedy.choices[1].message.content}
    assert finishes == {0: "length", 1: "length"}


def test_defaults_come_from_the_model():
    from transformers import GenerationConfig

    class Model:
        generation_config = GenerationConfig(temperature=0.8, top_p=0.8, eos_token_id=[1, 2])

    assert gendefaults.from_model(Model(), embedded=False) == {"temperature": 0.8, "top_p": 0.8}
    assert gendefaults.from_model(object(), embedded=False) == {}
    assert gendefaults.from_model(Model(), embedded=True) == gendefaults.EMBEDDED


def test_the_embedded_models_first_reply_is_short_and_ends(kernel):
    from chatglm4.protocol import ChatCompletionRequest
    from LLMkernel import Kernel

    # The model server's own defaults (no DEFAULT_TEMPERATURE): a greeting gets a reply that ends,
    # not max_tokens of one repeated emoji.
    plain = Kernel(kernel.engine)
    assert plain.sampling_defaults() == gendefaults.EMBEDDED
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "你好"}], "seed": 1,
                                                    "max_tokens": 200})
    result = plain.chat(request).collect()
    assert result.finish_reason == "stop" and result.completion_tokens < 200
    assert len(set(result.text)) > 10
