"""Reply parsing for serving (k25jax.serve.reply): streamed deltas, the final message, and agreement with
k25jax.chat.parse, on the parser bug classes the field ships (serving.md): cut calls, calls before </think>,
dotted and hyphenated names, multi-line and large arguments, several sections, stray markers, markers split
across stream chunks, instant output labelled reasoning."""

import json
import random

import pytest

from k25jax.chat import (
    CALL_ARGS,
    CALL_BEGIN,
    CALL_END,
    END_THINK,
    IM_END,
    SECTION_BEGIN,
    SECTION_END,
    THINK,
    ReplyParser,
    parse,
)
from k25jax.chat_reply import parse_ids
from k25jax.serve.reply import ReplyStream, parse_reply
from k25jax.tokenizer import Tokenizer

TOK = Tokenizer.tiny()
MARKERS = (THINK, END_THINK, SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARGS, CALL_END, IM_END, "[EOS]")


def call(call_id: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{call_id}{CALL_ARGS}{arguments}{CALL_END}"


def section(*calls: str) -> str:
    return SECTION_BEGIN + "".join(calls) + SECTION_END


def openai_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def run(ids, *, thinking: bool, finish_reason: str = "stop", chunks=None, first_call_index: int = 0):
    """Feed ``ids`` (in ``chunks`` sizes, default one token at a time); return (deltas, message, stream)."""
    stream = ReplyStream(TOK, thinking=thinking, first_call_index=first_call_index)
    deltas, at = [], 0
    for size in chunks or [1] * len(ids):
        deltas += stream.feed(ids[at : at + size])
        at += size
    deltas += stream.feed(ids[at:])
    last, message = stream.finish(finish_reason)
    return deltas + last, message, stream


def joined(deltas) -> dict:
    """The message fields a client rebuilds from the deltas."""
    out = {"reasoning_content": "", "content": "", "tool_calls": []}
    for d in deltas:
        assert len(d) == 1, d
        if "tool_call" in d:
            tc = d["tool_call"]
            if "id" in tc:
                assert tc["index"] == len(out["tool_calls"])
                out["tool_calls"].append(openai_call(tc["id"], tc["name"], ""))
            else:
                out["tool_calls"][tc["index"]]["function"]["arguments"] += tc["arguments"]
        else:
            ((key, text),) = d.items()
            assert isinstance(text, str) and text, d
            out[key] += text
    return out


def fields(message) -> dict:
    return {k: message[k] for k in ("reasoning_content", "content", "tool_calls")}


def check(text: str, *, thinking: bool, finish_reason: str = "stop") -> dict:
    """Parse ``text`` every way (stream token by token, all at once, chat.parse): all must agree; the message."""
    ids = TOK.encode(text)
    deltas, message, _ = run(ids, thinking=thinking, finish_reason=finish_reason)
    assert joined(deltas) == fields(message)
    assert parse_reply(TOK, ids, thinking=thinking, finish_reason=finish_reason) == message
    at_once, message_at_once, _ = run(ids, thinking=thinking, finish_reason=finish_reason, chunks=[len(ids)])
    assert message_at_once == message and joined(at_once) == fields(message)
    reply = parse(text, thinking=thinking)
    assert (reply.reasoning_content, reply.content, reply.tool_calls, reply.errors) == (
        message["reasoning_content"],
        message["content"],
        message["tool_calls"],
        message["errors"],
    )
    for m in MARKERS:
        assert m not in message["content"] and m not in message["reasoning_content"]
    for c in message["tool_calls"]:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    return message


# ---------------------------------------------------------------------------------------------------------
# Well-formed replies
# ---------------------------------------------------------------------------------------------------------


def test_thinking_reply_with_a_call():
    text = "I should call it.</think>Checking." + section(call("functions.get_weather:0", '{"city": "Paris"}'))
    message = check(text + IM_END, thinking=True)
    assert message == {
        "role": "assistant",
        "reasoning_content": "I should call it.",
        "content": "Checking.",
        "tool_calls": [openai_call("functions.get_weather:0", "get_weather", '{"city": "Paris"}')],
        "errors": [],
        "finish_reason": "tool_calls",
    }


def test_deltas_in_order_and_call_streamed_whole():
    ids = TOK.encode("ab</think>c" + section(call("functions.f:3", '{"x": [1, 2]}')) + IM_END)
    deltas, message, stream = run(ids, thinking=True, chunks=[len(ids)])
    assert deltas == [
        {"reasoning_content": "ab"},
        {"content": "c"},
        {"tool_call": {"index": 0, "id": "functions.f:3", "name": "f"}},
        {"tool_call": {"index": 0, "arguments": '{"x": [1, 2]}'}},
    ]
    assert message["finish_reason"] == "tool_calls"


def test_plain_answer_finish_reason_stop_and_stop_tokens_give_no_text():
    for stop in (IM_END, "[EOS]"):
        text = "think</think>Four." + stop + "ignored" + section(call("functions.f:0", "{}"))
        message = check(text, thinking=True)
        assert fields(message) == {"reasoning_content": "think", "content": "Four.", "tool_calls": []}
        assert message["finish_reason"] == "stop" and message["errors"] == []


def test_leading_repeated_think_is_dropped_silently():
    message = check(THINK + "a</think>b" + IM_END, thinking=True)
    assert (message["reasoning_content"], message["content"], message["errors"]) == ("a", "b", [])


@pytest.mark.parametrize("name", ["get_weather", "weather.lookup", "get-weather.v2", "a.b-c_d.e", "x"])
def test_names_keep_dots_dashes_underscores(name):
    text = "</think>" + section(call(f"functions.{name}:7", '{"q": 1}')) + IM_END
    message = check(text, thinking=True)
    assert message["tool_calls"] == [openai_call(f"functions.{name}:7", name, '{"q": 1}')]
    assert message["errors"] == []


def test_multiline_and_large_arguments():
    big = {"code": "def f(x):\n    return x < 1 | 2\n" * 400, "notes": ["line\nbreak", "<|not a marker", "é中🙂"]}
    pretty = json.dumps(big, ensure_ascii=False, indent=2)  # real newlines between fields too
    assert len(pretty.encode()) > 8192
    compact = json.dumps({"s": "x" * 9000})
    text = "</think>" + section(call("functions.write:0", pretty), call("functions.write:1", compact)) + IM_END
    message = check(text, thinking=True)
    assert message["tool_calls"] == [
        openai_call("functions.write:0", "write", pretty),
        openai_call("functions.write:1", "write", compact),
    ]
    assert message["errors"] == []


@pytest.mark.parametrize("n", [1, 3, 17])
def test_n_calls_indexed_from_zero(n):
    calls = [call(f"functions.tool_{k % 3}:{k + 5}", json.dumps({"k": k})) for k in range(n)]
    ids = TOK.encode("</think>" + section(*calls) + IM_END)
    deltas, message, _ = run(ids, thinking=True)
    assert message["tool_calls"] == [
        openai_call(f"functions.tool_{k % 3}:{k + 5}", f"tool_{k % 3}", json.dumps({"k": k})) for k in range(n)
    ]
    assert [d["tool_call"]["index"] for d in deltas if "tool_call" in d] == [k for k in range(n) for _ in (0, 1)]
    assert message["errors"] == [] and message["finish_reason"] == "tool_calls"


def test_several_sections_with_narration_between():
    text = (
        "plan</think>First "
        + section(call("functions.a:0", "{}"))
        + " then "
        + section(call("functions.b.c:1", '{"n": 2}'), call("functions.d-e:2", "{}"))
        + " done."
        + IM_END
    )
    message = check(text, thinking=True)
    assert fields(message) == {
        "reasoning_content": "plan",
        "content": "First  then  done.",
        "tool_calls": [
            openai_call("functions.a:0", "a", "{}"),
            openai_call("functions.b.c:1", "b.c", '{"n": 2}'),
            openai_call("functions.d-e:2", "d-e", "{}"),
        ],
    }
    assert message["errors"] == []


def test_back_to_back_sections_leak_nothing():
    text = "</think>" + section(call("functions.a:0", "{}")) + section(call("functions.b:1", "{}")) + IM_END
    message = check(text, thinking=True)
    assert message["content"] == "" and [c["id"] for c in message["tool_calls"]] == ["functions.a:0", "functions.b:1"]
    assert message["errors"] == []


# ---------------------------------------------------------------------------------------------------------
# Thinking vs instant
# ---------------------------------------------------------------------------------------------------------


def test_reasoning_cut_before_end_think_stays_reasoning():
    message = check("still thinking about x < y | z", thinking=True, finish_reason="length")
    assert fields(message) == {"reasoning_content": "still thinking about x < y | z", "content": "", "tool_calls": []}
    assert message["errors"] == ["no </think>: the reasoning was not closed"]
    assert message["finish_reason"] == "length"


def test_instant_output_is_always_content():
    message = check("Four.<think>x</think>y" + IM_END, thinking=False)
    assert fields(message) == {"reasoning_content": "", "content": "Four.xy", "tool_calls": []}
    assert message["errors"] == ["stray <think> dropped", "</think> with thinking off dropped (the output is content)"]
    ids = TOK.encode("no thought here")
    deltas, message, stream = run(ids, thinking=False, finish_reason="length")
    assert all("reasoning_content" not in d for d in deltas) and stream.reasoning_tokens == 0
    assert message["content"] == "no thought here" and message["errors"] == []


def test_call_before_end_think_is_returned_and_ends_the_reasoning():
    text = "I need the weather." + section(call("functions.weather.lookup:0", '{"city": "Oslo"}')) + IM_END
    message = check(text, thinking=True)
    assert fields(message) == {
        "reasoning_content": "I need the weather.",
        "content": "",
        "tool_calls": [openai_call("functions.weather.lookup:0", "weather.lookup", '{"city": "Oslo"}')],
    }
    assert message["errors"] == ["no </think> before the tool calls: the reasoning ends there"]
    # a </think> after such a section is stray: dropped, its surroundings content
    message = check("r" + section(call("functions.f:0", "{}")) + "a</think>b" + IM_END, thinking=True)
    assert (message["reasoning_content"], message["content"], len(message["tool_calls"])) == ("r", "ab", 1)
    assert message["errors"][-1] == "stray </think> dropped"


def test_reasoning_tokens_count_the_thought_and_its_end():
    reasoning = "a long thought, with several tokens"
    n = len(TOK.encode(reasoning))
    ids = TOK.encode(reasoning + "</think>answer" + IM_END)
    assert run(ids, thinking=True)[2].reasoning_tokens == n + 1
    ids = TOK.encode(reasoning + section(call("functions.f:0", "{}")) + IM_END)
    assert run(ids, thinking=True)[2].reasoning_tokens == n
    assert run(TOK.encode(reasoning), thinking=True, finish_reason="length")[2].reasoning_tokens == n


# ---------------------------------------------------------------------------------------------------------
# Cut and malformed calls
# ---------------------------------------------------------------------------------------------------------


def test_max_tokens_cut_returns_complete_calls_and_drops_the_partial_one():
    head = "r</think>text "
    calls = [call("functions.a.b:0", '{"x": 1}'), call("functions.c-d:1", '{"y": "two\\nlines"}')]
    third = call("functions.e_f:2", '{"z": [1, 2, 3], "w": "long string"}')
    full = TOK.encode(head + SECTION_BEGIN + "".join(calls) + third + SECTION_END + IM_END)
    start = len(TOK.encode(head + SECTION_BEGIN + "".join(calls)))
    expected = [
        openai_call("functions.a.b:0", "a.b", '{"x": 1}'),
        openai_call("functions.c-d:1", "c-d", '{"y": "two\\nlines"}'),
    ]
    third_ids = len(TOK.encode(third))
    for cut in range(start, start + third_ids):  # cut anywhere inside the third call, its end marker excluded
        deltas, message, _ = run(full[:cut], thinking=True, finish_reason="length")
        assert fields(message) == {"reasoning_content": "r", "content": "text ", "tool_calls": expected}, cut
        assert joined(deltas) == fields(message)
        assert message["finish_reason"] == "length"
        dropped = ["tool call 2 was cut before <|tool_call_end|>; dropped"] if cut > start else []
        assert message["errors"] == dropped + ["tool-call section not closed"]
    # cut after the third call's end but before the section end: all three
    deltas, message, _ = run(full[: start + third_ids], thinking=True, finish_reason="length")
    assert len(message["tool_calls"]) == 3 and message["errors"] == ["tool-call section not closed"]
    assert message["finish_reason"] == "length"


def test_cut_inside_the_call_header_or_arguments_of_the_only_call():
    text = "</think>ok" + section(call("functions.get-weather.v2:0", '{"city": "Paris"}'))
    ids = TOK.encode(text)
    for cut in range(len(TOK.encode("</think>ok")), len(ids) - 1):
        deltas, message, _ = run(ids[:cut], thinking=True, finish_reason="length")
        assert fields(message) == {"reasoning_content": "", "content": "ok", "tool_calls": []}
        assert joined(deltas) == fields(message) and message["finish_reason"] == "length"


def test_stray_section_end_is_dropped():
    message = check("r</think>a" + SECTION_END + "b" + IM_END, thinking=True)
    assert fields(message) == {"reasoning_content": "r", "content": "ab", "tool_calls": []}
    assert message["errors"] == ["tool-call section end with no section begin dropped"]


def test_stray_call_end_and_argument_marker_are_dropped():
    message = check("</think>a" + CALL_END + "b" + CALL_ARGS + "c" + IM_END, thinking=True)
    assert message["content"] == "abc"
    assert message["errors"] == [
        "tool-call end with no call begin dropped",
        "tool-call argument marker outside a call dropped",
    ]


@pytest.mark.parametrize("header", ["", "functions.:0", ":3", "  "])
def test_call_without_a_name_is_dropped_and_reported(header):
    text = "</think>" + section(call(header, '{"a": 1}'), call("functions.ok:1", "{}")) + IM_END
    message = check(text, thinking=True)
    assert message["tool_calls"] == [openai_call("functions.ok:1", "ok", "{}")]
    assert message["errors"] == ["tool call 0 has no function name; dropped"]


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ("city=Paris", "arguments are not valid JSON"),
        ('{"a": 1', "arguments are not valid JSON"),
        ('{"a": NaN}', "arguments are not valid JSON"),
        ('{"a": 1} trailing', "arguments are not valid JSON"),
        ("[1, 2]", "arguments are not a JSON object"),
        ('"text"', "arguments are not a JSON object"),
        ("[" * 100000, "arguments are not valid JSON"),
    ],
)
def test_invalid_arguments_drop_the_call(arguments, problem):
    message = parse_reply(
        TOK,
        TOK.encode("</think>" + section(call("functions.f:0", arguments), call("functions.g:1", "{}")) + IM_END),
        thinking=True,
    )
    assert message["tool_calls"] == [openai_call("functions.g:1", "g", "{}")]
    assert message["errors"] == [f"tool call 0 (f): {problem}; dropped"]


