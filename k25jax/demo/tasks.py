"""Seeded synthetic chat tasks for the tiny demo model, and the scorer that grades its replies.

Each sample is an OpenAI-style conversation ``{"messages": [...], "tools": [...], "meta": {...}}`` (``tools``
only where tools are declared). ``meta`` holds ``task`` (one of :data:`TASKS`), ``mode`` (``"thinking"``: the
assistant messages carry ``reasoning_content``; ``"instant"``: they have no such key), ``expected`` (what
:func:`score` grades against) and ``system`` (whether a system message comes first).

The tasks, all short so that training on a few CPU cores stays cheap:

- ``add`` / ``sub``: ``What is 347+589?``; the reasoning works column by column from the right with the carry
  or borrow, the reply is ``347+589=936``;
- ``compare``: ``Which one is bigger, 9.11 or 9.9?`` (same whole part over-represented); the reasoning pads the
  decimals, the reply is ``9.9 is bigger than 9.11.``;
- ``tool_call``: weather, time or currency questions answered with a declared tool: user, assistant tool call,
  tool result, assistant answer from a fixed template;
- ``no_tool``: the same questions with no tools declared: ``I can't look that up.``;
- ``image``: one coloured shape on a plain background (a PNG data URL): ``A red circle on a white background.``;
- ``video``: 4 to 8 frames of one shape moving along an axis: ``A blue square moves from left to right.``.

Video parts are ``{"type": "video", "video": [PNG data URL, ...], "timestamps": [0.0, 0.5, ...]}`` so that a
sample stays JSON text (``k25jax.media.load_part``, and so ``k25jax.chat.prepare`` and training, read data-URL
frames). Everything is drawn from ``numpy.random.Generator`` s: a seed gives the same
samples on every run, and :func:`generate` seeds each sample on its own (``generate(n, s)`` is a prefix of
``generate(n + k, s)``).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from k25jax.vision.preprocess import data_url_bytes

TASKS = ("add", "sub", "compare", "tool_call", "no_tool", "image", "video")
DEFAULT_MIX: dict[str, float] = {
    "add": 0.22,
    "sub": 0.22,
    "compare": 0.20,
    "tool_call": 0.16,
    "no_tool": 0.06,
    "image": 0.08,
    "video": 0.06,
}
# DEFAULT_MIX without the media tasks (a text-only build or evaluation: `--text-only`).
TEXT_MIX: dict[str, float] = {t: w for t, w in DEFAULT_MIX.items() if t not in ("image", "video")}
MODES = ("thinking", "instant")
SYSTEM_PROMPTS = (
    "You are Kimi, an AI assistant created by Moonshot AI.",
    "You are a helpful assistant.",
    "You are a concise assistant.",
)
NO_TOOL_ANSWER = "I can't look that up."

# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One element of ``items``, uniformly."""
    return items[int(rng.integers(len(items)))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    """True with probability ``p``."""
    return bool(rng.random() < p)


def _assistant(content: str, reasoning: str, tool_calls: list[dict] | None = None) -> dict:
    """An assistant message with its reasoning (removed later for instant mode)."""
    m: dict[str, Any] = {"role": "assistant", "reasoning_content": reasoning, "content": content}
    if tool_calls:
        m["tool_calls"] = tool_calls
    return m


def _user(content: str | list[dict]) -> dict:
    return {"role": "user", "content": content}


# ----------------------------------------------------------------------------------------------------------
# add / sub
# ----------------------------------------------------------------------------------------------------------

ARITH_QUESTIONS = ("What is {a}{op}{b}?", "What is {a} {op} {b}?", "Compute {a}{op}{b}.", "{a}{op}{b}=?")


def _operand(rng: np.random.Generator) -> int:
    """An integer in 0..999 whose digit count is uniform over 1, 2 and 3."""
    digits = int(rng.integers(1, 4))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def arithmetic_trace(a: int, b: int, op: str) -> tuple[str, int]:
    """The column-by-column reasoning of ``a op b`` (``op`` ``"+"`` or ``"-"``, ``a >= b >= 0`` for ``-``) and
    the result.

    One line per column of the longer operand from the right, using only that column's digits (0 where an
    operand is shorter) and the carry or borrow; a final carry gets its own line; the last line lists the
    result's digits, most significant first (leading zeros of a difference dropped, a lone 0 kept).
    """
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    if a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"need a >= 0, b >= 0 (and a >= b for '-'), got {a}{op}{b}")
    ra, rb = str(a)[::-1], str(b)[::-1]
    lines = [f"{a}{op}{b}, right to left:"]
    digits: list[int] = []
    carry = 0  # the carry of an addition, the borrow of a subtraction
    for i in range(max(len(ra), len(rb))):
        x = int(ra[i]) if i < len(ra) else 0
        y = int(rb[i]) if i < len(rb) else 0
        if op == "+":
            total = x + y + carry
            digit, nxt = total % 10, total // 10
            lines.append(f"{x}+{y}+{carry}={total}, digit {digit}, carry {nxt}")
        else:
            total = x - y - carry
            if total < 0:
                digit, nxt = total + 10, 1
                lines.append(f"{x}-{y}-{carry}={total}, +10={digit}, digit {digit}, borrow 1")
            else:
                digit, nxt = total, 0
                lines.append(f"{x}-{y}-{carry}={total}, digit {digit}, borrow 0")
        digits.append(digit)
        carry = nxt
    if carry:  # only an addition ends with one (a >= b leaves no final borrow)
        lines.append("carry 1, digit 1")
        digits.append(1)
    digits.reverse()
    while len(digits) > 1 and digits[0] == 0:
        digits.pop(0)
    lines.append("digits " + " ".join(map(str, digits)))
    result = a + b if op == "+" else a - b
    assert int("".join(map(str, digits))) == result
    return "\n".join(lines), result


