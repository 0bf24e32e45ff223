"""The demo tasks: seeded samples, exact reasoning traces, tool loops that render, media that loads, the scorer."""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal

import numpy as np
import pytest
from PIL import Image

from k25jax import chat, media
from k25jax.demo import tasks as T
from k25jax.tokenizer import Tokenizer

TEXT_TASKS = ("add", "sub", "compare", "tool_call", "no_tool")


def _assistants(s: dict) -> list[dict]:
    return [m for m in s["messages"] if m["role"] == "assistant"]


def _gold(s: dict, turn: int) -> tuple[str, list[dict]]:
    m = _assistants(s)[turn]
    return m["content"], [c["function"] for c in m.get("tool_calls", [])]


def _many(task: str, n: int, seed: int = 0, **kw) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [T.sample(rng, task, **kw) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def mixed():
    return T.generate(300, seed=0, image_size=28)


# --------------------------------------------------------------------------------------------------------
# Determinism and structure
# --------------------------------------------------------------------------------------------------------


def test_generate_is_deterministic_per_seed():
    a, b, c = T.generate(40, seed=0), T.generate(40, seed=0), T.generate(40, seed=1)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)
    assert sum(json.dumps(x) == json.dumps(y) for x, y in zip(a, c, strict=True)) < 5
    assert json.dumps(T.generate(15, seed=0)) == json.dumps(a[:15])  # a prefix of the longer list


def test_sample_same_state_same_draws():
    x = T.sample(np.random.default_rng(7), "compare", mode="thinking")
    y = T.sample(np.random.default_rng(7), "compare", mode="instant")
    assert x["messages"][-2] == y["messages"][-2]  # same question, different mode
    assert x["meta"]["mode"] == "thinking" and y["meta"]["mode"] == "instant"


def test_structure_modes_and_system(mixed):
    tasks = {s["meta"]["task"] for s in mixed}
    assert tasks == set(T.TASKS)
    modes = [s["meta"]["mode"] for s in mixed]
    assert 0.35 < modes.count("thinking") / len(modes) < 0.65
    systems = [s["meta"]["system"] for s in mixed]
    assert 0.35 < sum(systems) / len(systems) < 0.65
    for s in mixed:
        assert set(s["meta"]) == {"task", "mode", "expected", "system"}
        assert (s["messages"][0]["role"] == "system") == s["meta"]["system"]
        if s["meta"]["system"]:
            assert s["messages"][0]["content"] in T.SYSTEM_PROMPTS
        assert ("tools" in s) == (s["meta"]["task"] == "tool_call")
        for m in _assistants(s):
            assert isinstance(m["content"], str)
            if s["meta"]["mode"] == "thinking":
                assert isinstance(m["reasoning_content"], str) and m["reasoning_content"]
            else:
                assert "reasoning_content" not in m
    assert T.SYSTEM_PROMPTS[0] == "You are Kimi, an AI assistant created by Moonshot AI."


def test_instant_share():
    """``instant`` sets the share of instant-mode samples; 0.5 keeps the mode draws of earlier builds."""

    def modes(instant):
        return [s["meta"]["mode"] for s in T.generate(400, seed=5, mix=T.TEXT_MIX, instant=instant)]

    assert modes(0.5) == [s["meta"]["mode"] for s in T.generate(400, seed=5, mix=T.TEXT_MIX)]
    assert set(modes(0.0)) == {"thinking"} and set(modes(1.0)) == {"instant"}
    share = modes(0.65).count("instant") / 400
    assert 0.58 < share < 0.72, share
    base, more = T.generate(400, seed=5, mix=T.TEXT_MIX), T.generate(400, seed=5, mix=T.TEXT_MIX, instant=0.65)
    # the same questions whatever the mode share (the draw happens either way)
    assert [s["messages"][-2] for s in base] == [s["messages"][-2] for s in more]
    with pytest.raises(ValueError, match="instant"):
        T.generate(1, seed=0, instant=1.5)


