"""Chat format: golden renderings (chat-format.md section 3), table tests of rendering and parsing."""

import json

import pytest

from k25jax.chat import ChatFormatError, encode, parse, parse_ids, render, render_template, tool_declaration
from k25jax.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = json.loads(
    '[{"type":"function","function":{"name":"get_weather","description":"Get the current weather for a city.",'
    '"parameters":{"type":"object","properties":{"city":{"type":"string","description":"City name"},'
    '"unit":{"type":"string","enum":["c","f"]}},"required":["city"]}}}]'
)
WEATHER_CALL = json.loads(
    '[{"id":"functions.get_weather:0","type":"function","function":{"name":"get_weather",'
    '"arguments":"{\\"city\\": \\"Paris\\"}"}}]'
)

# Golden strings, copied from chat-format.md section 3 (JSON string literals there).
GOLDEN_A = json.loads(
    '"<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|><|im_user|>user<|im_middle|>What is 2+2?'
    '<|im_end|><|im_assistant|>assistant<|im_middle|><think>"'
)
GOLDEN_B = json.loads(
    '"<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|><|im_user|>user<|im_middle|>What is 2+2?'
    '<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>"'
)
GOLDEN_C = json.loads(
    '"<|im_system|>tool_declare<|im_middle|># Tools\\n\\n## functions\\nnamespace functions {\\n// Get the current '
    'weather for a city.\\ntype get_weather = (_: {\\n  // City name\\n  city: string,\\n  unit?: \\"c\\" | \\"f\\"'
    "\\n}) => any;\\n}\\n<|im_end|><|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|><|im_user|>"
    "user<|im_middle|>Weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|><think>I should call the tool."
    "</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{\\"city\\": \\"Paris\\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>'
    '## Return of functions.get_weather:0\\n18C, clear<|im_end|><|im_assistant|>assistant<|im_middle|><think>"'
)
GOLDEN_D = "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"


def weather_conversation():
    return [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool.",
            "tool_calls": WEATHER_CALL,
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C, clear"},
    ]


def test_golden_renderings():
    question = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    assert render(question) == GOLDEN_A
    assert render(question, thinking=False) == GOLDEN_B
    assert render(weather_conversation(), tools=WEATHER_TOOL) == GOLDEN_C
    assert render([{"role": "user", "content": "hi"}]) == GOLDEN_D


U = "<|im_user|>user<|im_middle|>"
A = "<|im_assistant|>assistant<|im_middle|>"
E = "<|im_end|>"
TOOL = "<|im_system|>tool<|im_middle|>"
CALLS = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
)
IMAGE = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"

RENDER_TABLE = {
    # Past reasoning is dropped up to (and including) the last assistant message without tool calls.
    "history_reasoning_dropped": (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "r1"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "reasoning_content": "r2"},
            {"role": "user", "content": "e"},
        ],
        {},
        f"{U}a{E}{A}<think></think>b{E}{U}c{E}{A}<think></think>d{E}{U}e{E}{A}<think>",
    ),
    # Multi-turn tool loop: the finished turn's reasoning goes, the current loop (after it) keeps its own.
    "tool_loop_after_history": (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "call it", "tool_calls": WEATHER_CALL},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"},
            {"role": "assistant", "content": "It is 18C.", "reasoning_content": "answer"},
            {"role": "user", "content": "thanks"},
        ],
        {},
        f"{U}hi{E}{A}<think></think>hello{E}{U}Weather in Paris?{E}{A}<think></think>{CALLS}{E}"
        f"{TOOL}## Return of functions.get_weather:0\n18C{E}{A}<think></think>It is 18C.{E}{U}thanks{E}{A}<think>",
    ),
    "current_loop_keeps_reasoning": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "reasoning_content": "call", "tool_calls": WEATHER_CALL},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C", "name": "get_weather"},
        ],
        {},
        f"{U}Weather in Paris?{E}{A}<think>call</think>Let me check.{CALLS}{E}"
        f"<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n18C{E}{A}<think>",
    ),
    "thinking_off_drops_all_reasoning": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "call", "tool_calls": WEATHER_CALL},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"},
        ],
        {"thinking": False},
        f"{U}Weather in Paris?{E}{A}<think></think>{CALLS}{E}{TOOL}## Return of functions.get_weather:0\n18C{E}"
        f"{A}<think></think>",
    ),
    "dict_arguments_and_missing_id": (
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1, "b": "é"}}}]},
        ],
        {"add_generation_prompt": False},
        f"{U}x{E}{A}<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        '<|tool_call_argument_begin|>{"a": 1, "b": "é"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
    ),
    "media_parts_and_names": (
        [
            {"role": "system", "name": "rules", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image_url", "image_url": {"url": "a.png"}},
                    {"type": "image", "image": "b.png"},
                    {"type": "video_url", "video_url": {"url": "c.mp4"}},
                    {"type": "text", "text": "please."},
                ],
            },
        ],
        {},
        f"<|im_system|>rules<|im_middle|>{E}{U}Compare {IMAGE}{IMAGE}<|kimi_k25_video_placeholder|>\nplease.{E}"
        f"{A}<think>",
    ),
    "null_reasoning_renders_none_like_the_template": (
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": WEATHER_CALL},
        ],
        {"add_generation_prompt": False},
        f"{U}q{E}{A}<think>None</think>{CALLS}{E}",
    ),
}