def test_empty_or_missing_arguments_become_an_empty_object():
    text = "</think>" + section(call("functions.f:0", " "), CALL_BEGIN + "functions.g:1" + CALL_END) + IM_END
    message = check(text, thinking=True)
    assert message["tool_calls"] == [openai_call("functions.f:0", "f", "{}"), openai_call("functions.g:1", "g", "{}")]
    assert message["errors"] == [
        "tool call 0 (f): empty arguments set to {}",
        "tool call 1 (g): no arguments marker; arguments set to {}",
    ]


def test_call_ended_by_another_marker_is_kept_when_valid():
    text = (
        "</think>"
        + SECTION_BEGIN
        + CALL_BEGIN
        + "functions.a:0"
        + CALL_ARGS
        + '{"x": 1}'
        + CALL_BEGIN
        + "functions.b:1"
        + CALL_ARGS
        + '{"y": 2}'
        + SECTION_END
        + "after"
        + CALL_BEGIN
        + "functions.c:2"
        + CALL_ARGS
        + "{}"
        + IM_END
    )
    message = check(text, thinking=True)
    assert [c["id"] for c in message["tool_calls"]] == ["functions.a:0", "functions.b:1", "functions.c:2"]
    assert message["content"] == "after"
    assert message["errors"] == [
        "tool call 0 not closed (<|tool_call_begin|> came before <|tool_call_end|>)",
        "tool call 1 not closed (<|tool_calls_section_end|> came before <|tool_call_end|>)",
        "tool call 2 outside a tool-call section; read as in one",
        "tool call 2 not closed (<|im_end|> came before <|tool_call_end|>)",
    ]