def _arith(rng: np.random.Generator, op: str) -> tuple[list[dict], list[dict] | None, Any]:
    a, b = _operand(rng), _operand(rng)
    if op == "-" and a < b:
        a, b = b, a
    question = _pick(rng, ARITH_QUESTIONS).format(a=a, b=b, op=op)
    trace, result = arithmetic_trace(a, b, op)
    return [_user(question), _assistant(f"{a}{op}{b}={result}", trace)], None, result


# ----------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------


def _whole(rng: np.random.Generator) -> int:
    """A whole part of 1 or 2 digits (0..9 or 10..99, each length half the time)."""
    return int(rng.integers(0, 10)) if _chance(rng, 0.5) else int(rng.integers(10, 100))


def _fraction(rng: np.random.Generator, length: int) -> str:
    """``length`` decimal digits, the last one nonzero."""
    head = "".join(str(int(d)) for d in rng.integers(0, 10, size=length - 1))
    return head + str(int(rng.integers(1, 10)))


MAX_DECIMALS = 3


def _padded(fa: str, fb: str) -> tuple[str, str]:
    """Both decimal parts padded with zeros to :data:`MAX_DECIMALS` digits (``11``, ``9`` -> ``110``, ``900``)."""
    return fa.ljust(MAX_DECIMALS, "0"), fb.ljust(MAX_DECIMALS, "0")


