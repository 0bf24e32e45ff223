"""Training data: assistant loss mask, packing, overlong handling, resumable seeded pipeline, sources, errors."""

import json

import numpy as np
import pytest

from k25jax import chat
from k25jax.tokenizer import Tokenizer
from k25jax.train import data

TOK = Tokenizer.tiny()

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "w",
            "description": "Weather.",
            "parameters": {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]},
        },
    }
]
CALL = {"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": '{"c": "x"}'}}
TOOL_LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "functions.w:0", "content": "sun"},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "Easy."},
]


def _spans_to_ids(spans):
    ids, mask = [], []
    for text, generated in spans:
        piece = TOK.encode(text)
        ids += piece
        mask += [generated] * len(piece)
    return ids, mask


def _sample(i, n_words=1, reasoning=True):
    assistant = {"role": "assistant", "content": " ".join(["word"] * n_words) + f" {i}"}
    if reasoning:
        assistant["reasoning_content"] = f"r{i}"
    return data.Sample([{"role": "user", "content": f"q{i}"}, assistant], None, f"s{i}")


def _trained(sample):
    """Tokens the assistant generates in a :func:`_sample`, counted from its text alone."""
    reply = sample.messages[1]
    return len(TOK.encode(reply.get("reasoning_content", "") + "</think>" + reply["content"] + "<|im_end|>"))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --------------------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------------------


def test_mask_covers_exactly_the_assistant_tokens():
    """Hand-written spans of a tool loop: reasoning, </think>, tool-call markers and <|im_end|> are trained;
    headers, <think>, system/user/tool turns are not."""
    expected = [
        (
            "<|im_system|>tool_declare<|im_middle|>"
            + chat.tool_declaration(TOOLS)
            + "<|im_end|><|im_system|>system<|im_middle|>Be brief.<|im_end|>"
            "<|im_user|>user<|im_middle|>Weather?<|im_end|><|im_assistant|>assistant<|im_middle|><think>",
            0,
        ),
        (
            "Call it.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.w:0"
            '<|tool_call_argument_begin|>{"c": "x"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
            1,
        ),
        (
            "<|im_system|>tool<|im_middle|>## Return of functions.w:0\nsun<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|><think>",
            0,
        ),
        ("Easy.</think>Sunny.<|im_end|>", 1),
    ]
    ids, mask = _spans_to_ids(expected)
    tokens = data.encode_sample(data.Sample(TOOL_LOOP, TOOLS, "loop"), TOK)
    assert tokens.ids == ids
    assert tokens.generated == mask
    assert (len(ids), sum(mask)) == (163, 24 + 11)
    assert TOK.decode([t for t, g in zip(ids, mask, strict=True) if g]) == expected[1][0] + expected[3][0]
    # Byte for byte the ids of the plain renderer: the last turn follows the prompt render gives for the messages
    # before it, and a sample ending in a tool call is the plain render of the whole conversation.
    prompt = chat.render(TOOL_LOOP[:4], tools=TOOLS, add_generation_prompt=True)
    assert tokens.ids == TOK.encode(prompt + "Easy.</think>Sunny.<|im_end|>")
    head = chat.encode_for_training(TOOL_LOOP[:3], TOK, tools=TOOLS)
    assert head.ids == TOK.encode(chat.render(TOOL_LOOP[:3], tools=TOOLS, add_generation_prompt=False))
    assert sum(head.generated) == 24


def test_history_turns_train_their_content_not_an_empty_thought():
    """Earlier loops render as history (<think></think>, reasoning dropped, as chat.render does); their content
    and <|im_end|> are trained, the <think></think> is not. Without reasoning, thinking is off: no </think>."""
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "dropped"},
        *TOOL_LOOP[1:],
    ]
    tokens = data.encode_sample(data.Sample(messages, None, "multi"), TOK)
    trained = TOK.decode([t for t, g in zip(tokens.ids, tokens.generated, strict=True) if g])
    call = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.w:0<|tool_call_argument_begin|>"
        '{"c": "x"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    )
    assert trained == "b<|im_end|>" + "Call it.</think>" + call + "Easy.</think>Sunny.<|im_end|>"
    assert "dropped" not in TOK.decode(tokens.ids)
    text = "".join(s.text for s in chat.render_spans(messages, add_generation_prompt=False, for_training=True))
    assert TOK.encode(text) == tokens.ids
    # Every turn of the current loop starts where the inference prompt of the messages before it ends.
    for i in (3, 5):
        assert text.startswith(chat.render(messages[:i]))
    plain = data.encode_sample(_sample(0, reasoning=False), TOK)
    assert TOK.decode([t for t, g in zip(plain.ids, plain.generated, strict=True) if g]) == "word 0<|im_end|>"