def test_text_inside_a_section_outside_calls_is_dropped():
    text = "</think>" + SECTION_BEGIN + "\n" + call("functions.f:0", "{}") + "junk<" + SECTION_END + "ok" + IM_END
    message = check(text, thinking=True)
    assert (message["content"], len(message["tool_calls"])) == ("ok", 1)
    assert message["errors"] == ["text inside a tool-call section, outside any call, dropped: 'junk<'"]


def test_think_markers_inside_arguments_are_text():
    arguments = json.dumps({"doc": "a <think> b </think> c"})
    message = check("</think>" + section(call("functions.f:0", arguments)) + IM_END, thinking=True)
    assert message["tool_calls"] == [openai_call("functions.f:0", "f", arguments)] and message["errors"] == []


def test_malformed_ids_are_numbered_from_first_call_index():
    text = "</think>" + section(call("get_weather", "{}"), call("functions.f:x", "{}"), call("functions.g:4", "{}"))
    deltas, message, _ = run(TOK.encode(text + IM_END), thinking=True, first_call_index=10)
    assert [c["id"] for c in message["tool_calls"]] == ["functions.get_weather:10", "functions.f:x:11", "functions.g:4"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "f:x", "g"]
    assert joined(deltas) == fields(message)
    assert message["errors"] == [
        "tool call 0 (get_weather): id is not functions.NAME:IDX; set to functions.get_weather:10",
        "tool call 1 (f:x): id is not functions.NAME:IDX; set to functions.f:x:11",
    ]