def compare_pair(rng: np.random.Generator) -> tuple[str, str]:
    """Two distinct decimals as text (1-2 whole digits, 1-3 decimals, last decimal nonzero), in random order.

    Hard cases dominate: 45% share the whole part and the longer decimal is the smaller number (9.11 vs 9.9),
    30% share the whole part otherwise, 25% draw both numbers freely.
    """
    u = rng.random()
    while True:
        if u < 0.45:
            whole = wb = _whole(rng)
            short = int(rng.integers(1, 3))
            fa = _fraction(rng, short)  # the shorter decimals, the bigger number
            fb = _fraction(rng, int(rng.integers(short + 1, 4)))
            pa, pb = _padded(fa, fb)
            if not pb < pa:
                continue
        elif u < 0.75:
            whole = wb = _whole(rng)
            fa, fb = _fraction(rng, int(rng.integers(1, 4))), _fraction(rng, int(rng.integers(1, 4)))
        else:
            whole, wb = _whole(rng), _whole(rng)
            fa, fb = _fraction(rng, int(rng.integers(1, 4))), _fraction(rng, int(rng.integers(1, 4)))
        x, y = f"{whole}.{fa}", f"{wb}.{fb}"
        if Decimal(x) != Decimal(y):
            break
    return (x, y) if _chance(rng, 0.5) else (y, x)


def compare_trace(x: str, y: str) -> tuple[str, str]:
    """The reasoning comparing decimals ``x`` and ``y`` (text) and the bigger one as written."""
    (wx, fx), (wy, fy) = x.split("."), y.split(".")
    bigger = x if Decimal(x) > Decimal(y) else y
    lines = [f"{x} vs {y}"]
    if int(wx) != int(wy):
        lines.append(f"whole parts: {wx} and {wy}, {wx} {'>' if int(wx) > int(wy) else '<'} {wy}")
        lines.append(f"so {bigger} is bigger")
    else:
        px, py = _padded(fx, fy)
        lines.append(f"whole parts: {wx} and {wy}, equal")
        lines.append(f"decimals padded: {px} and {py}")
        lines.append(f"{px} {'>' if px > py else '<'} {py}, so {bigger} is bigger")
    return "\n".join(lines), bigger


def _compare(rng: np.random.Generator) -> tuple[list[dict], list[dict] | None, Any]:
    x, y = compare_pair(rng)
    question = f"{_pick(rng, ('Which', 'which'))} one is bigger, {x} or {y}?"
    if _chance(rng, 0.3):
        question += " Think carefully." if question[0] == "W" else " think carefully."
    trace, bigger = compare_trace(x, y)
    smaller = y if bigger == x else x
    return [_user(question), _assistant(f"{bigger} is bigger than {smaller}.", trace)], None, bigger


# ----------------------------------------------------------------------------------------------------------
# tool_call / no_tool
# ----------------------------------------------------------------------------------------------------------

TOOLS: dict[str, dict] = {
    "get_weather": {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    "get_time": {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    "convert_currency": {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert money between currencies.",
            "parameters": {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
                "required": ["amount", "from", "to"],
            },
        },
    },
}
CITIES = (
    "Paris",
    "London",
    "Tokyo",
    "Beijing",
    "Berlin",
    "Madrid",
    "Rome",
    "Cairo",
    "Sydney",
    "Toronto",
    "Moscow",
    "Seoul",
)
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CNY")
UNITS_PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 150.0, "CNY": 7.2}
CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy")
WEATHER_QUESTIONS = (
    "What's the weather in {city}?",
    "What is the weather like in {city}?",
    "How is the weather in {city}?",
)
WEATHER_UNIT_QUESTIONS = (
    "What's the weather in {city} in {unit}?",
    "What is the weather like in {city} in {unit}?",
    "How is the weather in {city}, in {unit}?",
)
TIME_QUESTIONS = ("What time is it in {city}?", "What's the time in {city}?", "Tell me the time in {city}.")
CURRENCY_QUESTIONS = (
    "Convert {amount} {src} to {dst}.",
    "How much is {amount} {src} in {dst}?",
    "What is {amount} {src} in {dst}?",
)


def _number_text(x: float) -> str:
    """A number with at most 2 decimals, no trailing zeros (``231.5``, ``250``)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _number(text: str) -> int | float:
    """The JSON number of :func:`_number_text`'s text: an int without decimals."""
    return float(text) if "." in text else int(text)


