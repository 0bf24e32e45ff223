"""The K2.5 chat format: render a message list to text and token ids, parse a generated reply.

Rules and golden strings: ``shared/docs/chat-format.md``. In short: no BOS; each message is a role header
(``<|im_user|>``, ``<|im_assistant|>`` or ``<|im_system|>`` + label + ``<|im_middle|>``), a body and
``<|im_end|>``; tools are declared first (TypeScript-style text, compact JSON when a schema cannot be
expressed); assistant turns carry ``<think>reasoning</think>``, dropped (``<think></think>``) for the history
up to the last assistant message without tool calls and everywhere when thinking is off; the generation
prompt opens an assistant turn with ``<think>`` (``<think></think>`` with thinking off).

Media: an image part renders ``<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`` + newline and
a video part ``<|kimi_k25_video_placeholder|>`` + newline; :func:`encode` expands them with token counts the
caller supplies, and :func:`prepare` preprocesses the parts (``k25jax.media``) and expands them with the counts
of their actual grids, returning the ids and the packed media for ``k25jax.generate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# The reply markers and parser live in chat_reply (the parser needs no rendering); re-exported here.
from k25jax.chat_reply import (  # noqa: E402, F401
    CALL_ARGS,
    CALL_BEGIN,
    CALL_END,
    END_THINK,
    EOS,
    IM_END,
    SECTION_BEGIN,
    SECTION_END,
    THINK,
    Reply,
    ReplyParser,
    parse,
    parse_ids,
)

# The media strings and rules have one home, the preprocessor; the chat format uses them as they are there.
from k25jax.vision.preprocess import IMAGE_PROMPT, MEDIA_PAD, VIDEO_PLACEHOLDER, expand_pads, video_prompt

HEADERS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}  # every other role: <|im_system|>


class ChatFormatError(ValueError):
    """A message list cannot be rendered; the message names the message index and field at fault."""


# --------------------------------------------------------------------------------------------------------
# Tool declarations (chat-format.md section 2)
# --------------------------------------------------------------------------------------------------------


class _Inexpressible(Exception):
    """A schema feature the TypeScript text cannot express: the declaration falls back to JSON."""


_UNSUPPORTED = ("oneOf", "allOf", "const", "not", "if", "then", "else", "patternProperties", "prefixItems")
_CONSTRAINTS = (
    "exclusiveMaximum",
    "exclusiveMinimum",
    "format",
    "maxItems",
    "maxLength",
    "maximum",
    "minItems",
    "minLength",
    "minimum",
    "multipleOf",
    "pattern",
    "uniqueItems",
)


def tool_declaration(tools: Sequence[Mapping]) -> str:
    """The ``tool_declare`` body: TypeScript-style text, or compact sorted JSON when that cannot be built."""
    text = typescript_or_none(tools)
    if text is not None:
        return text
    return json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def typescript_or_none(tools: Sequence[Mapping]) -> str | None:
    """:func:`typescript_tools`, or None where a schema cannot be expressed (the release's ``tools_ts_str``)."""
    try:
        return typescript_tools(tools)
    except _Inexpressible:
        return None


def typescript_tools(tools: Sequence[Mapping]) -> str:
    """``namespace functions {...}`` text of the ``type == "function"`` entries; raises ``_Inexpressible``."""
    functions = [t.get("function") for t in tools if isinstance(t, Mapping) and t.get("type") == "function"]
    if not functions or not all(isinstance(f, Mapping) and isinstance(f.get("name"), str) for f in functions):
        raise _Inexpressible("no well-formed function entries")
    blocks = [_function_block(f) for f in functions]
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(blocks) + "\n}\n"


def _function_block(fn: Mapping) -> str:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, Mapping) or params.get("type", "object") != "object":
        raise _Inexpressible("parameters must be an object schema")
    lines = []
    for name, schema in (params.get("$defs") or params.get("definitions") or {}).items():
        lines += _comment(schema.get("description"), "")
        lines.append(f"interface {name} {_object(schema, '')}")
    lines += _comment(fn.get("description"), "")
    lines.append(f"type {fn['name']} = (_: {_object(params, '')}) => any;")
    return "\n".join(lines)


def _comment(text: Any, indent: str) -> list[str]:
    if not text:
        return []
    return [f"{indent}// {line}" for line in str(text).split("\n")]