# ---------------------------------------------------------------------------------------------------------
# Chunking: markers and characters split across chunks
# ---------------------------------------------------------------------------------------------------------

MIXED = (
    "Think <about> a|b [x] </thin k>.</think>Sure < | >"
    + section(call("functions.get-weather.v2:0", '{"city": "Paris <|x|>",\n "n": 2}'), call("functions.x.y:1", "{}"))
    + "then 中文 🙂"
    + section(call("functions.z:2", '{"t": "é"}'))
    + "[end]"
    + IM_END
)


def test_markers_written_as_plain_text_parse_like_special_tokens():
    special = TOK.encode(MIXED)
    plain = TOK.encode(MIXED, allow_special=False)  # every marker split over several tokens
    assert len(plain) > len(special)
    _, expected, _ = run(special, thinking=True)
    deltas, message, _ = run(plain, thinking=True)
    assert message == expected and joined(deltas) == fields(message)
    assert len(message["tool_calls"]) == 3 and message["errors"] == []


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_give_the_same_result(seed):
    rng = random.Random(seed)
    for ids in (TOK.encode(MIXED), TOK.encode(MIXED, allow_special=False)):
        _, expected, _ = run(ids, thinking=True)
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(rng.randint(1, 9))
        deltas, message, _ = run(ids, thinking=True, chunks=chunks)
        assert message == expected and joined(deltas) == fields(message)


