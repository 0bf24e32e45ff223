"""The K2.5 tokenizer: tiktoken byte-level BPE plus 256 reserved special tokens.

A release ships ``tiktoken.model`` (one ``base64(token) rank`` pair per line, 163584 ranks); the 256 ids after
the last rank are special tokens (architecture doc section 5, chat-format.md section 4). The pre-tokenisation
pattern below is the release's, alternative by alternative, including the ``&&`` class intersections that
keep Han characters out of the letter runs; tiktoken's regex engine accepts them as written (``regex`` needs
``flags=regex.V1`` for the same meaning, see :func:`pretokenize`).

The embedded tiny tokenizer (``Tokenizer.tiny()``) has 1024 ranks and the same 256 specials at 1024..1279,
matching ``k25jax.config.tiny()``. Its ranks ship in ``k25jax/assets/tiny_tiktoken.model``.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources

NUM_SPECIAL = 256

# The release pre-tokenisation pattern (joined with "|"): Han runs; letter runs that keep case-changes apart
# (upper-then-lower and the reverse), with English contractions; 1-3 digit groups; punctuation runs with
# trailing newlines; newline runs; trailing whitespace; other whitespace.
PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Named special tokens by offset from the first special id (163584 in the release, 1024 in the tiny one).
SPECIAL_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "<|media_begin|>": 18,
    "<|media_content|>": 19,
    "<|media_end|>": 20,
    "<|media_pad|>": 21,
    "<think>": 22,
    "</think>": 23,
    "[UNK]": 254,
    "[PAD]": 255,
}


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or an id is outside the vocabulary. Names the file or id."""


def default_special_tokens(first_id: int) -> dict[str, int]:
    """The 256 special tokens starting at ``first_id``: the named ones, the rest ``<|reserved_token_{id}|>``."""
    by_offset = {off: name for name, off in SPECIAL_OFFSETS.items()}
    return {by_offset.get(i, f"<|reserved_token_{first_id + i}|>"): first_id + i for i in range(NUM_SPECIAL)}


def special_token_id(first_id: int, name: str) -> int:
    """Id of the named special token in a block starting at ``first_id`` (``[BOS]`` is the first)."""
    try:
        return first_id + SPECIAL_OFFSETS[name]
    except KeyError:
        raise TokenizerError(f"unknown special token {name!r}; known: {sorted(SPECIAL_OFFSETS)}") from None


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``tiktoken.model`` file: lines ``base64(token) rank``; ranks must be exactly ``0 .. n-1``.

    (tiktoken's own loader caches by path string in a temp directory, which can serve a stale file; reading
    the format directly also lets errors name the line.)
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except ValueError as e:
            raise TokenizerError(f"{path}:{lineno}: cannot parse {line[:80]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice (ranks {ranks[token]}, {rank})")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


def write_tiktoken_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write ``ranks`` in the ``tiktoken.model`` format, ordered by rank."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def pretokenize(text: str, pattern: str = PATTERN) -> list[str]:
    """Split ``text`` into the pieces BPE runs on, with the ``regex`` package (V1 semantics for ``&&``)."""
    import regex

    return regex.findall(pattern, text, flags=regex.V1)


class Tokenizer:
    """Byte-level BPE (tiktoken) with 256 special tokens after the last rank.

    ``encode`` allows special tokens written in the text by default (as the release tokenizer does);
    ``decode`` renders them by name.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int] | None = None,
        *,
        pattern: str = PATTERN,
        name: str = "k25",
    ):
        import tiktoken

        self.num_base = len(mergeable_ranks)
        specials = dict(special_tokens) if special_tokens is not None else default_special_tokens(self.num_base)
        bad = {k: v for k, v in specials.items() if not self.num_base <= v < self.num_base + NUM_SPECIAL}
        if bad:
            raise TokenizerError(
                f"special tokens {bad} lie outside the reserved ids {self.num_base}..{self.num_base + NUM_SPECIAL - 1}"
            )
        self.special_tokens = specials
        self.special_names = {v: k for k, v in specials.items()}
        self.pattern = pattern
        self._enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=dict(mergeable_ranks), special_tokens=specials
        )

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, special_tokens: Mapping[str, int] | None = None) -> Tokenizer:
        """A tokenizer from a ``tiktoken.model`` file; specials default to the release table."""
        return cls(read_tiktoken_ranks(path), special_tokens)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer from a release directory: ``tiktoken.model`` and, if present, the special-token names of
        ``tokenizer_config.json`` (``added_tokens_decoder``), which override the built-in table. ``"tiny"`` is the
        shipped demo release's tokenizer."""
        from k25jax.demo.shipped import resolve

        path = resolve(path)
        model_file = os.path.join(path, "tiktoken.model") if os.path.isdir(path) else path
        ranks = read_tiktoken_ranks(model_file)
        specials = default_special_tokens(len(ranks))
        config_file = os.path.join(os.path.dirname(model_file), "tokenizer_config.json")
        if os.path.exists(config_file):
            specials = _specials_from_config(config_file, len(ranks), specials)
        return cls(ranks, specials)

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The embedded tiny tokenizer: 1024 ranks + 256 specials (vocab 1280, ``k25jax.config.tiny()``)."""
        with resources.as_file(resources.files("k25jax") / "assets" / "tiny_tiktoken.model") as p:
            return cls(read_tiktoken_ranks(p), name="k25-tiny")

    # -- vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_base + NUM_SPECIAL

    def token_id(self, name: str) -> int:
        """Id of a special token by name (``"<|im_end|>"``)."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"no special token {name!r} in this tokenizer") from None

    @property
    def bos_id(self) -> int:
        return self.token_id("[BOS]")

    @property
    def eos_id(self) -> int:
        return self.token_id("[EOS]")

    @property
    def im_end_id(self) -> int:
        return self.token_id("<|im_end|>")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: ``<|im_end|>`` and ``[EOS]``."""
        return (self.im_end_id, self.eos_id)

    def is_special(self, token: int) -> bool:
        return token in self.special_names

    # -- encode / decode -------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; special-token names in the text become their ids unless ``allow_special`` is
        False (then they are encoded as plain text)."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all", disallowed_special=())
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens by name; invalid UTF-8 replaced with U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental decoding: feed ids one at a time, get the text completed so far.

    Bytes of a UTF-8 character split across tokens are held back until the rest arrives (the standard
    library's incremental UTF-8 decoder).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _specials_from_config(path: str, first_id: int, specials: dict[str, int]) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object")
    by_id = {v: k for k, v in specials.items()}
    for key, entry in decoder.items():
        try:
            token_id = int(key)
            content = entry["content"]
        except (ValueError, TypeError, KeyError):
            raise TokenizerError(f"{path}: added_tokens_decoder[{key!r}] needs an integer id and a 'content'") from None
        if not first_id <= token_id < first_id + NUM_SPECIAL:
            raise TokenizerError(
                f"{path}: added_tokens_decoder[{key!r}] lies outside the reserved ids "
                f"{first_id}..{first_id + NUM_SPECIAL - 1}"
            )
        by_id[token_id] = content
    return {name: i for i, name in by_id.items()}
