"""Tool calls: the dialects' prompts, the grammar that keeps every call valid (on the real
tokenizer), reading calls out of whole and streamed replies, and the OpenAI SDK's tool flow against
the real servers with the embedded model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar as xgr
from openai import OpenAI

from chatglm4 import toolcalls
from chatglm4.protocol import ChatCompletionRequest, ToolSpec
from chatglm4.toolcalls import GLM4, TAGGED, ToolCallParser, split_reply, structural_tag

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}
TOOLS = [ToolSpec.model_validate(WEATHER), ToolSpec.model_validate(TIME)]
SCHEMAS = {t.function.name: t.function.parameters for t in TOOLS}


def call_text(dialect, name: str, arguments: str) -> str:
    return dialect.begin(name) + arguments + dialect.end


# ---------------------------------------------------------------- reading replies


@pytest.mark.parametrize("dialect", [GLM4, TAGGED])
def test_streamed_reply_splits_into_content_and_call_whatever_the_chunking(dialect):
    args = '{"city":"Paris","unit":"c"}'
    reply = ("Let me look. " if dialect is TAGGED else "") + call_text(dialect, "get_weather", args)
    for size in (1, 2, 5, len(reply)):
        parser = ToolCallParser(["get_weather", "get_time"], dialect)
        events = []
        for i in range(0, len(reply), size):
            events += parser.feed(reply[i:i + size])
        events += parser.finish()
        content = "".join(e.text for e in events if e.call is None)
        assert content == ("Let me look. " if dialect is TAGGED else "")
        [call] = parser.calls
        assert call.name == "get_weather" and call.closed and json.loads(call.arguments) == json.loads(args)
        # The call is announced once, then its arguments arrive in pieces that join to the whole.
        assert [e.starts for e in events if e.call].count(True) == 1
        assert "".join(e.text for e in events if e.call and not e.starts) == args


def test_text_that_only_looks_like_an_opening_stays_content():
    content, calls = split_reply("use get_weathe or <tool_ca", ["get_weather"], TAGGED)
    assert (content, calls) == ("use get_weathe or <tool_ca", [])
    content, calls = split_reply("\n你好，get_time", ["get_time"], GLM4)
    assert (content, calls) == ("\n你好，get_time", [])


def test_an_opening_cut_off_by_max_tokens_is_no_content():
    reply = call_text(TAGGED, "get_time", '{"zone":"UTC"}') + "\n" + TAGGED.begin("get_weather")[:20]
    assert split_reply(reply, ["get_weather", "get_time"], TAGGED, cut=True)[0].strip() == ""
    # Ended by the model, the same text is content: a reply may end in a look-alike.
    assert split_reply("see <tool_ca", ["get_weather"], TAGGED)[0] == "see <tool_ca"


def test_several_tagged_calls_and_a_cut_off_one():
    reply = call_text(TAGGED, "get_time", '{"zone":"UTC"}') + "\n" + TAGGED.begin("get_weather") + '{"city":"Oslo"' 
    content, calls = split_reply(reply, ["get_weather", "get_time"], TAGGED)
    assert [c.name for c in calls] == ["get_time", "get_weather"] and [c.index for c in calls] == [0, 1]
    assert calls[0].closed and not calls[1].closed           # max_tokens ended it mid-arguments
    assert toolcalls.finish_reason("length", calls) == "length"
    assert toolcalls.finish_reason("stop", calls[:1]) == "tool_calls"
    assert toolcalls.finish_reason("stop", []) == "stop"
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


# ---------------------------------------------------------------- prompts


def test_glm4_messages_use_metadata_and_observation():
    history = [{"role": "user", "content": "天气"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"北京"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "晴"}]
    out = toolcalls.prompt_messages(history, TOOLS, GLM4)
    assert out == [{"role": "user", "content": "天气"},
                   {"role": "assistant", "metadata": "get_weather", "content": '{"city":"北京"}'},
                   {"role": "observation", "content": "晴"}]
    listed = [t.model_dump(exclude_none=True) for t in TOOLS]
    assert toolcalls.with_tools(out, listed)[0]["tools"] == listed and "tools" not in out[0]


def test_tagged_prompt_lists_the_tools_from_the_template():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone":"UTC"}'}}]},
               {"role": "tool", "tool_call_id": "c", "content": "12:00"}]
    out = toolcalls.prompt_messages(history, TOOLS, TAGGED)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": call_text(TAGGED, "get_time", '{"zone":"UTC"}')}
    assert out[3] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}


# ---------------------------------------------------------------- the grammar, on the real tokenizer


@pytest.fixture(scope="module")
def grammars(kernel):
    return kernel.engine._grammars()


@pytest.mark.parametrize("dialect", [GLM4, TAGGED])
def test_grammar_admits_valid_calls_only(grammars, dialect):
    def accepts(choice, text, parallel=True):
        matcher = xgr.GrammarMatcher(grammars.compile_structural_tag(structural_tag(TOOLS, choice, parallel, dialect)))
        return matcher.accept_string(text) and matcher.accept_token(grammars.info.stop_token_ids[0])

    good = call_text(dialect, "get_weather", '{"city":"Paris","unit":"c"}')
    assert accepts("auto", good) and accepts("required", good) and accepts("auto", "Just text.")
    named = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, TIME],
                                                  "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert not accepts(named.tool_choice, good)                                    # only the named tool
    assert accepts(named.tool_choice, call_text(dialect, "get_time", '{"zone":"UTC"}'))
    assert not accepts("required", "Just text.")                                   # required: a call
    assert not accepts("auto", call_text(dialect, "get_weather", '{"city":"Paris"}'))         # missing unit
    assert not accepts("auto", call_text(dialect, "get_weather", '{"city":"Paris","unit":"k"}'))  # not in enum
    assert not accepts("auto", call_text(dialect, "get_weather", '{"city":"Paris","unit":"c","x":1}'))
    two = good + "\n" + call_text(dialect, "get_time", '{"zone":"UTC"}')
    assert accepts("required", two) == (dialect is TAGGED)       # GLM-4 makes one call a turn
    assert not accepts("required", two, parallel=False)


# ---------------------------------------------------------------- requests


@pytest.mark.parametrize("change, message", [
    ({"tool_choice": "required", "tools": None}, "tool_choice needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [WEATHER, WEATHER]}, "distinct"),
    ({"response_format": {"type": "json_object"}}, "either tools or a JSON response_format"),
])
def test_contradicting_tools_are_named(change, message):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **change}
    request = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    assert message in request.tool_problem()


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "critic", "content": "x"}], "role"),
])
def test_malformed_messages_are_refused(messages, message):
    with pytest.raises(ValueError, match=message):
        ChatCompletionRequest.model_validate({"messages": messages}, strict=True)


def test_bad_function_names_are_refused():
    with pytest.raises(ValueError, match="pattern"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "bad name!"}}]})


# ---------------------------------------------------------------- the OpenAI SDK, real servers


@pytest.fixture(scope="module")
def client(gateway):
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_call(call) -> dict:
    """A returned call is one of the offered functions and its arguments validate."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_sdk_tool_flow_call_result_answer(client):
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    # One call: left free, the embedded model goes on calling until max_tokens.
    first = client.chat.completions.create(model="chatglm4", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    calls = choice.message.tool_calls
    for call in calls:
        check_call(call)
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"})
    answer = client.chat.completions.create(model="chatglm4", messages=messages, tools=[WEATHER, TIME],
                                            tool_choice="none", temperature=0, max_tokens=32)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")
    alone = client.chat.completions.create(model="chatglm4", messages=messages[:1], tools=[WEATHER, TIME],
                                           tool_choice="none", max_tokens=1)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the call and its result reached the prompt


def test_sdk_streamed_named_tool_call(client):
    stream = client.chat.completions.create(
        model="chatglm4", messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=48, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = (piece.function and piece.function.name) or call["name"]
            call["arguments"] += (piece.function and piece.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["name"] == "get_time" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_time"])


def test_parallel_calls_cut_off_by_max_tokens_return_only_whole_calls(client):
    reply = client.chat.completions.create(
        model="chatglm4", messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=40)
    choice = reply.choices[0]
    for call in choice.message.tool_calls or []:
        check_call(call)
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls


def test_auto_either_answers_or_calls_validly(client):
    for prompt in ("Say hello.", "Weather in Rome in c, please, via get_weather."):
        reply = client.chat.completions.create(model="chatglm4", messages=[{"role": "user", "content": prompt}],
                                               tools=[WEATHER], temperature=0, max_tokens=48)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                for call in choice.message.tool_calls:
                    check_call(call)
        else:
            assert choice.message.content


def test_tool_errors_are_4xx_through_the_gateway(gateway):
    import requests

    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "("}}}}}
    r = requests.post(gateway.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "tools": [bad_schema], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json_schema"
    r = requests.post(gateway.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tools"
    r = requests.post(gateway.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "tool", "content": "sunny"}]})
    assert r.status_code == 422 and "tool_call_id" in r.json()["error"]["message"]