def test_text_pushed_in_pieces_holds_only_possible_marker_starts():
    p = ReplyParser(thinking=False)
    assert p.push("a<") == [{"content": "a"}]
    assert p.push("b [") == [{"content": "<b "}]
    assert p.push("EO") == []
    assert p.push("x<|tool_calls_sec") == [{"content": "[EOx"}]
    assert p.push("tion_begin|>") == []
    assert p.push(f"{CALL_BEGIN}functions.f:0{CALL_ARGS}{{}}") == []  # a call waits for its end
    assert p.push(f"{CALL_END}{SECTION_END}<") == [
        {"tool_call": {"index": 0, "id": "functions.f:0", "name": "f"}},
        {"tool_call": {"index": 0, "arguments": "{}"}},
    ]
    assert p.finish() == [{"content": "<"}]
    assert (p.content, p.errors) == ("a<b [EOx<", [])


def test_utf8_split_across_tokens_is_held_until_complete():
    ids = TOK.encode("é🙂中</think>中é🙂")
    assert any(_invalid_utf8(TOK.decode_bytes([i])) for i in ids)  # the tiny vocabulary splits characters
    deltas, message, _ = run(ids, thinking=True)
    assert all("\ufffd" not in text for d in deltas for text in d.values() if isinstance(text, str))
    assert (message["reasoning_content"], message["content"]) == ("é🙂中", "中é🙂")
    # a character cut by max_tokens becomes U+FFFD at the end, as a one-shot decode gives
    deltas, message, _ = run(TOK.encode("</think>é🙂")[:-1], thinking=True, finish_reason="length")
    assert message["content"] == "é\ufffd" and joined(deltas) == fields(message)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_finish_is_idempotent_and_feed_after_finish_raises():
    stream = ReplyStream(TOK, thinking=True)
    assert stream.feed(TOK.encode("a</think>b<")) == [{"reasoning_content": "a"}, {"content": "b"}]
    deltas, message = stream.finish("length")
    assert deltas == [{"content": "<"}]  # held back: it could have begun a marker
    assert stream.finish("length") == ([], message)
    with pytest.raises(RuntimeError):
        stream.feed([1])


