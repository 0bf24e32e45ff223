"""The Anthropic Messages endpoint with the anthropic client: a message, a stream (events in order, the same
reply as the whole message), thinking enabled with a budget and disabled, a tool_use round trip, errors in
Anthropic's shape, ``x-api-key``."""

import base64
import json

import pytest
from test_server import PNG, Running

# In-process servers compile on the engine thread while the test thread compiles too; two full-suite runs
# segfaulted in XLA compilation after these tests, so they stay out of CI until that is understood:
# run them with `pytest -m slow tests/serve`.
pytestmark = pytest.mark.slow

anthropic = pytest.importorskip("anthropic")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "description": "Weather now.", "input_schema": WEATHER}]
OFF = {"type": "disabled"}
GREEDY = {"temperature": 0}  # the anthropic SDK (2.x) has no sampling parameters any more
ONE = {"type": "any", "disable_parallel_tool_use": True}


@pytest.fixture(scope="module")
def srv():
    s = Running()
    yield s
    s.close()


def client_of(srv, key="none"):
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def test_message_thinking_by_default(srv):
    reply = client_of(srv).messages.create(
        model="kimi-k2.5", max_tokens=12, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    )
    assert reply.role == "assistant" and reply.model == "kimi-k2.5" and reply.id.startswith("msg_")
    assert reply.content[0].type == "thinking" and reply.content[0].thinking
    assert reply.stop_reason in ("max_tokens", "end_turn") and reply.usage.output_tokens <= 12
    assert (
        reply.usage.input_tokens
        == srv.post(
            "/tokenize",
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
        ).json()["count"]
    )


def test_thinking_disabled_and_budget(srv):
    client = client_of(srv)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in it?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
                },
            ],
        }
    ]
    off = client.messages.create(model="kimi-k2.5", max_tokens=10, messages=messages, thinking=OFF)
    assert [b.type for b in off.content] == ["text"]
    budget = client.messages.create(
        model="kimi-k2.5",
        max_tokens=20,
        messages=messages,
        extra_body=GREEDY,
        thinking={"type": "enabled", "budget_tokens": 5},
    )
    kinds = [b.type for b in budget.content]
    assert kinds[0] == "thinking" and "text" in kinds  # the reasoning was closed at the budget, the answer went on
    assert budget.usage.output_tokens <= 20
    assert len(srv.tok.encode(budget.content[0].thinking)) <= 8  # 5 tokens (re-encoding may split differently)


def test_stream_events_and_final_message(srv):
    client = client_of(srv)
    kw = dict(
        model="kimi-k2.5",
        max_tokens=16,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Tell me."}],
        thinking={"type": "enabled", "budget_tokens": 6},
    )
    whole = client.messages.create(**kw)
    kinds = []
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            kinds.append(ev.type if ev.type != "content_block_delta" else ev.delta.type)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert {"content_block_start", "thinking_delta", "text_delta", "content_block_stop"} <= set(kinds)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_tool_use_round_trip(srv):
    client = client_of(srv)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(
        model="kimi-k2.5", max_tokens=80, messages=messages, tools=TOOLS, tool_choice=ONE, thinking=OFF
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)
    assert uses[0].id == "functions.get_weather:0"
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C"}]},
    ]
    second = client.messages.create(model="kimi-k2.5", max_tokens=10, messages=messages, tools=TOOLS, thinking=OFF)
    assert second.content and second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # history ids of any shape are rewritten before rendering (toolu_... here)
    messages[1]["content"][-1]["id"] = "toolu_01A"
    messages[2]["content"][0]["tool_use_id"] = "toolu_01A"
    again = client.messages.create(
        model="kimi-k2.5",
        max_tokens=60,
        messages=messages,
        tools=TOOLS,
        thinking=OFF,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert [b.id for b in again.content if b.type == "tool_use"][0] == "functions.get_weather:1"


def test_stream_tool_use(srv):
    client = client_of(srv)
    kw = dict(
        model="kimi-k2.5",
        max_tokens=80,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        tool_choice=ONE,
        thinking=OFF,
        extra_body=GREEDY,
    )
    with client.messages.stream(**kw) as stream:
        deltas = [
            ev.delta.partial_json
            for ev in stream
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert json.loads("".join(deltas)) == use.input and final.stop_reason == "tool_use"


def test_anthropic_errors(srv):
    def post(body):
        return srv.post("/v1/messages", {"model": "kimi-k2.5", **body})

    cases = [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@"}}
                        ],
                    }
                ],
            },
            400,
            "messages[0].content[0].source.data",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}],
                    }
                ],
            },
            400,
            "messages[0].content[0].source.url",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": base64.b64encode(b"nope").decode(),
                                },
                            }
                        ],
                    }
                ],
            },
            400,
            "messages[0].content[0].source",
        ),
        ({"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}},
            400,
            "tool_choice",
        ),
        ({"max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]}, 200, None),  # lowered to the cap
    ]
    for body, status, field in cases:
        response = post(body)
        assert response.status_code == status, (body, response.text)
        if status != 200:
            data = response.json()
            assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
            assert data["error"]["message"].startswith(field + ":"), data
    response = srv.post(
        "/v1/messages", {"model": "claude-9", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_x_api_key():
    s = Running(api_key="sekret")
    try:
        with pytest.raises(anthropic.AuthenticationError):
            client_of(s, "wrong").messages.create(
                model="kimi-k2.5", max_tokens=3, messages=[{"role": "user", "content": "x"}]
            )
        reply = client_of(s, "sekret").messages.create(
            model="kimi-k2.5", max_tokens=3, messages=[{"role": "user", "content": "x"}]
        )
        assert reply.usage.output_tokens <= 3
    finally:
        s.close()


def test_stop_sequences(srv):
    client = client_of(srv)
    kw = dict(
        model="kimi-k2.5", max_tokens=30, messages=[{"role": "user", "content": "Go."}], thinking=OFF, extra_body=GREEDY
    )
    free = client.messages.create(**kw).content[0].text
    stop = free[8:11]
    assert len(stop) == 3 and stop not in free[:8]
    cut = client.messages.create(stop_sequences=[stop], **kw)
    assert cut.content[0].text == free[: free.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