def _object(schema: Mapping, indent: str) -> str:
    """``{ fields }`` of an object schema: required fields (sorted), then optional ones (sorted, ``name?``)."""
    _check(schema)
    props = schema.get("properties") or {}
    if not props:
        return "{}"
    required = set(schema.get("required") or ())
    order = sorted(k for k in props if k in required) + sorted(k for k in props if k not in required)
    inner = indent + "  "
    fields = []
    for key in order:
        prop = props[key]
        if not isinstance(prop, Mapping):
            raise _Inexpressible(f"property {key!r} is not a schema")
        lines = _comment(prop.get("description"), inner)
        limits = {k: prop[k] for k in _CONSTRAINTS if k in prop}
        if limits:
            lines.append(f"{inner}// " + ", ".join(f"{k}: {_literal(v)}" for k, v in sorted(limits.items())))
        if "default" in prop:
            lines.append(f"{inner}// Default: {json.dumps(prop['default'], ensure_ascii=False)}")
        optional = "" if key in required else "?"
        lines.append(f"{inner}{key}{optional}: {_type(prop, inner)}")
        fields.append("\n".join(lines))
    return "{\n" + ",\n".join(fields) + f"\n{indent}}}"


def _type(schema: Mapping, indent: str) -> str:
    _check(schema)
    if "enum" in schema:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_type(s, indent) for s in schema["anyOf"])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_type({**schema, "type": k}, indent) for k in kind)
    if kind == "string":
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        items = schema.get("items")
        return f"Array<{_type(items, indent) if isinstance(items, Mapping) else 'any'}>"
    if kind == "object":
        return _object(schema, indent) if schema.get("properties") else "object"
    if kind is None:
        return "any"
    raise _Inexpressible(f"unknown type {kind!r}")


def _check(schema: Mapping) -> None:
    if not isinstance(schema, Mapping):
        raise _Inexpressible("schema is not an object")
    if any(k in schema for k in _UNSUPPORTED) or isinstance(schema.get("additionalProperties"), Mapping):
        raise _Inexpressible("schema uses a feature TypeScript text does not express")