def test_random_token_garbage_parses_consistently():
    rng = random.Random(0)
    specials = [TOK.token_id(m) for m in MARKERS]
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(TOK.vocab_size) for _ in range(40)]
        thinking = rng.random() < 0.5
        deltas, message, _ = run(ids, thinking=thinking, chunks=[rng.randint(1, 5) for _ in range(40)])
        assert joined(deltas) == fields(message)
        reply = parse_ids(ids, TOK, thinking=thinking)  # special tokens other than markers skipped, as served
        assert (reply.reasoning_content, reply.content, reply.tool_calls, reply.errors) == (
            message["reasoning_content"],
            message["content"],
            message["tool_calls"],
            message["errors"],
        )
        for m in MARKERS:
            assert m not in message["content"] and m not in message["reasoning_content"]
        for c in message["tool_calls"]:
            assert isinstance(json.loads(c["function"]["arguments"]), dict)
        if not thinking:
            assert message["reasoning_content"] == ""


# ---------------------------------------------------------------------------------------------------------
# Randomized replies with known answers
# ---------------------------------------------------------------------------------------------------------

NAMES = ["get_weather", "weather.lookup", "get-weather.v2", "a_b.c-d", "x", "ns.tool_v1.run"]
ALPHABET = [
    "a",
    "b",
    " ",
    "\n",
    "<",
    "|",
    ">",
    "[",
    "]",
    "/",
    "think",
    "tool",
    "_call",
    "EOS",
    "é",
    "中",
    "🙂",
    "{",
    '"',
]


def _text(rng, n_max=12):
    while True:
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, n_max)))
        if not any(m in s for m in MARKERS):
            return s