def test_render_spans_join_to_render():
    for messages in (TOOL_LOOP, TOOL_LOOP[:3], TOOL_LOOP[:2], [*TOOL_LOOP, {"role": "user", "content": "more"}]):
        for thinking in (True, False):
            for prompt in (True, False):
                spans = chat.render_spans(messages, tools=TOOLS, thinking=thinking, add_generation_prompt=prompt)
                rendered = chat.render(messages, tools=TOOLS, thinking=thinking, add_generation_prompt=prompt)
                assert "".join(s.text for s in spans) == rendered


# --------------------------------------------------------------------------------------------------------
# Packing and overlong samples
# --------------------------------------------------------------------------------------------------------


def _segments(batch, row):
    seg = batch["segment_ids"][row]
    return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


def test_packing_never_crosses_samples():
    samples = [_sample(i, n_words=1 + (7 * i) % 11) for i in range(12)]
    encoded = {tuple(data.encode_sample(s, TOK).ids) for s in samples}
    batches = data.make_batches(samples, TOK, batch_size=2, max_length=48, seed=3, num_epochs=1)
    seen, trained = [], 0.0
    for batch in batches:
        assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
            "input_ids": ("int32", (2, 48)),
            "targets": ("int32", (2, 48)),
            "loss_mask": ("float32", (2, 48)),
            "positions": ("int32", (2, 48)),
            "segment_ids": ("int32", (2, 48)),
        }
        trained += batch["loss_mask"].sum()
        for row in range(2):
            pad = batch["segment_ids"][row] == 0
            assert not any(batch[k][row][pad].any() for k in batch)
            for where in _segments(batch, row):
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                assert np.array_equal(batch["positions"][row][where], np.arange(len(where)))
                ids, targets = batch["input_ids"][row][where], batch["targets"][row][where]
                assert np.array_equal(targets[:-1], ids[1:])
                assert targets[-1] == 0 and batch["loss_mask"][row][where[-1]] == 0
                seen.append(tuple(ids.tolist()))
    assert len(seen) == 12 and set(seen) == encoded
    assert trained == batches.stats.assistant_tokens == sum(map(_trained, samples)) == 220


def test_overlong_samples_are_dropped_or_truncated_and_counted():
    samples = [_sample(i, n_words=n) for i, n in enumerate([1, 2, 30, 3, 40])]
    lengths = [len(data.encode_sample(s, TOK).ids) for s in samples]
    assert lengths == [25, 27, 83, 29, 103]
    dropped = data.make_batches(samples, TOK, batch_size=2, max_length=64, seed=0)
    assert dropped.stats == data.DataStats(
        samples=5,
        tokens=25 + 27 + 29,
        assistant_tokens=sum(map(_trained, samples[:2] + samples[3:4])),
        dropped=2,
        truncated=0,
    )
    cut = data.make_batches(samples, TOK, batch_size=2, max_length=64, seed=0, overlong="truncate", num_epochs=1)
    assert cut.stats == data.DataStats(
        samples=5,
        tokens=25 + 27 + 64 + 29 + 64,
        assistant_tokens=sum(map(_trained, samples)) - (83 - 64) - (103 - 64),
        dropped=0,
        truncated=2,
    )
    segment_lengths = sorted(len(w) for b in cut for r in range(2) for w in _segments(b, r))
    assert segment_lengths == [25, 27, 29, 64, 64]
    with pytest.raises(data.DataError, match=r"the samples: all 5 samples are longer than max_length=24"):
        data.make_batches(samples, TOK, batch_size=2, max_length=24, seed=0)


# --------------------------------------------------------------------------------------------------------
# The pipeline: resume and shuffle
# --------------------------------------------------------------------------------------------------------


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def test_resume_yields_the_same_batches():
    samples = [_sample(i, n_words=1 + i % 5) for i in range(9)]
    make = lambda seed=7: data.make_batches(samples, TOK, batch_size=2, max_length=64, seed=seed)  # noqa: E731
    uninterrupted = make()
    _take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # JSON round trip, as a checkpoint stores it
    expected = _take(uninterrupted, 6)  # past the first epoch: 9 samples, about 2 per row
    resumed = make()
    resumed.set_state(state)
    got = _take(resumed, 6)
    for want, have in zip(expected, got, strict=True):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(have[key], want[key])
    assert not np.array_equal(next(make())["input_ids"], expected[0]["input_ids"])  # the state mattered
    with pytest.raises(data.DataError, match=r"saved by a different pipeline: \(saved, this\) = \{'seed': \(7, 8\)\}"):
        make(seed=8).set_state(state)