def _tool_query(rng: np.random.Generator) -> dict[str, Any]:
    """One tool question: the call, its result, the final answer and the reasoning lines of each turn."""
    name = _pick(rng, tuple(TOOLS))
    city = _pick(rng, CITIES)
    if name == "get_weather":
        unit = _pick(rng, ("celsius", "fahrenheit")) if _chance(rng, 0.3) else None
        if unit:
            question = _pick(rng, WEATHER_UNIT_QUESTIONS).format(city=city, unit=unit)
            arguments = {"city": city, "unit": unit}
        else:
            question = _pick(rng, WEATHER_QUESTIONS).format(city=city)
            arguments = {"city": city}
        shown = unit or "celsius"
        temperature = int(rng.integers(-5, 36)) if shown == "celsius" else int(rng.integers(23, 96))
        condition = _pick(rng, CONDITIONS)
        result = {"city": city, "temperature": temperature, "unit": shown, "condition": condition}
        answer = f"It is {temperature} degrees {shown} and {condition} in {city}."
        facts = [str(temperature), shown, condition, city]
        asked = f"the weather in {city}" + (f" in {unit}" if unit else "")
        think = (
            f"The user asks for {asked}. I call get_weather.",
            f"The tool says {temperature} degrees {shown}, {condition}.",
        )
        missing = "No tools are available to look up the weather."
    elif name == "get_time":
        question = _pick(rng, TIME_QUESTIONS).format(city=city)
        arguments = {"city": city}
        time = f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
        result = {"city": city, "time": time}
        answer = f"It is {time} in {city}."
        facts = [time, city]
        think = (f"The user asks for the time in {city}. I call get_time.", f"The tool says it is {time}.")
        missing = "No tools are available to look up the time."
    else:
        src, dst = (CURRENCIES[int(i)] for i in rng.choice(len(CURRENCIES), size=2, replace=False))
        if _chance(rng, 0.5):
            amount = str(int(rng.integers(1, 1001)))
        else:
            amount = f"{int(rng.integers(0, 1000))}.{_fraction(rng, int(rng.integers(1, 3)))}"
        value = _number(amount) * UNITS_PER_USD[dst] / UNITS_PER_USD[src] * rng.uniform(0.97, 1.03)
        converted = _number_text(max(round(value, 2), 0.01))
        question = _pick(rng, CURRENCY_QUESTIONS).format(amount=amount, src=src, dst=dst)
        arguments = {"amount": _number(amount), "from": src, "to": dst}
        result = {"amount": _number(amount), "from": src, "to": dst, "result": _number(converted)}
        answer = f"{amount} {src} is {converted} {dst}."
        facts = [amount, src, converted, dst]
        think = (
            f"The user wants {amount} {src} in {dst}. I call convert_currency.",
            f"The tool says {converted} {dst}.",
        )
        missing = "No tools are available to convert currencies."
    return {
        "name": name,
        "arguments": arguments,
        "question": question,
        "result": result,
        "answer": answer,
        "facts": facts,
        "think": think,
        "missing": missing,
    }


def _declared_tools(rng: np.random.Generator, needed: str) -> list[dict]:
    """All three tools (60%) or the needed one plus a random subset of the others; in random order."""
    names = [n for n in TOOLS if n == needed or _chance(rng, 0.5)] if not _chance(rng, 0.6) else list(TOOLS)
    return [copy.deepcopy(TOOLS[names[int(i)]]) for i in rng.permutation(len(names))]


def _tool_call(rng: np.random.Generator) -> tuple[list[dict], list[dict] | None, Any]:
    q = _tool_query(rng)
    tools = _declared_tools(rng, q["name"])
    call_id = f"functions.{q['name']}:0"
    call = {"id": call_id, "type": "function", "function": {"name": q["name"], "arguments": json.dumps(q["arguments"])}}
    messages = [
        _user(q["question"]),
        _assistant("", q["think"][0], [call]),
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(q["result"])},
        _assistant(q["answer"], q["think"][1]),
    ]
    expected = {"name": q["name"], "arguments": q["arguments"], "answer_facts": q["facts"]}
    return messages, tools, expected