@pytest.mark.parametrize("case", sorted(RENDER_TABLE))
def test_render_table(case):
    messages, kwargs, expected = RENDER_TABLE[case]
    assert render(messages, **kwargs) == expected


def _tool(name, params, description=None):
    fn = {"name": name, "parameters": params}
    if description:
        fn["description"] = description
    return {"type": "function", "function": fn}


def test_typescript_declaration_features():
    params = {
        "type": "object",
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels\nat most three"},
            "count": {"type": "integer", "minimum": 0, "maximum": 9, "default": 3},
            "where": {"$ref": "#/$defs/Point"},
            "mode": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "opts": {"type": "object", "properties": {"fast": {"type": "boolean", "description": "Go fast"}}},
            "flag": {"type": ["boolean", "null"]},
        },
        "required": ["where", "count"],
    }
    text = tool_declaration([_tool("plot", params, "Plot points."), _tool("ping", {"type": "object"})])
    assert text == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "interface Point {\n  x?: number,\n  y?: number\n}\n"
        "// Plot points.\n"
        "type plot = (_: {\n"
        "  // maximum: 9, minimum: 0\n  // Default: 3\n  count: number,\n"
        "  where: Point,\n"
        "  flag?: boolean | null,\n"
        "  mode?: string | null,\n"
        "  opts?: {\n    // Go fast\n    fast?: boolean\n  },\n"
        "  // Labels\n  // at most three\n  tags?: Array<string>\n"
        "}) => any;\n"
        "type ping = (_: {}) => any;\n}\n"
    )


def test_inexpressible_schema_falls_back_to_sorted_compact_json():
    tools = [_tool("pick", {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"}]}}}), {"type": "x"}]
    text = tool_declaration(tools)
    assert text == json.dumps(tools, separators=(",", ":"), sort_keys=True)
    assert text.startswith('[{"function":{"name":"pick","parameters":{"properties":{"v":{"oneOf"')


def test_render_errors_name_the_message():
    with pytest.raises(ChatFormatError, match=r"messages\[1\].role"):
        render([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content\[1\].type"):
        render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}])


def test_encode_expands_media_placeholders():
    tok = Tokenizer.tiny()
    pad = tok.token_id("<|media_pad|>")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "b.mp4"},
                {"type": "image", "image": "c.png"},
            ],
        }
    ]
    ids = encode(messages, tok, media=[4, [(0.0, 3), (2.5, 2)], 6])
    assert ids.count(pad) == 4 + 3 + 2 + 6
    pads = "<|media_pad|>"
    video = "<|media_begin|>video<|media_content|>"
    assert tok.decode(ids) == (
        f"{U}<|media_begin|>image<|media_content|>{pads * 4}<|media_end|>\nand"
        f"00:00:00.000{video}{pads * 3}<|media_end|>00:00:02.500{video}{pads * 2}<|media_end|>\n"
        f"<|media_begin|>image<|media_content|>{pads * 6}<|media_end|>\n{E}{A}<think>"
    )
    # Runs of pads: 4 for the first image, 3 and 2 for the video chunks, 6 for the last image.
    runs, run = [], 0
    for t in ids + [-1]:
        if t == pad:
            run += 1
        elif run:
            runs, run = runs + [run], 0
    assert runs == [4, 3, 2, 6]
    # A callback gives the counts per part; without media, images keep one pad and videos are an error.
    counts = encode(messages, tok, media=lambda p: [(1, 5)] if p["type"] == "video" else 2)
    assert counts.count(pad) == 9
    with pytest.raises(ChatFormatError, match="video parts need"):
        encode(messages, tok)
    with pytest.raises(ChatFormatError, match="3 image/video parts"):
        encode(messages, tok, media=[1, 2])
    image_only = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert encode(image_only, tok).count(pad) == 1


