"""Tokenizer: tiktoken files built here (nothing downloaded), specials, pre-tokenisation, the tiny default."""

import json
import os

import pytest
from tiktoken._educational import bpe_encode, bpe_train

from k25jax.assets import make_tiny_tokenizer
from k25jax.config import tiny
from k25jax.tokenizer import (
    PATTERN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    pretokenize,
    read_tiktoken_ranks,
    write_tiktoken_ranks,
)

CORPUS = (
    "Hello world! Hello there, world. The model's tokens aren't many; they'll do. 12345 + 678 = 13023.\n"
    "你好世界，你好。CamelCaseWords and snake_case_words.\n\n  Indented   text\twith tabs.\r\nÉcole Ünïcode ñ.\n"
) * 3


@pytest.fixture(scope="module")
def ranks():
    return bpe_train(CORPUS, 330, "(?V1)" + PATTERN, visualise=None)


@pytest.fixture
def bpe_dir(tmp_path, ranks):
    write_tiktoken_ranks(ranks, tmp_path / "tiktoken.model")
    return tmp_path


def test_release_layout_specials(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir)
    n = 330
    assert tok.num_base == n and tok.vocab_size == n + 256
    # The release ids 163584.. shifted to this file's 330..: chat-format.md section 4.
    expected = {
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
    for name, offset in expected.items():
        assert tok.token_id(name) == n + offset
    assert len(tok.special_tokens) == 256
    assert tok.decode([n + 5]) == f"<|reserved_token_{n + 5}|>"
    assert tok.stop_ids == (n + 2, n + 1)


def test_tokenizer_config_names_override(bpe_dir):
    config = {"added_tokens_decoder": {"335": {"content": "<|custom|>", "special": True}}}
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(bpe_dir)
    assert tok.token_id("<|custom|>") == 335 and tok.decode([335]) == "<|custom|>"
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"12": {"content": "x"}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: added_tokens_decoder\['12'\] lies outside"):
        Tokenizer.from_pretrained(bpe_dir)


def test_encode_decode_round_trip(bpe_dir):
    tok = Tokenizer.from_file(bpe_dir / "tiktoken.model")
    text = "Hello world, 你好！ emoji 🙂 and café\n\n\tend"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges apply
    with_specials = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    ids = tok.encode(with_specials)
    assert ids[0] == tok.token_id("<|im_user|>") and ids[-1] == tok.im_end_id
    plain = tok.encode(with_specials, allow_special=False)
    assert all(i < tok.num_base for i in plain) and tok.decode(plain) == with_specials
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_pretokenisation_matches_the_pattern_split(bpe_dir, ranks):
    """tiktoken's regex engine splits exactly as ``regex`` with V1 semantics (``&&`` intersections)."""
    tok = Tokenizer.from_file(bpe_dir / "tiktoken.model")
    text = CORPUS + "HTTPServer's XMLHttpRequest ÀbcDEF 北京Beijing上海 x1234567 '  \n\n  tail  "
    pieces = pretokenize(text)
    assert "".join(pieces) == text
    # Each piece BPE-encoded on its own (the reference BPE, no further splitting) gives tiktoken's ids.
    ids = tok.encode(text)
    assert ids == [i for p in pieces for i in tok.encode(p)]
    assert ids == [i for p in pieces for i in bpe_encode(ranks, p.encode(), visualise=None)]
    assert max(len(p) for p in pieces) >= 6 and len(ids) < len(text)  # multi-character pieces, merged tokens
    # Hand-checked splits: Han runs apart from Latin letters, case changes, contractions, 3-digit groups.
    assert pretokenize("北京Beijing上海") == ["北京", "Beijing", "上海"]
    assert pretokenize("CamelCase HTTPServer's") == ["Camel", "Case", " HTTPServer's"]
    assert pretokenize("they'll x1234567") == ["they'll", " x", "123", "456", "7"]
    assert pretokenize("a  \n\n  b") == ["a", "  \n\n", " ", " b"]
    # Without V1, ``regex`` reads ``[...&&[^\p{Han}]]`` as a class followed by a literal "]": no letter run matches
    # and findall drops the letters.
    import regex

    assert regex.findall(PATTERN, "é北京") == ["北京"] and pretokenize("é北京") == ["é", "北京"]


def _prefix_chain_ranks(words):
    """Byte ranks 0..255, then every prefix (2 bytes and up) of each word's UTF-8 bytes, earlier words first: BPE
    builds each word by appending one byte at a time, and an earlier word's merges win."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in words:
        data = word.encode()
        for n in range(2, len(data) + 1):
            ranks.setdefault(data[:n], len(ranks))
    return ranks


def test_pretokenisation_keeps_han_apart_from_letters():
    r"""Ranks with merges across the V1 piece boundaries ("é|北京", "Beijing|上海") that a wrong split would take:
    the ids show where tiktoken split. V1 splits "é北京Beijing上海" into é | 北京 | Beijing | 上海; reading the
    ``&&[^\p{Han}]`` intersections away joins Han to the letter runs (é北京 | Beijing上海), the V0 reading drops
    the letters (北京 | 上海), and a split per character merges nothing across characters."""
    ranks = _prefix_chain_ranks(["é北京", "Beijing上海", "北京", "上海"])
    # é北京 takes 256..262 (é is 256), Beijing上海 263..274 (Beijing, a prefix, 268), 北京 275..279, 上海 280..284.
    words = {"é": 256, "é北京": 262, "Beijing": 268, "Beijing上海": 274, "北京": 279, "上海": 284}
    assert {w: ranks[w.encode()] for w in words} == words
    tok = Tokenizer(ranks)
    text = "é北京Beijing上海"
    assert pretokenize(text) == ["é", "北京", "Beijing", "上海"]
    ids = tok.encode(text)
    assert ids == [256, 279, 268, 284]
    assert ids == [i for p in pretokenize(text) for i in bpe_encode(ranks, p.encode(), visualise=None)]
    assert [tok.decode([i]) for i in ids] == ["é", "北京", "Beijing", "上海"]  # multi-character tokens
    assert tok.decode(ids) == text
    # What the wrong splits would give, so the ids above tell them apart.
    han_joined = [i for p in ["é北京", "Beijing上海"] for i in bpe_encode(ranks, p.encode(), visualise=None)]
    per_character = [i for ch in text for i in bpe_encode(ranks, ch.encode(), visualise=None)]
    assert han_joined == [262, 274]
    assert per_character == [256, 276, 228, 186, 172, 66, 101, 105, 106, 105, 110, 103, 281, 230, 181, 183]
    import regex

    assert regex.findall(PATTERN, text) == ["北京", "上海"]  # V0


def test_malformed_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"YQ== 0\nYg==\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2: expected"):
        read_tiktoken_ranks(bad)
    bad.write_bytes(b"YQ== 0\nYQ== 1\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2: token b'a' appears twice"):
        read_tiktoken_ranks(bad)
    bad.write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(TokenizerError, match="no gaps"):
        read_tiktoken_ranks(bad)
    with pytest.raises(TokenizerError, match="not found"):
        read_tiktoken_ranks(tmp_path / "missing.model")


def test_tiny_tokenizer_matches_tiny_config():
    tok = Tokenizer.tiny()
    cfg = tiny()
    assert tok.num_base == 1024 and tok.vocab_size == cfg.text.vocab_size == 1280
    assert tok.bos_id == cfg.bos_token_id == 1024
    assert tok.eos_id == cfg.eos_token_id == 1025
    assert tok.im_end_id == 1026
    assert tok.token_id("<|media_pad|>") == cfg.media_placeholder_token_id == 1045
    assert tok.token_id("[PAD]") == cfg.pad_token_id == 1279
    text = "Hello! What is the weather in Paris today? 你好"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.")) <= 12


def test_shipped_tiny_ranks_are_reproducible(tmp_path):
    shipped = os.path.join(os.path.dirname(make_tiny_tokenizer.__file__), "tiny_tiktoken.model")
    fresh = tmp_path / "fresh.model"
    write_tiktoken_ranks(make_tiny_tokenizer.train(), fresh)
    assert fresh.read_bytes() == open(shipped, "rb").read()


def test_stream_decoder_holds_partial_characters(bpe_dir):
    tok = Tokenizer.from_file(bpe_dir / "tiktoken.model")
    text = "naïve 🙂 你好 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