def _literal(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------------------------------------
# Rendering (chat-format.md section 1)
# --------------------------------------------------------------------------------------------------------


def render(
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of ``messages`` (special tokens by name), as the K2.5 chat template renders it.

    This is the source of the format in k25jax: ``assets/chat_template.jinja`` (:func:`render_template`) is tested
    to give byte-identical strings.

    A ``reasoning_content`` of None renders as the text ``None`` (as the template does); an absent one as
    nothing.
    """
    spans = render_spans(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
    return "".join(span.text for span in spans)


class Span(NamedTuple):
    """A piece of rendered text: ``generated`` where the assistant writes it (what a model emits after the
    generation prompt), False for scaffolding (headers, ``<think>`` the prompt opens, other roles' turns)."""

    text: str
    generated: bool


def render_spans(
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
    for_training: bool = False,
) -> list[Span]:
    """:func:`render` cut into spans that say which text the assistant generates; their texts joined are
    :func:`render`'s string (``for_training=False``).

    Per assistant message the generated span is what a model emits after the generation prompt: with the
    reasoning kept, ``{reasoning}</think>{content}{tool calls}<|im_end|>`` (the prompt opened ``<think>``); as
    history or with thinking off, ``{content}{tool calls}<|im_end|>`` (``<think></think>`` is scaffolding, so no
    turn teaches closing a thought that was never written). Every span boundary sits beside a special token, so
    tokenizing span by span gives the ids of tokenizing the whole string.

    ``for_training``: render the last assistant message as generated rather than as history: history ends at the
    last assistant message without tool calls *before* it, so that message keeps its reasoning (with thinking
    on) and the text up to its generated span is exactly the prompt :func:`render` gives for the messages
    before it. Without it, a sample ending in a final answer would render that answer as history (reasoning
    dropped, chat-format.md section 1).
    """
    _validate(messages)
    out: list[Span] = []
    if tools:
        out.append(Span(f"<|im_system|>tool_declare<|im_middle|>{tool_declaration(tools)}{IM_END}", False))
    end = len(messages)  # history is decided among messages[:end]
    if for_training:
        end = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=end)
    history_end = max((i for i, m in enumerate(messages[:end]) if _is_final_answer(m)), default=-1)
    for i, m in enumerate(messages):
        role = m["role"]
        label = m.get("name") or role
        header = f"{HEADERS.get(role, '<|im_system|>')}{label}<|im_middle|>"
        if role == "assistant":
            reply = _body(m.get("content"), i) + _tool_calls_text(m.get("tool_calls"), i) + IM_END
            if i <= history_end or not thinking:
                out += [Span(header + THINK + END_THINK, False), Span(reply, True)]
            else:
                out += [Span(header + THINK, False), Span(_reasoning_text(m) + END_THINK + reply, True)]
        elif role == "tool":
            body = f"## Return of {m.get('tool_call_id', '')}\n" + _body(m.get("content"), i)
            out.append(Span(header + body + IM_END, False))
        else:
            out.append(Span(header + _body(m.get("content"), i) + IM_END, False))
    if add_generation_prompt:
        out.append(Span("<|im_assistant|>assistant<|im_middle|>" + (THINK if thinking else THINK + END_THINK), False))
    return out


def _is_final_answer(m: Mapping) -> bool:
    return m.get("role") == "assistant" and not m.get("tool_calls")


def _reasoning_text(m: Mapping) -> str:
    return str(m["reasoning_content"]) if "reasoning_content" in m else ""


def _validate(messages: Sequence[Mapping]) -> None:
    if isinstance(messages, Mapping | str):
        raise ChatFormatError("messages must be a list of message objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object, got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ChatFormatError(f"messages[{i}].role is required (system, user, assistant or tool)")


def _body(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ChatFormatError(f"messages[{index}].content must be a string, null or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            parts.append(IMAGE_PROMPT + "\n")
        elif kind in ("video", "video_url"):
            parts.append(VIDEO_PLACEHOLDER + "\n")
        else:
            raise ChatFormatError(
                f"messages[{index}].content[{j}].type must be text, image, image_url, video or video_url, got {kind!r}"
            )
    return "".join(parts)


def _tool_calls_text(calls: Any, index: int) -> str:
    if not calls:
        return ""
    out = [SECTION_BEGIN]
    for k, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ChatFormatError(f"messages[{index}].tool_calls[{k}] must be an object")
        fn = call.get("function", call)
        name = fn.get("name")
        if not isinstance(name, str):
            raise ChatFormatError(f"messages[{index}].tool_calls[{k}].function.name is required")
        call_id = call.get("id") or f"functions.{name}:{k}"  # the release convention when a client omits it
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append(f"{CALL_BEGIN}{call_id}{CALL_ARGS}{args}{CALL_END}")
    out.append(SECTION_END)
    return "".join(out)


def builtin_template() -> str:
    """k25jax's own Jinja template of the format (``assets/chat_template.jinja``), for :func:`render_template`."""
    from importlib import resources

    return (resources.files("k25jax") / "assets" / "chat_template.jinja").read_text(encoding="utf-8")


def render_template(
    template: str | None,
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """Render with a Jinja chat template (a release's own, or ``None`` for :func:`builtin_template`) as Hugging
    Face tokenizers do: a sandbox with ``trim_blocks``, ``lstrip_blocks``, the loop controls ``{% break %}`` and
    ``{% continue %}``, and ``tojson`` without ASCII escaping (keyword arguments as ``json.dumps``).

    The template gets ``messages``; ``tools`` with their keys sorted recursively (as the release passes them, so
    that a template's own ``tools | tojson(separators=(',', ':'))`` gives the JSON fallback of
    :func:`tool_declaration`); ``tools_ts_str``, the TypeScript-style declaration built by the code
    :func:`render` uses (None where a schema cannot be expressed: the template then falls back to JSON);
    ``tools_declaration``, the whole ``tool_declare`` body (:func:`tool_declaration`); ``thinking`` and
    ``add_generation_prompt``. :func:`render` is the source of the format; templates are tested against it.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _validate(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    return env.from_string(template if template is not None else builtin_template()).render(
        messages=list(messages),
        tools=_sorted_keys(list(tools)) if tools else None,
        tools_ts_str=typescript_or_none(tools) if tools else None,
        tools_declaration=tool_declaration(tools) if tools else "",
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
    )


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """The ``tojson`` filter of Hugging Face chat templates: ``json.dumps`` without ASCII escaping by default."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _sorted_keys(value: Any) -> Any:
    """``value`` with every mapping's keys in sorted order, recursively (lists keep their order)."""
    if isinstance(value, Mapping):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted_keys(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------
# Token ids with media expanded
# --------------------------------------------------------------------------------------------------------

# Per media part, in order: an image's placeholder-token count, or a video's chunks as
# (timestamp seconds or "HH:MM:SS.mmm", placeholder-token count) pairs. A callable gets the part itself.
MediaTokens = Sequence[int | Sequence[tuple[float | str, int]]] | Callable[[Mapping], Any]


def encode(
    messages: Sequence[Mapping],
    tokenizer,
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
    media: MediaTokens | None = None,
) -> list[int]:
    """Token ids of the rendered prompt with media placeholders expanded.

    Each image's single ``<|media_pad|>`` becomes as many pads as ``media`` gives for it (the vision tower's
    merged-token count, ``(h/2) * (w/2)``); each video placeholder becomes one
    ``HH:MM:SS.mmm<|media_begin|>video<|media_content|>{pads}<|media_end|>`` per chunk. Without ``media``, images
    keep one pad each and videos are an error.
    """
    text = render(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
    media_parts = [part for _, part in media_parts_of(messages)]
    infos = _media_infos(media_parts, media)
    pad_counts: list[int] = []
    pieces = text.split(VIDEO_PLACEHOLDER)
    expanded = [pieces[0]]
    videos = iter(info for part, info in zip(media_parts, infos, strict=True) if part["type"].startswith("video"))
    for piece in pieces[1:]:
        chunks = next(videos, None)
        if chunks is None:
            raise ChatFormatError(f"{VIDEO_PLACEHOLDER} written in message text has no video part to expand")
        expanded.append(video_prompt([ts for ts, _ in chunks]))
        expanded.append(piece)
    for part, info in zip(media_parts, infos, strict=True):
        pad_counts += [int(n) for _, n in info] if part["type"].startswith("video") else [int(info)]
    ids = tokenizer.encode("".join(expanded))
    try:
        return expand_pads(ids, pad_counts, tokenizer.token_id(MEDIA_PAD), counts_from="media give")
    except ValueError as err:  # e.g. a <|media_pad|> written in message text
        raise ChatFormatError(f"the prompt {err}") from None


_MEDIA_PART_TYPES = ("image", "image_url", "video", "video_url")


class TrainingTokens(NamedTuple):
    """A rendered conversation for training: token ids and, per token, 1 where the assistant generates it."""

    ids: list[int]
    generated: list[int]


def encode_for_training(
    messages: Sequence[Mapping],
    tokenizer,
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    media: MediaTokens | None = None,
) -> TrainingTokens:
    """Token ids of a whole conversation (no generation prompt, :func:`render_spans` with ``for_training``) with
    each token's ownership: 1 on the tokens the assistant generates (its reasoning and ``</think>`` where kept,
    content, tool-call markers and arguments, ``<|im_end|>``), 0 on headers, ``<think>`` and other roles' turns.

    The ids are those of ``tokenizer.encode`` of the joined text (span boundaries sit beside special tokens).
    Media parts need ``media``, as in :func:`encode` (per part an image's pad count or a video's
    ``[(timestamp, pad count), ...]``, e.g. from ``k25jax.media.load_part``): placeholders are expanded exactly
    as :func:`encode` expands them, so the ids equal a prompt's up to the generated spans. Media in an
    assistant message are refused (the model never writes them).
    """
    named = [(what, part) for what, part in media_parts_of(messages) if part.get("type") in _MEDIA_PART_TYPES]
    parts = [part for _, part in named]  # other part types are the renderer's to reject, by name
    if parts and media is None:
        raise ChatFormatError(
            f"{named[0][0]}: a {parts[0]['type']} part needs its token counts: pass media= (k25jax.media.load_part "
            "gives them)"
        )
    infos = _media_infos(parts, media) if parts else []
    videos = iter([info for part, info in zip(parts, infos, strict=True) if part["type"].startswith("video")])
    counts: list[int] = []
    for part, info in zip(parts, infos, strict=True):
        counts += [int(n) for _, n in info] if part["type"].startswith("video") else [int(info)]
    pad_id = tokenizer.token_id(MEDIA_PAD)  # a pad written in text without a media part is refused too
    ids: list[int] = []
    generated: list[int] = []
    used = 0
    for span in render_spans(messages, tools=tools, thinking=thinking, add_generation_prompt=False, for_training=True):
        text = span.text
        if VIDEO_PLACEHOLDER in text:
            pieces = text.split(VIDEO_PLACEHOLDER)
            out = [pieces[0]]
            for piece in pieces[1:]:
                chunks = next(videos, None)
                if chunks is None:
                    raise ChatFormatError(f"{VIDEO_PLACEHOLDER} written in message text has no video part to expand")
                out += [video_prompt([ts for ts, _ in chunks]), piece]
            text = "".join(out)
        piece = tokenizer.encode(text)
        pads = piece.count(pad_id)
        if pads:
            if span.generated:
                raise ChatFormatError("an assistant message holds media; training samples give media in user turns")
            if used + pads > len(counts):
                raise ChatFormatError(f"the conversation holds more {MEDIA_PAD} tokens than its media parts give")
            piece = expand_pads(piece, counts[used : used + pads], pad_id, counts_from="media give")
            used += pads
        ids += piece
        generated += [int(span.generated)] * len(piece)
    if used != len(counts):
        raise ChatFormatError(f"the media parts give {len(counts)} items but the text holds {used} {MEDIA_PAD} tokens")
    return TrainingTokens(ids, generated)


def media_parts_of(messages: Sequence[Mapping]) -> list[tuple[str, Mapping]]:
    """The image and video content parts of ``messages`` in prompt order, each with its name for errors
    (``messages[i].content[j]``)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") not in ("text", None):
                out.append((f"messages[{i}].content[{j}]", part))
    return out


class Prompt(NamedTuple):
    """A prompt ready for :func:`k25jax.generate`: token ids with media placeholders expanded, and the packed
    vision inputs of its images and video chunks in placeholder order (``k25jax.media.Media``, None without
    media)."""

    ids: list[int]
    media: Any


def prepare(
    messages: Sequence[Mapping],
    tokenizer,
    *,
    tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
    add_generation_prompt: bool = True,
    media_options=None,
) -> Prompt:
    """Render, tokenize and preprocess a message list: ``ids, media = prepare(...)``, then
    ``k25jax.generate(model, [ids], media=[media])``.

    Image parts (``{"type": "image", "image": SOURCE}`` or ``{"type": "image_url", "image_url": {"url": URL}}``)
    take a file path, encoded bytes, a ``PIL.Image``, a uint8 array, a ``file://`` or base64 ``data:`` URL.
    Video parts (``{"type": "video", "video": PATH_OR_FRAMES, "timestamps": [...]}``, or ``video_url``) take a
    video file (needs the ``video`` extra) or a list of frames with their times in seconds. Each image's pad
    run and each video chunk's timestamped block get the token counts of the actual preprocessed grids.
    ``media_options`` (``k25jax.media.MediaOptions``) changes the preprocessing; the defaults are the released
    processor's (16,384 patches per image, 2 fps and 4,096 patches per video frame). Unreadable media raises
    ``k25jax.vision.MediaError`` naming the part.
    """
    from k25jax.media import Media, MediaOptions, load_part

    options = media_options or MediaOptions()
    _validate(messages)
    loaded = [load_part(part, what, options) for what, part in media_parts_of(messages)]
    ids = encode(
        messages,
        tokenizer,
        tools=tools,
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
        media=[info for _, info in loaded],
    )
    if not loaded:
        return Prompt(ids, None)
    pixel_values = np.concatenate([m.pixel_values for m, _ in loaded])
    grid_thw = np.concatenate([np.asarray(m.grid_thw).reshape(-1, 3) for m, _ in loaded])
    return Prompt(ids, Media(pixel_values, grid_thw))


def _media_infos(parts: list[Mapping], media: MediaTokens | None) -> list[Any]:
    if media is None:
        if any(p["type"].startswith("video") for p in parts):
            raise ChatFormatError("video parts need their chunks (timestamps, token counts): pass media=...")
        return [1] * len(parts)
    if callable(media):
        return [media(p) for p in parts]
    media = list(media)
    if len(media) != len(parts):
        raise ChatFormatError(f"media gives {len(media)} entries for {len(parts)} image/video parts")
    return media