def test_encode_matches_tokenizing_the_rendering():
    tok = Tokenizer.tiny()
    ids = encode(weather_conversation(), tok, tools=WEATHER_TOOL)
    assert ids == tok.encode(GOLDEN_C)
    assert tok.decode(ids) == GOLDEN_C
    assert ids[0] == tok.token_id("<|im_system|>") and ids[-1] == tok.token_id("<think>")


PARSE_TABLE = {
    "reasoning_and_answer": (
        "Let me add.</think>2+2 = 4<|im_end|>",
        {},
        ("Let me add.", "2+2 = 4", [], 0),
    ),
    "instant_mode": ("Four.<|im_end|>", {"thinking": False}, ("", "Four.", [], 0)),
    "two_tool_calls": (
        "Need data.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
        {},
        (
            "Need data.",
            "Checking.",
            [
                ("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
                ("functions.get_time:1", "get_time", "{}"),
            ],
            0,
        ),
    ),
    "tool_call_without_think_close": (
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}'
        "<|tool_call_end|><|tool_calls_section_end|>",
        {},
        ("", "", [("functions.f:0", "f", '{"a": 1}')], 1),
    ),
    "unfinished_thought": ("still thinking", {}, ("still thinking", "", [], 1)),
    # A call cut by max_tokens is dropped (its arguments are not known whole), never closed by guesswork.
    "unclosed_section_and_call_truncated_json_dropped": (
        "ok</think><|tool_calls_section_begin|><|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>"
        '{"q": "jax", "opts": {"n": 3',
        {},
        ("ok", "", [], 2),
    ),
    "invalid_json_dropped": (
        "</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
        "city=Paris<|tool_call_end|><|tool_calls_section_end|>",
        {},
        ("", "", [], 1),
    ),
    "back_to_back_sections_with_narration": (
        "r</think>a<|tool_calls_section_begin|><|tool_call_begin|>functions.weather.lookup:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>b<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get-weather.v2:1<|tool_call_argument_begin|>{"x": 1}<|tool_call_end|>'
        "<|tool_calls_section_end|>c<|im_end|>",
        {},
        (
            "r",
            "abc",
            [
                ("functions.weather.lookup:0", "weather.lookup", "{}"),
                ("functions.get-weather.v2:1", "get-weather.v2", '{"x": 1}'),
            ],
            0,
        ),
    ),
    "stray_section_end_dropped": ("r</think>a<|tool_calls_section_end|>b<|im_end|>", {}, ("r", "ab", [], 1)),
    "call_inside_reasoning_ends_it": (
        "hmm<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
        "<|tool_call_end|><|tool_calls_section_end|>after</think>x<|im_end|>",
        {},
        ("hmm", "afterx", [("functions.f:0", "f", "{}")], 2),
    ),
    "instant_mode_is_content": ("a</think>b<|im_end|>", {"thinking": False}, ("", "ab", [], 1)),
    "missing_argument_marker_and_empty_name": (
        "r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_end|>"
        "<|tool_call_begin|><|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>tail",
        {},
        ("r", "tail", [("functions.f:0", "f", "{}")], 2),
    ),
    "leading_think_repeated": ("<think>a</think>b[EOS]ignored", {}, ("a", "b", [], 0)),
}


@pytest.mark.parametrize("case", sorted(PARSE_TABLE))
def test_parse_table(case):
    text, kwargs, (reasoning, content, calls, n_errors) = PARSE_TABLE[case]
    reply = parse(text, **kwargs)
    assert reply.reasoning_content == reasoning
    assert reply.content == content
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == calls
    assert all(c["type"] == "function" for c in reply.tool_calls)
    assert len(reply.errors) == n_errors, reply.errors


def test_parsed_reply_renders_back_to_the_generated_text():
    """In the current tool loop an assistant message renders exactly as it was generated."""
    tok = Tokenizer.tiny()
    generated = (
        "I should call the tool.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    )
    ids = tok.encode(generated)
    reply = parse_ids(ids, tok)
    messages = [SYSTEM, {"role": "user", "content": "Weather in Paris?"}, reply.message()]
    messages.append({"role": "tool", "tool_call_id": reply.tool_calls[0]["id"], "content": "18C, clear"})
    assert render(messages, tools=WEATHER_TOOL) == GOLDEN_C
    prompt = render(messages[:2], tools=WEATHER_TOOL)
    assert render(messages[:3], tools=WEATHER_TOOL, add_generation_prompt=False) == prompt + generated


def test_parse_never_raises_on_garbage():
    tok = Tokenizer.tiny()
    import random

    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 30))]
        reply = parse_ids(ids, tok)
        assert isinstance(reply.content, str) and isinstance(reply.tool_calls, list)