def test_shuffle_is_seeded_and_differs_per_seed_and_epoch():
    samples = [_sample(i) for i in range(8)]

    def order(seed, epochs=1):
        batches = data.make_batches(samples, TOK, batch_size=1, max_length=32, seed=seed, num_epochs=epochs)
        # One sample per row (25 tokens each): the sample index is the last digit before <|im_end|>.
        return [int(TOK.decode(b["input_ids"][0][b["segment_ids"][0] > 0]).rsplit(" ", 1)[1][0]) for b in batches]

    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(8))
    assert order(0) != order(1)
    two = order(0, epochs=2)
    assert two[:8] == order(0) and sorted(two[8:]) == list(range(8)) and two[8:] != two[:8]


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------

RECORDS = [
    {"messages": TOOL_LOOP, "tools": TOOLS},
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "reasoning_content": None},
        ]
    },
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": "z"}]},
    {  # another tool schema: in arrow its struct type is the union of both, filled with nulls
        "messages": [{"role": "user", "content": "t"}, {"role": "assistant", "content": "u"}],
        "tools": [{"type": "function", "function": {"name": "v", "parameters": {"type": "object", "properties": {}}}}],
    },
]


def test_jsonl_parquet_and_datasets_dir_load_the_same_samples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    nested = str(tmp_path / "nested.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS), nested)
    as_text = str(tmp_path / "text.parquet")
    text_rows = [{"messages": json.dumps(r["messages"]), "tools": json.dumps(r.get("tools"))} for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(text_rows), as_text)
    directory = str(tmp_path / "saved")
    datasets.Dataset.from_list(RECORDS).save_to_disk(directory)

    reference = data.load_samples(jsonl)
    assert [s.where for s in reference] == [f"{jsonl}:{n}" for n in (1, 2, 3, 4)]
    assert reference[1].messages[1] == {"role": "assistant", "content": "yo"}  # null reasoning means none
    assert reference[0].tools == TOOLS and reference[1].tools is None
    for path in (nested, as_text, directory):
        loaded = data.load_samples(path)
        assert [s.where for s in loaded] == [f"{path}:row {i}" for i in range(4)]
        assert [(s.messages, s.tools) for s in loaded] == [(s.messages, s.tools) for s in reference]
    ids = [data.encode_sample(s, TOK).ids for s in reference]
    assert [len(i) for i in ids] == [163, 20, 19, 69]
    a = data.make_batches(jsonl, TOK, batch_size=2, max_length=200, seed=1, num_epochs=1)
    b = data.make_batches(directory, TOK, batch_size=2, max_length=200, seed=1, num_epochs=1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_file_and_line(tmp_path):
    good = json.dumps(RECORDS[2])
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n\n" + good + "\n" + '{"messages": [\n')
    with pytest.raises(
        data.DataError, match=rf"^{path}:4: not valid JSON: Expecting value: line 1 column 15 \(char 14\)$"
    ):
        data.load_samples(path)
    cases = {
        '{"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "a"}]}': (
            r"messages\[0\]\.content\[0\]\.type must be text, image, image_url, video or video_url, got 'audio'"
        ),
        '{"messages": [{"role": "user", "content": "a"}]}': "the sample has no assistant message to train on",
        '{"messages": [{"content": "a"}, {"role": "assistant", "content": "a"}]}': r"messages\[0\]\.role is required",
        '[{"role": "user"}]': "a sample must be an object with a 'messages' list, got list",
        '{"messages": []}': "a sample needs a non-empty 'messages' list",
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;'
        'base64,AAAA"}}]}, {"role": "assistant", "content": "a"}]}': (
            r"messages\[0\]\.content\[0\]: <bytes>: not a recognised image format"
        ),
    }
    for line, message in cases.items():
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(data.DataError, match=rf"^{path}:2: {message}"):
            data.make_batches(path, TOK, batch_size=1, max_length=64, seed=0)
    parquet = str(tmp_path / "bad.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(RECORDS[2]["messages"])}, {"messages": "{"}]), parquet)
    with pytest.raises(data.DataError, match=rf"^{parquet}:row 1: messages is text but not valid JSON"):
        data.load_samples(parquet)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(data.DataError, match=rf"^{empty}: no samples \(the dataset is empty\)$"):
        data.load_samples(empty)
    with pytest.raises(data.DataError, match=rf"^{empty}: no samples \(the dataset is empty\)$"):
        data.make_batches(empty, TOK, batch_size=1, max_length=64, seed=0)
    with pytest.raises(data.DataError, match=rf"^{tmp_path}/missing.jsonl: no such file or directory$"):
        data.load_samples(tmp_path / "missing.jsonl")
    with pytest.raises(data.DataError, match="overlong must be 'drop' or 'truncate', got 'cut'"):
        data.make_batches([_sample(0)], TOK, batch_size=1, max_length=64, seed=0, overlong="cut")