def _value(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.4:
        return _text(rng)
    if r < 0.55:
        return rng.randint(-5, 10**6)
    if r < 0.7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_text(rng, 4): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _random_call(rng, k):
    """(call text, the expected OpenAI call or None when the parser must drop it)."""
    name = rng.choice(NAMES)
    call_id = f"functions.{name}:{rng.randint(0, 40)}"
    args = {_text(rng, 5): _value(rng) for _ in range(rng.randint(0, 4))}
    if rng.random() < 0.05:
        args["big"] = "line\n" * 2000  # > 8 KB
    arguments = json.dumps(args, ensure_ascii=False, indent=rng.choice([None, 2]))
    r = rng.random()
    if r < 0.08:
        return call(call_id, arguments[: max(1, len(arguments) // 2)] + "<"), None  # not JSON (truncated)
    if r < 0.12:
        return call(rng.choice(["", "functions.:1"]), arguments), None  # no name
    return call(call_id, arguments), openai_call(call_id, name, arguments)


def _random_reply(rng, thinking):
    """Segments ``(kind, text, expected call)``: kind is reasoning, content, call or marker."""
    segs, k = [], 0

    def add_section():
        nonlocal k
        segs.append(("marker", SECTION_BEGIN, None))
        for _ in range(rng.randint(1, 3)):
            text, expected = _random_call(rng, k)
            segs.append(("call", text, expected))
            k += 1
        segs.append(("marker", SECTION_END, None))

    phase = "content"
    if thinking:
        segs.append(("reasoning", _text(rng, 30), None))
        r = rng.random()
        if r < 0.15:
            phase = None  # the thought never ends
        elif r < 0.3:
            add_section()  # a call inside the thought ends it
        else:
            segs.append(("marker", END_THINK, None))
    if phase is not None:
        for _ in range(rng.randint(0, 4)):
            r = rng.random()
            if r < 0.45:
                segs.append(("content", _text(rng, 20), None))
            elif r < 0.9:
                add_section()
            else:
                segs.append(("marker", SECTION_END, None))  # stray: dropped
    if rng.random() < 0.8:
        segs.append(("marker", rng.choice([IM_END, "[EOS]"]), None))
        segs.append(("content", "after the stop" + _text(rng), None))  # must be ignored
        segs.append(("call", call("functions.late:9", "{}"), openai_call("functions.late:9", "late", "{}")))
    return segs


def _expected(segs, cut_ids):
    """The message fields a cut at ``cut_ids`` tokens must give, the numbers of the calls it must drop (and
    report), and the segments' token ids."""
    out = {"reasoning_content": "", "content": "", "tool_calls": []}
    ids, stopped, dropped, k = [], False, [], 0
    for kind, text, expected in segs:
        seg_ids = [TOK.token_id(text)] if kind == "marker" else TOK.encode(text, allow_special=kind == "call")
        room = cut_ids - len(ids)
        ids += seg_ids
        if stopped or room <= 0:
            continue
        if kind == "marker" and text in (IM_END, "[EOS]"):
            stopped = True
        elif kind in ("reasoning", "content"):
            out["reasoning_content" if kind == "reasoning" else "content"] += TOK.decode(seg_ids[:room])
        elif kind == "call":
            if expected is not None and room >= len(seg_ids):
                out["tool_calls"].append(expected)
            else:
                dropped.append(k)
            k += 1
    return out, dropped, ids


@pytest.mark.parametrize("seed", range(200))
def test_random_replies(seed):
    rng = random.Random(seed)
    thinking = rng.random() < 0.6
    while True:
        segs = _random_reply(rng, thinking)
        full, _, ids = _expected(segs, 10**9)
        if not any(m in full["content"] or m in full["reasoning_content"] for m in MARKERS):
            break  # (narration pieces joined across a dropped section could spell a marker: draw again)
    cut = len(ids) if rng.random() < 0.4 else rng.randint(0, len(ids))
    expected, dropped, _ = _expected(segs, cut)
    finish_reason = "stop" if cut == len(ids) else "length"
    chunks = [rng.randint(1, 7) for _ in range(cut)]
    deltas, message, stream = run(ids[:cut], thinking=thinking, finish_reason=finish_reason, chunks=chunks)
    _, by_token, _ = run(ids[:cut], thinking=thinking, finish_reason=finish_reason)
    assert by_token == message
    assert fields(message) == expected
    assert joined(deltas) == expected
    assert message["finish_reason"] == (
        "tool_calls" if finish_reason == "stop" and expected["tool_calls"] else finish_reason
    )
    reply = parse(TOK.decode(ids[:cut]), thinking=thinking)
    assert (reply.reasoning_content, reply.content, reply.tool_calls, reply.errors) == (
        message["reasoning_content"],
        message["content"],
        message["tool_calls"],
        message["errors"],
    )
    if cut == len(ids):  # the markers spelled as plain text, each split over several tokens: the same message
        plain = TOK.encode(TOK.decode(ids), allow_special=False)
        deltas_plain, message_plain, _ = run(plain, thinking=thinking, chunks=[rng.randint(1, 7) for _ in plain])
        assert message_plain == message and joined(deltas_plain) == expected
    for m in MARKERS:
        assert m not in message["content"] and m not in message["reasoning_content"]
    for c in message["tool_calls"]:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
        assert c["function"]["name"] in NAMES and c["id"].startswith(f"functions.{c['function']['name']}:")
    if not thinking:
        assert message["reasoning_content"] == "" and stream.reasoning_tokens == 0
        assert all("reasoning_content" not in d for d in deltas)
    for k in dropped:  # each dropped call (invalid, nameless or cut) is reported
        assert any(e.startswith(f"tool call {k} ") and e.endswith("dropped") for e in message["errors"]), (k, message)


# ---------------------------------------------------------------------------------------------------------
# skip_special_tokens (vLLM's field, default true)
# ---------------------------------------------------------------------------------------------------------


def test_special_tokens_other_than_markers_give_no_text():
    from k25jax.chat_reply import skipped_special_ids
    from k25jax.serve.protocol import TextPipeline

    reserved = TOK.token_id("<|reserved_token_" + str(TOK.num_base + 200) + "|>")
    pad = TOK.token_id("<|media_pad|>")
    skip = skipped_special_ids(TOK)
    assert reserved in skip and pad in skip and TOK.token_id("[BOS]") in skip
    assert not {TOK.token_id(m) for m in MARKERS} & skip  # the reply grammar always counts
    ids = TOK.encode("Let me see.") + [reserved] + TOK.encode("</think>The answer") + [pad, reserved]
    ids += TOK.encode(" is 4.") + [TOK.im_end_id]
    deltas, message, stream = run(ids, thinking=True)
    assert (message["reasoning_content"], message["content"]) == ("Let me see.", "The answer is 4.")
    assert joined(deltas) == fields(message)
    plain, _, plain_stream = run([t for t in ids if t not in (reserved, pad)], thinking=True)
    assert stream.reasoning_tokens == plain_stream.reasoning_tokens + 1  # the skipped reasoning token still counts
    kept = ReplyStream(TOK, thinking=True, skip_special_tokens=False)
    kept.feed(ids)
    name = TOK.special_names[reserved]
    assert kept.finish("stop")[1]["content"] == f"The answer<|media_pad|>{name} is 4."
    reply = parse_ids(ids, TOK, thinking=True)
    assert (reply.reasoning_content, reply.content) == ("Let me see.", "The answer is 4.")
    assert parse_ids(ids, TOK, thinking=True, skip_special_tokens=False).reasoning_content == f"Let me see.{name}"
    text_ids = TOK.encode("Once") + [reserved] + TOK.encode(" upon") + [TOK.im_end_id]
    pipe = TextPipeline(TOK, [], TOK.stop_ids)
    assert pipe.feed(text_ids[:2]) + pipe.feed(text_ids[2:], final=True, stop_reason=TOK.im_end_id) == "Once upon"
    raw = TextPipeline(TOK, [], TOK.stop_ids, skip_special_tokens=False)
    assert raw.feed(text_ids, final=True, stop_reason=TOK.im_end_id) == f"Once{name} upon"