def _no_tool(rng: np.random.Generator) -> tuple[list[dict], list[dict] | None, Any]:
    q = _tool_query(rng)
    return [_user(q["question"]), _assistant(NO_TOOL_ANSWER, q["missing"])], None, NO_TOOL_ANSWER


# ----------------------------------------------------------------------------------------------------------
# image / video
# ----------------------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 215, 20),
    "orange": (250, 130, 10),
    "purple": (140, 50, 180),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
BACKGROUNDS = ("white", "black", "gray", "yellow")  # white 70% of the time
IMAGE_QUESTIONS = ("Describe this image.", "What is in this image?")
VIDEO_QUESTIONS = ("Describe this video.", "What happens in this video?")
DIRECTIONS = ("from left to right", "from right to left", "from top to bottom", "from bottom to top")
FRAME_INTERVAL = 0.5  # seconds between frames: the released processor's 2 fps keeps every one


def draw_shape(
    size: int, shape: str, color: str, background: str, center: tuple[float, float], radius: float
) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one filled ``shape`` (no antialiasing: exact palette colours).

    ``radius`` is the circle's radius, the triangle's and star's circumradius and 0.85x its value is the
    square's half side; the triangle and star are centred on their centroid.
    """
    image = Image.new("RGB", (size, size), PALETTE[background])
    draw = ImageDraw.Draw(image)
    cx, cy = center
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        h = 0.85 * radius
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape in ("triangle", "star"):
        points = 3 if shape == "triangle" else 10
        radii = [radius] if shape == "triangle" else [radius, 0.45 * radius]
        angles = -np.pi / 2 + 2 * np.pi * np.arange(points) / points
        draw.polygon(
            [
                (cx + radii[k % len(radii)] * np.cos(a), cy + radii[k % len(radii)] * np.sin(a))
                for k, a in enumerate(angles)
            ],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    return image


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL."""
    return data_url_bytes(url, "data URL")


def _image(rng: np.random.Generator, size: int) -> tuple[list[dict], list[dict] | None, Any]:
    shape, color = _pick(rng, SHAPES), _pick(rng, SHAPE_COLORS)
    choices = [b for b in BACKGROUNDS if b != color]
    if "white" in choices and _chance(rng, 0.7):
        background = "white"
    else:
        background = _pick(rng, [b for b in choices if b != "white"])
    radius = size * rng.uniform(0.22, 0.32)
    cx, cy = size / 2 + size * rng.uniform(-0.08, 0.08, size=2)
    url = png_data_url(draw_shape(size, shape, color, background, (float(cx), float(cy)), float(radius)))
    question = _pick(rng, IMAGE_QUESTIONS)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    answer = f"A {color} {shape} on a {background} background."
    think = f"I see one {color} {shape}; the background is {background}."
    expected = {"shape": shape, "color": color, "background": background}
    return [_user(content), _assistant(answer, think)], None, expected


def _video(rng: np.random.Generator, size: int) -> tuple[list[dict], list[dict] | None, Any]:
    shape = _pick(rng, SHAPES)
    color = _pick(rng, [c for c in SHAPE_COLORS if c != "white"])  # on white
    direction = _pick(rng, DIRECTIONS)
    frames = int(rng.integers(4, 9))
    radius = size * rng.uniform(0.12, 0.18)
    start, end = size * rng.uniform(0.2, 0.3), size * rng.uniform(0.7, 0.8)
    if direction in ("from right to left", "from bottom to top"):
        start, end = end, start
    across = size * rng.uniform(0.35, 0.65)
    urls = []
    for along in np.linspace(start, end, frames):
        center = (along, across) if direction in DIRECTIONS[:2] else (across, along)
        urls.append(png_data_url(draw_shape(size, shape, color, "white", (float(center[0]), float(center[1])), radius)))
    part = {"type": "video", "video": urls, "timestamps": [round(FRAME_INTERVAL * i, 3) for i in range(frames)]}
    question = _pick(rng, VIDEO_QUESTIONS)
    answer = f"A {color} {shape} moves {direction}."
    think = f"One {color} {shape} changes place {direction}."
    expected = {"shape": shape, "color": color, "direction": direction}
    return [_user([part, {"type": "text", "text": question}]), _assistant(answer, think)], None, expected


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

