"""Guided decoding through the engine: forced tool calls and JSON schemas always parse and validate, on a random
tiny model that left alone writes neither."""

import json

import pytest

from k25jax.chat import parse_ids
from k25jax.sampling import Sampling
from k25jax.serve.engine import Engine
from k25jax.serve.guided import GuideError, json_guide, tool_call_guide
from k25jax.tokenizer import Tokenizer

import tiny_models

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get-weather.v2",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def setup():
    model = tiny_models.tiny_float32(seed=3)
    tok = Tokenizer.tiny()
    return model, tok, Engine(model, max_slots=4, max_context=512, decode_window=4, tokenizer=tok)


def _valid(args, schema):
    for key in schema["required"]:
        assert key in args
    assert set(args) <= set(schema["properties"])
    for key, value in args.items():
        spec = schema["properties"][key]
        if spec.get("type") == "integer":
            assert isinstance(value, int)
        if spec.get("type") == "string":
            assert isinstance(value, str) and len(value) <= spec.get("maxLength", 10**9)
        if "enum" in spec:
            assert value in spec["enum"]


@pytest.mark.parametrize("seed", range(3))
def test_forced_tool_calls_parse_and_validate(setup, seed):
    model, tok, engine = setup
    prompt = tok.encode("<|im_assistant|>assistant<|im_middle|><think></think>")
    sampling = Sampling(temperature=1.0, top_p=1.0, seed=seed)
    required = engine.submit(prompt, sampling, max_tokens=400, guide=tool_call_guide(tok, 1280, TOOLS, thinking=False))
    named = engine.submit(
        prompt, sampling, max_tokens=400, guide=tool_call_guide(tok, 1280, TOOLS, name="add", thinking=False)
    )
    engine.run()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for r, names in ((required, set(schemas)), (named, {"add"})):
        assert r.finish_reason == "stop" and r.tokens[-1] == tok.stop_ids[0], tok.decode(r.tokens)
        reply = parse_ids(r.tokens, tok, thinking=False)
        assert reply.tool_calls and not reply.errors, (tok.decode(r.tokens), reply.errors)
        for call in reply.tool_calls:
            assert call["function"]["name"] in names  # the dotted, hyphenated name kept whole
            _valid(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert len(named.tokens) > 0 and len(parse_ids(named.tokens, tok, thinking=False).tool_calls) == 1


def test_json_schema_after_free_reasoning(setup):
    """Thinking mode: free reasoning until ``</think>`` (forced here by a logit bias once), then the schema."""
    model, tok, engine = setup
    schema = TOOLS[1]["function"]["parameters"]
    prompt = tok.encode("<|im_assistant|>assistant<|im_middle|><think>")
    instant = engine.submit(
        tok.encode("<|im_assistant|>assistant<|im_middle|><think></think>"),
        Sampling(temperature=1.0, seed=3),
        max_tokens=200,
        guide=json_guide(tok, 1280, schema, thinking=False),
    )
    engine.run()
    body = tok.decode(instant.tokens[:-1])
    _valid(json.loads(body), schema)
    guide = json_guide(tok, 1280, None, thinking=True)
    end = tok.encode("</think>")
    thinking = engine.submit(prompt + tok.encode("ok") + end[:-1], Sampling(temperature=0.0, logit_bias={end[-1]: 100}),
                             max_tokens=300, guide=guide)  # fmt: skip
    engine.run()
    text = tok.decode(thinking.tokens)
    assert text.startswith(tok.decode(end[-1:])) and guide.open
    assert isinstance(json.loads(tok.decode(thinking.tokens[1:-1])), dict)


def test_bad_schema_and_tool_name_name_the_field(setup):
    _, tok, _ = setup
    with pytest.raises(GuideError, match="tool_choice.function.name: 'nope'"):
        tool_call_guide(tok, 1280, TOOLS, name="nope", thinking=False)
    with pytest.raises(GuideError, match="response_format.json_schema.schema"):
        json_guide(tok, 1280, {"type": "object", "properties": {"a": {"type": "no-such-type"}}}, thinking=False)


def test_tool_markers_are_forbidden_while_reasoning(setup):
    """Before ``</think>`` the guide allows every token but the tool-call markers (a call begun inside the
    thought would escape the grammar); after it, only what the grammar allows."""
    import numpy as np

    _, tok, _ = setup
    guide = tool_call_guide(tok, 1280, TOOLS, thinking=True)
    row = np.zeros(40, np.int32)
    guide.fill(row)
    banned = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:1280] == 0)
    markers = ["<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>"]
    assert banned.tolist() == sorted(tok.token_id(m) for m in markers)
    for t in tok.encode("fine</think>"):
        guide.advance(t)
    guide.fill(row)
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:1280])
    assert allowed.tolist() == [tok.token_id("<|tool_calls_section_begin|>")]