def test_mix_weights_and_errors():
    only = T.generate(30, seed=3, mix={"add": 1.0})
    assert {s["meta"]["task"] for s in only} == {"add"}
    text = T.generate(60, seed=3, mix=T.TEXT_MIX)
    assert {s["meta"]["task"] for s in text} <= set(TEXT_TASKS) and set(T.TEXT_MIX) == set(TEXT_TASKS)
    with pytest.raises(ValueError, match="unknown tasks"):
        T.generate(1, seed=0, mix={"mul": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        T.generate(1, seed=0, mix={"add": 0.0})
    with pytest.raises(ValueError, match="unknown task"):
        T.sample(np.random.default_rng(0), "mul")
    with pytest.raises(ValueError, match="mode"):
        T.sample(np.random.default_rng(0), "add", mode="fast")


def test_write_jsonl_atomic_roundtrip(tmp_path, mixed):
    path = tmp_path / "train.jsonl"
    T.write_jsonl(mixed[:50], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == mixed[:50]
    assert not (tmp_path / "train.jsonl.tmp").exists()


# --------------------------------------------------------------------------------------------------------
# add / sub
# --------------------------------------------------------------------------------------------------------

_ADD_LINE = re.compile(r"^(\d)\+(\d)\+([01])=(\d+), digit (\d), carry ([01])$")
_SUB_LINE = re.compile(r"^(\d)-(\d)-([01])=(-?\d+)(?:, \+10=(\d))?, digit (\d), borrow ([01])$")


def _check_trace(a: int, b: int, op: str, trace: str) -> int:
    """Re-derive a trace column by column and return the number its digits line gives."""
    lines = trace.split("\n")
    assert lines[0] == f"{a}{op}{b}, right to left:"
    ra, rb = str(a)[::-1], str(b)[::-1]
    n = max(len(ra), len(rb))
    carry, digits = 0, []
    for i, line in enumerate(lines[1 : 1 + n]):
        x, y = (int(ra[i]) if i < len(ra) else 0), (int(rb[i]) if i < len(rb) else 0)
        if op == "+":
            m = _ADD_LINE.match(line)
            assert m, line
            gx, gy, gc, total, digit, nxt = map(int, m.groups())
            assert (gx, gy, gc) == (x, y, carry) and total == x + y + carry
            assert digit == total % 10 and nxt == total // 10
        else:
            m = _SUB_LINE.match(line)
            assert m, line
            gx, gy, gc, total = map(int, m.groups()[:4])
            plus10, digit, nxt = m.group(5), int(m.group(6)), int(m.group(7))
            assert (gx, gy, gc) == (x, y, carry) and total == x - y - carry
            assert (plus10 is not None) == (total < 0) == (nxt == 1)
            assert digit == total % 10 and (plus10 is None or int(plus10) == digit)
        digits.append(digit)
        carry = nxt
    rest = lines[1 + n :]
    if carry:
        assert op == "+" and rest[0] == "carry 1, digit 1"
        digits.append(1)
        rest = rest[1:]
    assert len(rest) == 1 and rest[0].startswith("digits ")
    written = [int(d) for d in rest[0].removeprefix("digits ").split(" ")]
    expect = digits[::-1]
    while len(expect) > 1 and expect[0] == 0:
        expect.pop(0)
    assert written == expect
    assert len(written) == 1 or written[0] != 0
    return int("".join(map(str, written)))


@pytest.mark.parametrize("task, op", [("add", "+"), ("sub", "-")])
def test_arithmetic_traces_rederive_the_result(task, op):
    samples = _many(task, 500, seed=11, mode="thinking")
    lengths = []
    for s in samples:
        question = s["messages"][-2]["content"]
        a, b = map(int, re.findall(r"\d+", question))
        true = a + b if op == "+" else a - b
        assert op == "+" or a >= b
        assert 0 <= a <= 999 and 0 <= b <= 999
        reply = _assistants(s)[0]
        assert _check_trace(a, b, op, reply["reasoning_content"]) == true
        assert reply["content"] == f"{a}{op}{b}={true}"
        assert s["meta"]["expected"] == true
        lengths += [len(str(a)), len(str(b))]
    counts = np.bincount(lengths, minlength=4)[1:] / len(lengths)
    assert np.all(counts > 0.2)  # short operands are common
    assert any(s["messages"][-2]["content"].startswith("Compute") for s in samples)


def test_arithmetic_trace_edge_cases():
    trace, result = T.arithmetic_trace(347, 589, "+")
    assert result == 936
    assert trace == (
        "347+589, right to left:\n7+9+0=16, digit 6, carry 1\n4+8+1=13, digit 3, carry 1\n"
        "3+5+1=9, digit 9, carry 0\ndigits 9 3 6"
    )
    trace, result = T.arithmetic_trace(999, 1, "+")
    assert result == 1000 and trace.endswith("carry 1, digit 1\ndigits 1 0 0 0")
    trace, result = T.arithmetic_trace(100, 99, "-")
    assert result == 1 and "0-9-0=-9, +10=1, digit 1, borrow 1" in trace and trace.endswith("digits 1")
    trace, result = T.arithmetic_trace(5, 5, "-")
    assert result == 0 and trace.endswith("5-5-0=0, digit 0, borrow 0\ndigits 0")
    with pytest.raises(ValueError):
        T.arithmetic_trace(3, 5, "-")


# --------------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------------


def test_compare_expected_hard_share_and_trace():
    samples = _many("compare", 400, seed=5, mode="thinking")
    same_whole = trap = 0
    for s in samples:
        question = s["messages"][-2]["content"]
        assert re.match(r"^[Ww]hich one is bigger, \d+\.\d+ or \d+\.\d+\?( [Tt]hink carefully\.)?$", question)
        x, y = re.findall(r"\d+\.\d+", question)
        for v in (x, y):
            whole, frac = v.split(".")
            assert 1 <= len(whole) <= 2 and 1 <= len(frac) <= 3 and frac[-1] != "0"
            assert str(int(whole)) == whole
        assert Decimal(x) != Decimal(y)
        big, small = (x, y) if Decimal(x) > Decimal(y) else (y, x)
        assert s["meta"]["expected"] == big
        reply = _assistants(s)[0]
        assert reply["content"] == f"{big} is bigger than {small}."
        lines = reply["reasoning_content"].split("\n")
        assert lines[0] == f"{x} vs {y}"
        wx, wy = x.split(".")[0], y.split(".")[0]
        if wx == wy:
            same_whole += 1
            fx, fy = x.split(".")[1], y.split(".")[1]
            trap += len(fx) != len(fy) and (Decimal(x) > Decimal(y)) == (len(fx) < len(fy))
            px, py = fx.ljust(3, "0"), fy.ljust(3, "0")
            assert lines[1] == f"whole parts: {wx} and {wy}, equal"
            assert lines[2] == f"decimals padded: {px} and {py}"
            assert (int(px) > int(py)) == (Decimal(x) > Decimal(y))
            assert lines[3] == f"{px} {'>' if px > py else '<'} {py}, so {big} is bigger"
        else:
            assert lines[1] == f"whole parts: {wx} and {wy}, {wx} {'>' if int(wx) > int(wy) else '<'} {wy}"
            assert lines[2] == f"so {big} is bigger" and len(lines) == 3
    assert same_whole / len(samples) >= 0.5
    assert trap / len(samples) >= 0.3  # 9.11 vs 9.9: the longer decimal is the smaller number


def test_compare_trace_example():
    trace, bigger = T.compare_trace("9.11", "9.9")
    assert bigger == "9.9"
    assert (
        trace == "9.11 vs 9.9\nwhole parts: 9 and 9, equal\ndecimals padded: 110 and 900\n110 < 900, so 9.9 is bigger"
    )


# --------------------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------------------


def test_tool_call_loop():
    samples = _many("tool_call", 300, seed=2)
    names, all_three, unit_asked, weather = set(), 0, 0, 0
    for s in samples:
        e = s["meta"]["expected"]
        user, call_turn, tool, final = s["messages"][-4:]
        assert user["role"] == "user" and tool["role"] == "tool" and final["role"] == "assistant"
        assert call_turn["content"] == "" and len(call_turn["tool_calls"]) == 1
        call = call_turn["tool_calls"][0]
        assert call["id"] == f"functions.{e['name']}:0" == tool["tool_call_id"] and call["type"] == "function"
        assert call["function"]["name"] == e["name"]
        assert json.loads(call["function"]["arguments"]) == e["arguments"]
        declared = [t["function"]["name"] for t in s["tools"]]
        assert e["name"] in declared and len(set(declared)) == len(declared)
        all_three += len(declared) == 3
        names.add(e["name"])
        result = json.loads(tool["content"])
        question = user["content"]
        if e["name"] == "get_weather":
            weather += 1
            asked = "celsius" in question or "fahrenheit" in question
            unit_asked += asked
            assert ("unit" in e["arguments"]) == asked
            assert result["unit"] == e["arguments"].get("unit", "celsius")
            assert final["content"] == (
                f"It is {result['temperature']} degrees {result['unit']} and {result['condition']} in {result['city']}."
            )
        elif e["name"] == "get_time":
            assert (
                re.fullmatch(r"\d\d:\d\d", result["time"])
                and final["content"] == f"It is {result['time']} in {result['city']}."
            )
        else:
            amount = e["arguments"]["amount"]
            assert isinstance(amount, int | float) and not isinstance(amount, bool) and amount == result["amount"]
            assert re.search(rf"\b{re.escape(json.dumps(amount))}\b", question)
            assert e["arguments"]["from"] != e["arguments"]["to"]
            assert round(result["result"], 2) == result["result"] > 0
        assert e["arguments"].get("city", result.get("city")) == result.get("city")
        for fact in e["answer_facts"]:
            assert fact in final["content"]
    assert names == set(T.TOOLS)
    assert 0.5 < all_three / len(samples) < 0.85
    assert 0.15 < unit_asked / weather < 0.45


def test_no_tool_samples():
    for s in _many("no_tool", 100, seed=4):
        assert "tools" not in s
        reply = _assistants(s)[0]
        assert reply["content"] == T.NO_TOOL_ANSWER == s["meta"]["expected"] and "tool_calls" not in reply


def test_text_samples_render_in_the_chat_format(mixed, tokenizer):
    rendered = 0
    for s in mixed:
        if s["meta"]["task"] not in TEXT_TASKS:
            continue
        tokens = chat.encode_for_training(
            s["messages"], tokenizer, tools=s.get("tools"), thinking=s["meta"]["mode"] == "thinking"
        )
        assert len(tokens.ids) == len(tokens.generated) and sum(tokens.generated) > 0
        text = tokenizer.decode(tokens.ids)
        for m in _assistants(s):
            assert m["content"] in text
            if s["meta"]["mode"] == "thinking":
                assert m["reasoning_content"] in text
        rendered += 1
    assert rendered > 150


# --------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------


def test_gold_replies_score_all_true(mixed):
    for s in mixed:
        prompts = T.prompt_messages(s)
        assert len(prompts) == (2 if s["meta"]["task"] == "tool_call" else 1)
        for turn, prompt in enumerate(prompts):
            assert prompt[-1]["role"] in ("user", "tool")
            checks = T.score(s, turn, *_gold(s, turn))
            assert checks and all(checks.values()), (s["meta"], turn, checks)


def test_corrupted_replies_score_false():
    add = _many("add", 1, seed=1)[0]
    content, _ = _gold(add, 0)
    wrong = content[:-1] + str((int(content[-1]) + 1) % 10)
    assert T.score(add, 0, wrong, [])["correct"] is False
    assert T.score(add, 0, content + ".", [])["correct"] is True
    assert T.score(add, 0, content[:-2] + "1" + content[-2:], [])["correct"] is False  # an extra digit

    cmp = _many("compare", 1, seed=1)[0]
    e = cmp["meta"]["expected"]
    small = cmp["messages"][-1]["content"].split(" is bigger than ")[1].rstrip(".")
    assert T.score(cmp, 0, f"{small} is bigger than {e}.", [])["correct"] is False

    tc = next(s for s in _many("tool_call", 20, seed=1) if s["meta"]["expected"]["name"] == "get_weather")
    _, calls = _gold(tc, 0)
    args = json.loads(calls[0]["arguments"])
    bad_city = dict(calls[0], arguments=json.dumps(dict(args, city="Atlantis")))
    assert T.score(tc, 0, "", [bad_city]) == {"valid_json": True, "correct": False}
    broken = dict(calls[0], arguments='{"city": "Paris"')
    assert T.score(tc, 0, "", [broken]) == {"valid_json": False, "correct": False}
    assert T.score(tc, 0, "", [dict(calls[0], name="get_time")])["correct"] is False
    assert T.score(tc, 0, "", calls + calls)["correct"] is False
    assert T.score(tc, 0, "It is sunny.", [])["correct"] is False
    final, _ = _gold(tc, 1)
    temperature = str(json.loads(tc["messages"][-2]["content"])["temperature"])
    assert T.score(tc, 1, final.replace(f" {temperature} ", f" {temperature}1 "), [])["correct"] is False

    cur = next(s for s in _many("tool_call", 40, seed=1) if s["meta"]["expected"]["name"] == "convert_currency")
    _, calls = _gold(cur, 0)
    args = json.loads(calls[0]["arguments"])
    as_float = dict(calls[0], arguments=json.dumps(dict(args, amount=float(args["amount"]))))
    assert T.score(cur, 0, "", [as_float])["correct"] is True  # numbers compare as numbers
    as_text = dict(calls[0], arguments=json.dumps(dict(args, amount=str(args["amount"]))))
    assert T.score(cur, 0, "", [as_text])["correct"] is False

    nt = _many("no_tool", 1, seed=1)[0]
    assert T.score(nt, 0, T.NO_TOOL_ANSWER, [{"name": "get_time", "arguments": "{}"}])["correct"] is False
    assert T.score(nt, 0, "It is 12:00.", [])["correct"] is False

    img = _many("image", 1, seed=1, image_size=28)[0]
    assert T.score(img, 0, "A pink hexagon on a white background.", [])["correct"] is False
    with pytest.raises(ValueError, match="turn"):
        T.score(img, 1, "", [])


# --------------------------------------------------------------------------------------------------------
# image / video
# --------------------------------------------------------------------------------------------------------


def _decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(T.decode_data_url(url))).convert("RGB"))


def _centroid(pixels: np.ndarray, background: str) -> tuple[float, float]:
    mask = np.any(pixels != np.array(T.PALETTE[background]), axis=-1)
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_image_samples():
    samples = _many("image", 60, seed=8)
    backgrounds = set()
    for s in samples:
        e = s["meta"]["expected"]
        parts = s["messages"][-2]["content"]
        assert parts[0]["type"] == "image_url" and parts[1]["type"] == "text"
        assert parts[1]["text"] in T.IMAGE_QUESTIONS
        pixels = _decode(parts[0]["image_url"]["url"])
        assert pixels.shape == (56, 56, 3)
        assert e["color"] != e["background"] and e["shape"] in T.SHAPES
        cx, cy = _centroid(pixels, e["background"])
        assert tuple(pixels[round(cy), round(cx)]) == T.PALETTE[e["color"]]
        for corner in (pixels[0, 0], pixels[-1, -1], pixels[0, -1], pixels[-1, 0]):
            assert tuple(corner) == T.PALETTE[e["background"]]
        assert _assistants(s)[0]["content"] == f"A {e['color']} {e['shape']} on a {e['background']} background."
        backgrounds.add(e["background"])
    assert "white" in backgrounds and len(backgrounds) > 1
    small = _many("image", 1, seed=8, image_size=28)[0]
    assert _decode(small["messages"][-2]["content"][0]["image_url"]["url"]).shape == (28, 28, 3)


def test_video_samples():
    for s in _many("video", 40, seed=9):
        e = s["meta"]["expected"]
        part = s["messages"][-2]["content"][0]
        assert part["type"] == "video" and 4 <= len(part["video"]) <= 8
        assert part["timestamps"] == [0.5 * i for i in range(len(part["video"]))]
        centres = np.array([_centroid(_decode(url), "white") for url in part["video"]])
        axis, sign = {
            "from left to right": (0, 1),
            "from right to left": (0, -1),
            "from top to bottom": (1, 1),
            "from bottom to top": (1, -1),
        }[e["direction"]]
        steps = np.diff(centres[:, axis]) * sign
        assert np.all(steps > 0) and steps.sum() > 56 * 0.3
        assert np.ptp(centres[:, 1 - axis]) < 1.5  # no drift across the motion
        assert _assistants(s)[0]["content"] == f"A {e['color']} {e['shape']} moves {e['direction']}."


def test_media_parts_load_with_the_repo_loader(tokenizer):
    video = _many("video", 1, seed=3)[0]
    n_frames = len(video["messages"][-2]["content"][0]["video"])
    assert isinstance(video["messages"][-2]["content"][0]["video"][0], str)  # frames as data URLs (JSON text)
    loaded, chunks = media.load_part(video["messages"][-2]["content"][0], "video")
    assert int(loaded.grid_thw[:, 0].sum()) == n_frames  # 2 fps keeps every frame
    assert len(chunks) == -(-n_frames // 4)
    image = _many("image", 1, seed=3)[0]
    loaded, pads = media.load_part(image["messages"][-2]["content"][0], "image")
    assert loaded.grid_thw.tolist() == [[1, 4, 4]] and pads == 4
    for s, frames in ((video, n_frames), (image, 1)):
        (messages,) = T.prompt_messages(s)  # straight into chat.prepare, as evaluate.py does
        prompt = chat.prepare(messages, tokenizer, thinking=True)
        assert int(prompt.media.grid_thw[:, 0].sum()) == frames
        assert tokenizer.decode(prompt.ids).count("<|media_pad|>") == prompt.media.num_tokens