_BUILDERS = {
    "add": lambda rng, size: _arith(rng, "+"),
    "sub": lambda rng, size: _arith(rng, "-"),
    "compare": lambda rng, size: _compare(rng),
    "tool_call": lambda rng, size: _tool_call(rng),
    "no_tool": lambda rng, size: _no_tool(rng),
    "image": _image,
    "video": _video,
}


def sample(
    rng: np.random.Generator, task: str, *, mode: str | None = None, image_size: int = 56, instant: float = 0.5
) -> dict:
    """One sample of ``task`` drawn from ``rng``.

    A system message (from :data:`SYSTEM_PROMPTS`) comes first half the time. ``mode`` None draws the mode,
    instant with probability ``instant``; a given mode is used instead of the drawn one (the draw still happens,
    so the same generator state gives the same conversation in both modes, with and without reasoning).
    ``image_size`` is the side of image and video frames in pixels.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be 'thinking', 'instant' or None, got {mode!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if not 0.0 <= instant <= 1.0:
        raise ValueError(f"instant must be a probability in [0, 1], got {instant}")
    system = _chance(rng, 0.5)
    system_prompt = _pick(rng, SYSTEM_PROMPTS)
    drawn = "thinking" if _chance(rng, 1.0 - instant) else "instant"  # instant 0.5: the draws of earlier builds
    mode = mode or drawn
    messages, tools, expected = _BUILDERS[task](rng, image_size)
    if mode == "instant":
        for m in messages:
            m.pop("reasoning_content", None)
    if system:
        messages.insert(0, {"role": "system", "content": system_prompt})
    out: dict[str, Any] = {"messages": messages}
    if tools:
        out["tools"] = tools
    out["meta"] = {"task": task, "mode": mode, "expected": expected, "system": system}
    return out


def _weights(mix: Mapping[str, float] | None) -> np.ndarray:
    mix = DEFAULT_MIX if mix is None else mix
    unknown = sorted(set(mix) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks in mix: {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
    weights = np.array([float(mix.get(t, 0.0)) for t in TASKS])
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"mix weights must be finite, >= 0 and not all 0, got {dict(mix)}")
    return weights / weights.sum()


def generate(
    n: int, seed: int, *, mix: Mapping[str, float] | None = None, image_size: int = 56, instant: float = 0.5
) -> list[dict]:
    """``n`` samples, tasks drawn with the ``mix`` weights (:data:`DEFAULT_MIX`; missing tasks get 0), each in
    instant mode with probability ``instant`` (thinking mode otherwise).

    Sample ``i`` comes from its own generator ``np.random.default_rng([seed, i])``: the same seed gives the same
    list, and a longer list starts with the shorter one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights = _weights(mix)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        task = TASKS[int(rng.choice(len(TASKS), p=weights))]
        out.append(sample(rng, task, image_size=image_size, instant=instant))
    return out