def test_jinja_template_agrees_with_the_python_renderer():
    """k25jax's own Jinja template (sandboxed, trim_blocks, lstrip_blocks) gives identical strings."""
    question = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    assert render_template(None, question) == GOLDEN_A
    assert render_template(None, question, thinking=False) == GOLDEN_B
    assert render_template(None, weather_conversation(), tools=WEATHER_TOOL) == GOLDEN_C
    assert render_template(None, [{"role": "user", "content": "hi"}]) == GOLDEN_D
    for case, (messages, kwargs, expected) in RENDER_TABLE.items():
        assert render_template(None, messages, **kwargs) == expected, case


# Conversations both renderers must agree on, each rendered with thinking on and off, with and without the
# generation prompt: (messages, tools).
ODD_TOOL = [_tool("pick", {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"}]}}}, "Pick é.")]
CONVERSATIONS = {
    "system_and_question": ([SYSTEM, {"role": "user", "content": "What is 2+2?"}], None),
    "multi_turn_past_reasoning_dropped": (RENDER_TABLE["history_reasoning_dropped"][0], None),
    "tools_declared_call_and_result": (weather_conversation(), WEATHER_TOOL),
    "tool_loop_after_history": (RENDER_TABLE["tool_loop_after_history"][0], WEATHER_TOOL),
    "json_fallback_tools_two_calls": (
        [
            SYSTEM,
            {"role": "user", "content": "Pick two."},
            {
                "role": "assistant",
                "content": "Picking.",
                "reasoning_content": "two calls",
                "tool_calls": [
                    {"function": {"name": "pick", "arguments": {"v": "é", "n": [1, 2]}}},
                    {"id": "functions.pick:1", "type": "function", "function": {"name": "pick", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "name": "pick", "tool_call_id": "functions.pick:0", "content": "a"},
            {"role": "tool", "tool_call_id": "functions.pick:1", "content": [{"type": "text", "text": "b"}]},
        ],
        ODD_TOOL,
    ),
    "no_function_tools": ([{"role": "user", "content": "x"}], [{"type": "retrieval", "b": 1, "a": {"d": 2, "c": 3}}]),
    "media_placeholders": (RENDER_TABLE["media_parts_and_names"][0], None),
    "media_answer_and_null_reasoning": (
        [
            {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Why?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}], "reasoning_content": "seen"},
            {"role": "user", "content": "And in Paris?"},
            {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": WEATHER_CALL},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": [{"type": "image", "image": "p"}]},
        ],
        WEATHER_TOOL,
    ),
}
FLAGS = [(thinking, prompt) for thinking in (True, False) for prompt in (True, False)]


@pytest.mark.parametrize("thinking, add_generation_prompt", FLAGS)
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_builtin_template_is_byte_identical_to_render(case, thinking, add_generation_prompt):
    """``render`` is the source; ``assets/chat_template.jinja`` must give the same bytes for every feature."""
    messages, tools = CONVERSATIONS[case]
    kw = dict(tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
    expected = render(messages, **kw)
    assert render_template(None, messages, **kw).encode() == expected.encode()


def test_conversations_cover_the_format():
    """The conversations above exercise each rule (so that the identity test means something)."""
    texts = {case: render(m, tools=t) for case, (m, t) in CONVERSATIONS.items()}
    assert texts["tools_declared_call_and_result"] == GOLDEN_C
    assert texts["json_fallback_tools_two_calls"].startswith('<|im_system|>tool_declare<|im_middle|>[{"function"')
    assert texts["json_fallback_tools_two_calls"].count("<|tool_call_begin|>") == 2
    assert '{"v": "é", "n": [1, 2]}' in texts["json_fallback_tools_two_calls"]
    assert texts["no_function_tools"].startswith('<|im_system|>tool_declare<|im_middle|>[{"a":{"c":3,"d":2},"b":1,')
    everything = "".join(texts.values())
    assert "<think></think>b" in texts["multi_turn_past_reasoning_dropped"] and "r1" not in everything
    assert texts["media_placeholders"].count(IMAGE) == 2 and everything.count("<|kimi_k25_video_placeholder|>\n") == 2
    assert "<think>None</think>" in texts["media_answer_and_null_reasoning"] and "seen" not in everything
    off = render(*CONVERSATIONS["tools_declared_call_and_result"][:1], tools=WEATHER_TOOL, thinking=False)
    assert "I should call the tool." not in off and off.endswith("<think></think>")


# A release-style template written for this test: the history end found with a reversed loop and
# {% break %}, parts skipped with {% continue %}, the declaration from tools_ts_str with a JSON fallback.
RELEASE_STYLE_TEMPLATE = """
{%- macro body(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}{{ part.text }}{%- continue -%}{%- endif -%}
{%- if part.type.startswith('image') -%}
<|media_begin|>image<|media_content|><|media_pad|><|media_end|>{{ '\\n' }}
{%- continue -%}
{%- endif -%}
<|kimi_k25_video_placeholder|>{{ '\\n' }}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>
{%- if tools_ts_str -%}{{ tools_ts_str }}{%- else -%}{{ tools | tojson(separators=(',', ':')) }}{%- endif -%}
<|im_end|>
{%- endif -%}
{%- set state = namespace(last_answer=-1) -%}
{%- for m in messages | reverse -%}
{%- if m.role == 'assistant' and not m.tool_calls -%}
{%- set state.last_answer = messages | length - loop.index -%}
{%- break -%}
{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}<|im_user|>{%- elif m.role == 'assistant' -%}<|im_assistant|>
{%- else -%}<|im_system|>{%- endif -%}
{{ m.name or m.role }}<|im_middle|>
{%- if m.role == 'assistant' -%}
<think>{%- if thinking and loop.index0 > state.last_answer -%}{{ m.reasoning_content }}{%- endif -%}</think>
{{- body(m.content) -}}
{%- if m.tool_calls -%}
<|tool_calls_section_begin|>
{%- for call in m.tool_calls -%}
{%- set fn = call.function or call -%}
<|tool_call_begin|>{{ call.id or ('functions.' ~ fn.name ~ ':' ~ loop.index0) }}<|tool_call_argument_begin|>
{%- if fn.arguments is string -%}{{ fn.arguments }}{%- elif fn.arguments is defined -%}{{ fn.arguments | tojson }}
{%- else -%}{}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endif -%}
{%- elif m.role == 'tool' -%}## Return of {{ m.tool_call_id }}{{ '\\n' }}{{ body(m.content) }}
{%- else -%}{{ body(m.content) }}
{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|><think>{%- if not thinking -%}</think>{%- endif -%}
{%- endif -%}
"""


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_release_style_template_renders_like_render(case, thinking):
    """A template with loop controls that reads ``tools_ts_str`` renders byte-identical to ``render``, with
    TypeScript tools, JSON-fallback tools (its own ``tojson`` of the key-sorted tools) and no tools."""
    messages, tools = CONVERSATIONS[case]
    expected = render(messages, tools=tools, thinking=thinking)
    assert render_template(RELEASE_STYLE_TEMPLATE, messages, tools=tools, thinking=thinking) == expected
    if tools is WEATHER_TOOL:
        assert "namespace functions {" in expected  # the tools_ts_str path
    elif tools is not None:
        assert expected.startswith('<|im_system|>tool_declare<|im_middle|>[{"')  # the JSON fallback path


def test_video_chunk_timestamps_follow_the_preprocessor():
    """The chat's video blocks use the preprocessor's timestamp rule (nearest millisecond, halves up)."""
    from k25jax.vision.preprocess import format_timestamp

    tok = Tokenizer.tiny()
    messages = [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]
    seconds = [0.0625, 12.0625, 2.3, 3725.5]  # 62.5 and 12062.5 ms are exact ties in binary
    text = tok.decode(encode(messages, tok, media=[[(s, 1) for s in seconds]]))
    stamps = [block.split("<|media_begin|>")[0] for block in text.split("<|media_end|>")[:-1]]
    assert stamps == [U + "00:00:00.063", "00:00:12.063", "00:00:02.300", "01:02:05.500"]
    assert stamps[1:] == [format_timestamp(s) for s in seconds[1:]]
    with pytest.raises(ValueError, match="timestamp must be a finite number of seconds >= 0, got -1.0"):
        encode(messages, tok, media=[[(-1.0, 1)]])
    text_pad = [{"role": "user", "content": [{"type": "text", "text": "<|media_pad|>"}, {"type": "image"}]}]
    with pytest.raises(ChatFormatError, match=r"hold 2 <\|media_pad\|> placeholders \(id 1045\) but media give 1"):
        encode(text_pad, tok, media=[4])
