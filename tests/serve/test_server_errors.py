"""Bad requests against the server: each gets a 4xx in OpenAI's shape naming the field at fault (27 cases), 401
without the API key, 503 with Retry-After when the queue is full."""

import base64
import contextlib
import time

import httpx
import pytest
from test_server import CONTEXT, SLOTS, Running

# In-process servers compile on the engine thread while the test thread compiles too; two full-suite runs
# segfaulted in XLA compilation after these tests, so they stay out of CI until that is understood:
# run them with `pytest -m slow tests/serve`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv():
    s = Running()
    yield s
    s.close()


USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _video(url):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]


def _image(url):
    return [
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


BAD = [
    ("unknown model", {"model": "gpt-4", "messages": USER}, 404, "model"),
    ("no messages", {"model": "kimi-k2.5"}, 400, "messages"),
    ("empty messages", {"model": "kimi-k2.5", "messages": []}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (
        "unknown part",
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        "messages[0].content[0].type",
    ),
    (
        "part without url",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
        400,
        "messages[0].content[1].image_url",
    ),
    ("bad base64", {"messages": _image("data:image/png;base64,@@@")}, 400, "messages[0].content[1].image_url"),
    (
        "not an image",
        {"messages": _image("data:image/png;base64," + base64.b64encode(b"hello").decode())},
        400,
        "messages[0].content[1].image_url",
    ),
    ("remote url", {"messages": _image("https://example.com/cat.png")}, 400, "messages[0].content[1].image_url"),
    (
        "not a video",
        {"messages": _video("data:video/mp4;base64," + base64.b64encode(b"not a video").decode())},
        400,
        "messages[0].content[0].video_url",
    ),
    ("temperature", {"messages": USER, "temperature": 3}, 400, "temperature"),
    ("top_p", {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("max_tokens", {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("n", {"messages": USER, "n": 0}, 400, "n"),
    ("stop type", {"messages": USER, "stop": 5}, 400, "stop"),
    ("logit_bias key", {"messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias.abc"),
    ("logit_bias value", {"messages": USER, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("top_logprobs", {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("required without tools", {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (
        "unknown named tool",
        {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
        400,
        "tool_choice.function.name",
    ),
    (
        "tool without name",
        {"messages": USER, "tools": [{"type": "function", "function": {}}]},
        400,
        "tools[0].function.name",
    ),
    (
        "json_schema without schema",
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {}}},
        400,
        "response_format.json_schema.schema",
    ),
    ("thinking type", {"messages": USER, "thinking": {"type": "maybe"}}, 400, "thinking.type"),
    (
        "template kwarg",
        {"messages": USER, "chat_template_kwargs": {"thinking": "no"}},
        400,
        "chat_template_kwargs.thinking",
    ),
    (
        "call without function",
        {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "a"}]}]},
        400,
        "messages[1].tool_calls[0].function",
    ),
    (
        "over the context",
        {"messages": [{"role": "user", "content": "word " * 470}], "max_tokens": 100},
        400,
        "max_tokens",
    ),
    ("prompt over the context", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_naming_the_field(srv, name, body, status, param):
    response = srv.post("/v1/chat/completions", {"model": "kimi-k2.5", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["message"]
    if name == "over the context":
        count = srv.post("/tokenize", {"messages": body["messages"]}).json()["count"]
        assert str(CONTEXT) in error["message"] and str(count) in error["message"] and "100" in error["message"]


def test_other_bad_requests(srv):
    response = srv.post(
        "/v1/chat/completions", None, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["message"]
    response = srv.post("/v1/completions", {"model": "kimi-k2.5", "prompt": [5, 99999]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.get(srv.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_api_key_required():
    s = Running(api_key="sekret")
    try:
        import openai

        with pytest.raises(openai.AuthenticationError):
            s.openai(api_key="wrong").models.list()
        response = httpx.get(s.url + "/v1/models")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert s.openai(api_key="sekret").models.list().data[0].id == "kimi-k2.5"
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
        response = s.post("/v1/messages", {"model": "kimi-k2.5", "max_tokens": 5, "messages": USER})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    finally:
        s.close()


def test_queue_full_gives_503_with_retry_after(srv, monkeypatch):
    monkeypatch.setattr(srv.service, "max_tokens_cap", None)
    monkeypatch.setattr(srv.service, "max_queue", 1)
    engine = srv.service.engine
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Go."}], "max_tokens": 800, "stream": True}
    with httpx.Client(timeout=30) as client, contextlib.ExitStack() as stack:
        for k in range(SLOTS + 1):  # every slot busy, one waiting
            response = stack.enter_context(client.stream("POST", srv.url + "/v1/chat/completions", json=body))
            assert response.status_code == 200
            end = time.time() + 20
            while k < SLOTS and engine.waiting and time.time() < end:  # admitted before the next comes
                time.sleep(0.005)
        assert len(engine.waiting) == 1 and all(engine.slots)
        refused = client.post(srv.url + "/v1/chat/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    assert srv.wait_idle(10.0)