def write_jsonl(samples: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Write samples one JSON object a line (``meta`` kept), atomically: ``path + ".tmp"`` then a rename."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def prompt_messages(s: Mapping) -> list[list[dict]]:
    """The evaluation prompts of a sample: for each assistant turn, the messages before it
    (tool_call samples give two: up to the user question, and up to the tool result).
    They go straight to ``k25jax.chat.prepare`` (which reads the data-URL images and frames)."""
    messages = s["messages"]
    return [list(messages[:i]) for i, m in enumerate(messages) if m.get("role") == "assistant"]


def _refuse_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are no JSON."""
    raise ValueError(f"{name} is not JSON")


def _arguments(value: Any) -> dict | None:
    """A call's arguments as a JSON object, or None where they are not one (strict JSON: no NaN)."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        return None
    try:
        parsed = json.loads(value, parse_constant=_refuse_constant)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _same_json(a: Any, b: Any) -> bool:
    """JSON values equal, numbers compared as numbers (1 == 1.0) but booleans only with booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _has_fact(text: str, fact: str) -> bool:
    """``fact`` occurs in ``text`` as a whole token (``18`` not inside ``180``, ``-18`` or ``18.5``)."""
    return re.search(rf"(?<![\w.\-]){re.escape(fact)}(?!\w|\.\d)", text) is not None


def score(s: Mapping, turn: int, content: str, tool_calls: list[dict]) -> dict[str, bool]:
    """Grade one generated assistant turn.

    ``turn`` indexes the sample's assistant turns (:func:`prompt_messages`); ``content`` is the reply text
    without reasoning; ``tool_calls`` the parsed calls as ``[{"name": str, "arguments": str}]`` (raw JSON text;
    OpenAI-shaped ``{"function": {...}}`` entries are read too). Returns named checks:

    - add / sub: ``correct``: the content ends with the exact result (after stripping whitespace and a final
      ``.``); ``no_tool_calls``;
    - compare: ``correct``: the first number in the content equals the expected one; ``no_tool_calls``;
    - tool_call turn 0: ``valid_json``: at least one call and every call's arguments are a JSON object;
      ``correct``: exactly one call, the expected name, the arguments equal as parsed JSON (numbers as numbers);
    - tool_call turn 1: ``correct``: every answer fact appears in the content as a whole token;
      ``no_tool_calls``;
    - no_tool: ``correct``: no tool calls and the content is exactly the expected text;
    - image / video: ``correct``: the content is exactly the expected text; ``no_tool_calls``.
    """
    meta = s["meta"]
    task, expected = meta["task"], meta["expected"]
    turns = sum(1 for m in s["messages"] if m.get("role") == "assistant")
    if not 0 <= turn < turns:
        raise ValueError(f"turn {turn} out of range: the sample has {turns} assistant turn(s)")
    text = content.strip()
    calls = [c.get("function", c) for c in tool_calls or []]
    no_calls = not calls
    if task in ("add", "sub"):
        m = re.search(r"-?\d+$", text.removesuffix(".").rstrip())
        return {"correct": m is not None and int(m.group()) == expected, "no_tool_calls": no_calls}
    if task == "compare":
        m = re.search(r"\d+(?:\.\d+)?", text)
        try:
            correct = m is not None and Decimal(m.group()) == Decimal(expected)
        except InvalidOperation:
            correct = False
        return {"correct": correct, "no_tool_calls": no_calls}
    if task == "tool_call":
        if turn == 0:
            parsed = [_arguments(c.get("arguments")) for c in calls]
            correct = (
                len(calls) == 1
                and calls[0].get("name") == expected["name"]
                and parsed[0] is not None
                and _same_json(parsed[0], expected["arguments"])
            )
            return {"valid_json": bool(calls) and all(p is not None for p in parsed), "correct": correct}
        return {"correct": all(_has_fact(text, f) for f in expected["answer_facts"]), "no_tool_calls": no_calls}
    if task == "no_tool":
        return {"correct": no_calls and text == expected}
    if task in ("image", "video"):
        return {"correct": text == _gold_text(s), "no_tool_calls": no_calls}
    raise ValueError(f"unknown task {task!r}")


def _gold_text(s: Mapping) -> str:
    """The expected reply text of an image or video sample, from its ``meta``."""
    e = s["meta"]["expected"]
    if s["meta"]["task"] == "image":
        return f"A {e['color']} {e['shape']} on a {e['background']} background."
    return f"A {e['color']} {e['shape']} moves {e['direction']}."