# ---------------------------------------------------------------- /v1/completions


def test_sdk_text_completions_whole_streamed_and_several_prompts(client):
    whole = client.completions.create(model="chatglm4", prompt="The capital of France is", max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    text = whole.choices[0].text
    assert text and whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6

    pieces, finish = [], None
    for chunk in client.completions.create(model="chatglm4", prompt="The capital of France is", max_tokens=6,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == "length"   # greedy: the same text either way

    both = client.completions.create(model="chatglm4", prompt=["The capital of France is", "1, 2, 3,"],
                                     max_tokens=6, temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == "The capital of France is" + text   # batched with another: unchanged
    assert both.choices[1].text.startswith("1, 2, 3,") and both.usage.completion_tokens == 12
    # n per prompt: choice i continues prompt i // n, and echoes it.
    twice = client.completions.create(model="chatglm4", prompt=["The capital of France is", "1, 2, 3,"], n=2,
                                      max_tokens=2, temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert [c.text.startswith("1, 2, 3,") for c in twice.choices] == [False, False, True, True]


def test_text_completion_errors(gateway):
    import requests

    r = requests.post(gateway.url + "/v1/completions", json={"prompt": ""}, timeout=30)
    assert r.status_code == 422
    r = requests.post(gateway.url + "/v1/completions", json={"prompt": "x" * 20000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
