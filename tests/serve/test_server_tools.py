"""Tool calls and structured output through the server with the openai client: a full tool round trip, forced
calls whose arguments validate against the schema in every sampled request (random weights), named calls, the
thinking budget before a forced call, ``tool_choice`` none, ``response_format``, stream vs whole reply."""

import asyncio
import json

import pytest
from test_server import Running, _collect_stream

# In-process servers compile on the engine thread while the test thread compiles too; two full-suite runs
# segfaulted in XLA compilation after these tests, so they stay out of CI until that is understood:
# run them with `pytest -m slow tests/serve`.
pytestmark = pytest.mark.slow

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": -99, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
INSTANT = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def srv():
    s = Running()
    yield s
    s.close()


def _check_calls(calls, names=None):
    assert calls
    for c in calls:
        name = c.function.name
        assert name in (names or SCHEMAS) and c.id.startswith(f"functions.{name}:"), c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[name])


def test_tool_call_round_trip(srv):
    client = srv.openai()
    messages = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Paris weather?"}]
    first = client.chat.completions.create(
        model="kimi-k2.5",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        extra_body=INSTANT,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    assert call.id.endswith(":0")  # IDX counted over the conversation: the first call
    messages.append(choice.message)  # the SDK object as is, as the openai docs do
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18C, clear"})
    second = client.chat.completions.create(
        model="kimi-k2.5", messages=messages, tools=TOOLS, max_tokens=20, extra_body=INSTANT
    )
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content
    prompt = srv.tok.decode(
        srv.post(
            "/tokenize",
            {
                "messages": json.loads(
                    json.dumps([m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages])
                ),
                "tools": TOOLS,
                **INSTANT,
            },
        ).json()["tokens"]
    )
    assert f"<|tool_call_begin|>{call.id}<|tool_call_argument_begin|>{call.function.arguments}" in prompt
    assert f"## Return of {call.id}\n18C, clear<|im_end|>" in prompt


def test_reply_call_ids_continue_the_history_count(srv):
    client = srv.openai()
    messages = [
        {"role": "user", "content": "Add 1 and 2."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc123", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "3"},
        {"role": "user", "content": "Now 3 and 4."},
    ]
    reply = client.chat.completions.create(
        model="kimi-k2.5",
        messages=messages,
        tools=TOOLS,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "add"}},
        extra_body=INSTANT,
    )
    _check_calls(reply.choices[0].message.tool_calls, {"add"})
    assert reply.choices[0].message.tool_calls[0].id == "functions.add:1"  # after the history's one call


def _required(srv, count: int, concurrency: int = 16):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i):
            async with gate:
                return await client.chat.completions.create(
                    model="kimi-k2.5",
                    messages=[{"role": "user", "content": f"Request {i}: weather or sum?"}],
                    tools=TOOLS,
                    tool_choice="required",
                    parallel_tool_calls=False,
                    max_tokens=100,
                    temperature=1.0,
                    top_p=1.0,
                    seed=i,
                    extra_body=INSTANT,
                )

        return await asyncio.gather(*(one(i) for i in range(count)))

    replies = asyncio.run(run())
    for r in replies:
        assert r.choices[0].finish_reason == "tool_calls", r
        _check_calls(r.choices[0].message.tool_calls)
    names = {r.choices[0].message.tool_calls[0].function.name for r in replies}
    return replies, names


def test_required_tool_calls_always_validate_200(srv):
    replies, names = _required(srv, 200)  # 6-15 s on 2 CPU cores
    assert len(replies) == 200 and names == {"get_weather", "add"}  # both tools get chosen


def test_parallel_calls_and_thinking_budget_before_a_forced_call(srv):
    client = srv.openai()
    reply = client.chat.completions.create(
        model="kimi-k2.5",
        messages=[{"role": "user", "content": "Paris and Rome?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        seed=1,  # random weights may write a section marker inside the reasoning: not this seed
        extra_body={"thinking": {"type": "enabled", "budget_tokens": 6}},
    )
    choice = reply.choices[0]
    assert choice.message.reasoning_content  # 6 tokens of reasoning, then </think> closed by the server
    assert reply.usage.completion_tokens_details.reasoning_tokens == 7  # ... and the </think> itself
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)


def test_forced_call_stream_equals_whole(srv):
    client = srv.openai()
    kw = dict(
        model="kimi-k2.5",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=100,
        temperature=0,
        extra_body=INSTANT,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    text, calls, finish, _ = _collect_stream(client.chat.completions.create(stream=True, **kw))
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        (c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert text["content"] == (whole.message.content or "")


def test_tool_choice_none_forbids_the_section(srv, monkeypatch):
    seen = []
    engine = srv.service.engine
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: seen.append(a[1]) or submit(*a, **k))
    reply = srv.openai().chat.completions.create(
        model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert not reply.choices[0].message.tool_calls
    assert seen[0].logit_bias == {srv.tok.token_id("<|tool_calls_section_begin|>"): -100.0}


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_response_format(srv, kind):
    fmt = (
        {"type": "json_object"}
        if kind == "json_object"
        else {"type": "json_schema", "json_schema": {"name": "sum", "schema": ADD}}
    )
    reply = srv.openai().chat.completions.create(
        model="kimi-k2.5",
        messages=[{"role": "user", "content": "JSON!"}],
        response_format=fmt,
        max_tokens=100,
        seed=0,
        extra_body=INSTANT,
    )
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if kind == "json_schema":  # bounded: always complete
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ADD)
    elif choice.finish_reason == "stop":  # any object: may run past max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
