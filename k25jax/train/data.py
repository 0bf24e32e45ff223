"""Training data for fine-tuning: chat samples -> token ids with an assistant loss mask -> packed rows -> a
resumable, seeded grain pipeline of ``[B, L]`` batches.

Samples are OpenAI-style conversations, ``{"messages": [...], "tools": [...]}`` (tools optional), read from a
JSONL file, a parquet file or a ``datasets`` directory (``Dataset.save_to_disk``); parquet and ``datasets``
columns may hold the structures themselves or their JSON text. Each sample is rendered with the project's chat
format (:func:`k25jax.chat.encode_for_training`): the loss mask is 1 exactly on the tokens the assistant
generates (reasoning where kept, ``</think>``, content, tool calls, ``<|im_end|>``); history turns render as the
format renders history. Everything is tokenized up front, so a bad sample fails before training starts and the
counts in :class:`DataStats` are known.

Rows of ``max_length`` tokens hold whole samples (grain's first-fit packing); a batch is a dict of numpy arrays,
all ``[B, L]``:

- ``input_ids`` int32; ``segment_ids`` int32: 1, 2, ... per sample in the row, 0 on padding;
- ``positions`` int32: restart at 0 per segment (0 on padding);
- ``targets`` int32: ``input_ids[t + 1]`` of the same segment, 0 at a segment's last token and on padding;
- ``loss_mask`` float32: 1 iff ``targets[t]`` is a token the assistant generates, in the same segment.

Attention must stay within a segment (``segment_ids`` equal, causal); nothing here crosses samples.

Images and videos (content parts as :func:`k25jax.chat.prepare` reads them: paths, data URLs, frame lists with
timestamps) are preprocessed up front like the released processor does at inference, and held in memory; each
placeholder expands to its item's merged-token count, so a sample's ids start with exactly its inference prompt.
Batches of such data also carry ``media_index [B, T]`` int32 (the merged media token each ``<|media_pad|>``
takes, -1 elsewhere) and the fixed-capacity vision layout of the batch's items
(:func:`k25jax.vision.moonvit.layout_arrays`; capacities are powers of two, so a jitted step compiles a few
times, not once per batch); :func:`k25jax.train.step.model_loss` runs the vision tower on it.

Arrow sources (parquet, ``datasets``) cannot tell an absent key from a null one and fill every key any row has,
so there None values are dropped at every level; in JSONL only a message's own None-valued keys are dropped (a
``"reasoning_content": null`` means no reasoning, not the text ``None`` the template would write).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from k25jax import chat

Overlong = Literal["drop", "truncate"]
_MEDIA_TYPES = ("image", "image_url", "video", "video_url")
_STATE_FORMAT = "k25jax.train.data/1"


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the line, row or sample at fault."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One conversation: ``messages`` (OpenAI message format), ``tools`` (None without), and ``where`` it came from
    for errors (``data.jsonl:17``, ``data.parquet:row 3``)."""

    messages: list[dict]
    tools: list[dict] | None
    where: str


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike) -> list[Sample]:
    """The samples of a ``.jsonl`` file, a ``.parquet`` file or a ``datasets`` directory, in file order.

    Raises :class:`DataError` naming the file (and line or row) for a missing file, malformed JSON, a record
    that is not a sample, or a source with no samples.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        samples = _load_datasets_dir(path)
    elif path.endswith(".jsonl"):
        samples = _load_jsonl(path)
    elif path.endswith(".parquet"):
        samples = _load_parquet(path)
    else:
        raise DataError(f"{path}: expected a .jsonl or .parquet file or a datasets directory (Dataset.save_to_disk)")
    if not samples:
        raise DataError(f"{path}: no samples (the dataset is empty)")
    return samples


def _load_jsonl(path: str) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.rstrip("\r\n"))  # column numbers within the line
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON: {err}") from None
            samples.append(_sample(record, where, arrow=False))
    return samples


def _load_parquet(path: str) -> list[Sample]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file: {err}") from None
    return [_sample(row, f"{path}:row {i}", arrow=True) for i, row in enumerate(table.to_pylist())]


def _load_datasets_dir(path: str) -> list[Sample]:
    if not any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a directory must be a datasets directory (Dataset.save_to_disk): no state.json")
    import datasets

    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split, found {sorted(data)}")
        data = data["train"]
    return [_sample(row, f"{path}:row {i}", arrow=True) for i, row in enumerate(data)]


def _sample(record: Any, where: str, *, arrow: bool) -> Sample:
    """Check the shape of a record and normalise it (None-valued keys dropped, JSON-text columns parsed)."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a sample must be an object with a 'messages' list, got {type(record).__name__}")
    messages = _maybe_json(record.get("messages"), where, "messages")
    tools = _maybe_json(record.get("tools"), where, "tools")
    if arrow:
        messages, tools = _drop_nones(messages), _drop_nones(tools)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: a sample needs a non-empty 'messages' list")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of tool declarations, got {type(tools).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return Sample(messages, tools or None, where)


def _maybe_json(value: Any, where: str, field: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: {field} is text but not valid JSON: {err}") from None


def _drop_nones(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_nones(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------


class EncodedSample(NamedTuple):
    """A sample's token ids, per token 1 where the assistant generates it, and its media items in placeholder
    order: ``(pixel_values [t*h*w, 3, 14, 14] float32, (t, h, w))`` per image or video chunk."""

    ids: list[int]
    generated: list[int]
    media: list[tuple[np.ndarray, tuple[int, int, int]]]


def encode_sample(sample: Sample, tokenizer, *, thinking: bool | None = None, media_options=None) -> EncodedSample:
    """Token ids of a sample, per token 1 where the assistant generates it (:func:`chat.encode_for_training`), and
    its preprocessed media (``k25jax.media.load_part`` with ``media_options``, default the released processor's:
    each image's and video chunk's pads expand to its merged-token count, as at inference).

    ``thinking``: None renders a sample in thinking mode iff one of its assistant messages has
    ``reasoning_content`` (the ids are the same either way; with thinking the ``</think>`` of a turn without
    reasoning is trained too). Raises :class:`DataError` naming the sample for what the chat format rejects, a
    sample with no assistant message, and unreadable media (naming the part).
    """
    from k25jax.media import load_part
    from k25jax.vision import MediaError

    assistants = [m for m in sample.messages if m.get("role") == "assistant"]
    if not assistants:
        raise DataError(f"{sample.where}: the sample has no assistant message to train on")
    items: list[tuple[np.ndarray, tuple[int, int, int]]] = []
    infos = []
    for what, part in chat.media_parts_of(sample.messages):
        if part.get("type") not in _MEDIA_TYPES:
            continue
        try:
            loaded, info = load_part(part, what, media_options)
        except MediaError as err:
            raise DataError(f"{sample.where}: {err}") from None
        start = 0
        for t, h, w in np.asarray(loaded.grid_thw).reshape(-1, 3).tolist():
            items.append((np.asarray(loaded.pixel_values[start : start + t * h * w], np.float32), (t, h, w)))
            start += t * h * w
        infos.append(info)
    if thinking is None:
        thinking = any("reasoning_content" in m for m in assistants)
    try:
        tokens = chat.encode_for_training(
            sample.messages, tokenizer, tools=sample.tools, thinking=thinking, media=infos if infos else None
        )
    except chat.ChatFormatError as err:
        raise DataError(f"{sample.where}: {err}") from None
    return EncodedSample(tokens.ids, tokens.generated, items)


@dataclasses.dataclass(frozen=True)
class DataStats:
    """Counts over one pass of the data.

    samples: samples read; dropped / truncated: samples longer than ``max_length`` dropped or cut;
    tokens: tokens of the kept samples (after truncation); assistant_tokens: trained targets of the kept samples
    (the sum of ``loss_mask`` over an epoch).
    """

    samples: int
    tokens: int
    assistant_tokens: int
    dropped: int
    truncated: int


class TokenizedSamples:
    """The kept samples as a random-access grain source: item ``i`` is ``{"input_ids", "targets", "loss_mask",
    "sample_index"}``, each ``[n_i]`` (targets and mask shifted by one, 0 after the last token, so packing cannot
    cross samples; ``sample_index`` is ``i`` throughout, so a packed row says which samples it holds). ``media[i]``
    lists sample ``i``'s media items (:class:`EncodedSample`), held in memory; ``has_media`` says whether any has
    one."""

    def __init__(self, ids: np.ndarray, generated: np.ndarray, offsets: np.ndarray, media: list | None = None):
        self._ids, self._generated, self._offsets = ids, generated, offsets
        self.media = media if media is not None else [[] for _ in range(len(offsets) - 1)]
        self.has_media = any(self.media)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start, stop = self._offsets[index], self._offsets[index + 1]
        ids = self._ids[start:stop]
        targets = np.zeros_like(ids)
        targets[:-1] = ids[1:]
        loss_mask = np.zeros(len(ids), np.float32)
        loss_mask[:-1] = self._generated[start + 1 : stop]
        index_of = np.full(len(ids), index, np.int32)
        return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "sample_index": index_of}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def fingerprint(self) -> str:
        """A hash of the tokens, masks, sample boundaries and media (a saved position is only valid for the same
        data)."""
        digest = hashlib.blake2b(digest_size=8)
        for array in (self._ids, self._generated, self._offsets):
            digest.update(np.ascontiguousarray(array).tobytes())
        for items in self.media:
            for values, grid in items:
                digest.update(np.asarray(grid, np.int64).tobytes())
                digest.update(np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()


def tokenize_samples(
    samples: Sequence[Sample],
    tokenizer,
    *,
    max_length: int,
    overlong: Overlong = "drop",
    thinking: bool | None = None,
) -> tuple[TokenizedSamples, DataStats]:
    """Encode every sample (:func:`encode_sample`) and apply the ``overlong`` rule to those over ``max_length``
    tokens: ``"drop"`` leaves them out, ``"truncate"`` keeps their first ``max_length`` tokens (samples with media
    are always dropped: a cut could split an item's placeholders)."""
    if overlong not in ("drop", "truncate"):
        raise DataError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
    ids, generated, lengths, media = [], [], [], []
    dropped = truncated = 0
    for sample in samples:
        tokens = encode_sample(sample, tokenizer, thinking=thinking)
        n = len(tokens.ids)
        if n > max_length:
            if overlong == "drop" or tokens.media:  # cutting through media placeholders would orphan features
                dropped += 1
                continue
            truncated += 1
            n = max_length
        ids.append(np.asarray(tokens.ids[:n], np.int32))
        generated.append(np.asarray(tokens.generated[:n], np.uint8))
        lengths.append(n)
        media.append(tokens.media)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    flat_generated = np.concatenate(generated) if generated else np.zeros(0, np.uint8)
    trained = sum(int(g[1:].sum()) for g in generated)
    stats = DataStats(len(samples), int(offsets[-1]), trained, dropped, truncated)
    return TokenizedSamples(flat_ids, flat_generated, offsets, media), stats


# --------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


def _stack_rows(rows: Sequence[dict], batch_size: int, media=None) -> dict[str, np.ndarray]:
    """Packed rows -> the batch dict; a short last batch (finite epochs) is padded with empty rows. ``media``:
    ``(source, vision config, pad id)`` for data with media (:func:`_media_arrays`)."""
    batch = {
        "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32),
        "targets": np.stack([r["targets"] for r in rows]).astype(np.int32),
        "loss_mask": np.stack([r["loss_mask"] for r in rows]).astype(np.float32),
        "positions": np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32),
        "segment_ids": np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32),
    }
    missing = batch_size - len(rows)
    if missing:
        batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
    if media is not None:
        sample_index = np.stack([r["sample_index"] for r in rows]).astype(np.int32)
        batch.update(_media_arrays(batch, np.pad(sample_index, ((0, missing), (0, 0))), *media))
    return batch


def _media_arrays(batch: dict, sample_index: np.ndarray, source: TokenizedSamples, vision, pad_id: int) -> dict:
    """``media_index [B, T]`` (the merged media token each ``<|media_pad|>`` takes, -1 elsewhere) and the vision
    layout (``k25jax.vision.moonvit.layout_arrays``) of the batch's media items in row-major placeholder order:
    rows in order, samples in a row in order, items in a sample in order."""
    from k25jax.vision.moonvit import layout_arrays

    items = []
    segments = batch["segment_ids"]
    for b in range(segments.shape[0]):
        row = segments[b]
        starts = np.flatnonzero((row > 0) & (np.concatenate([[0], row[:-1]]) != row))
        for start in starts:
            items += source.media[int(sample_index[b, start])]
    is_pad = (batch["input_ids"] == pad_id) & (segments > 0)
    layout = layout_arrays(items, vision)
    tokens = int((layout["vision_merge_weight"].sum(-1) > 0).sum())
    if int(is_pad.sum()) != tokens:  # cannot happen for samples encode_sample made: a bug, not bad data
        raise DataError(f"a batch holds {int(is_pad.sum())} {chat.MEDIA_PAD} tokens but its media give {tokens}")
    media_index = np.full(is_pad.shape, -1, np.int32)
    media_index[is_pad] = np.arange(tokens, dtype=np.int32)
    return {"media_index": media_index, **layout}


class Batches(Iterator[dict[str, np.ndarray]]):
    """An endless (or ``num_epochs``-long) iterator of packed batches with a checkpointable position.

    ``get_state()`` is a JSON-serialisable dict; ``set_state(state)`` on a pipeline built with the same data and
    settings resumes so that it yields exactly the batches the saved one would have. ``stats`` counts the data
    (:class:`DataStats`).
    """

    def __init__(self, dataset, stats: DataStats, settings: dict[str, Any]):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.stats = stats
        self.settings = settings

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "settings": dict(self.settings), "pipeline": self._iterator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise DataError(f"not a data pipeline state (expected format {_STATE_FORMAT!r})")
        saved = state.get("settings")
        if saved != self.settings:
            diff = {k: (saved.get(k) if isinstance(saved, Mapping) else None, v) for k, v in self.settings.items()}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise DataError(f"the state was saved by a different pipeline: (saved, this) = {diff}")
        self._iterator.set_state(state["pipeline"])


def make_batches(
    data: str | os.PathLike | Sequence[Sample],
    tokenizer,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    overlong: Overlong = "drop",
    num_epochs: int | None = None,
    packing_bins: int | None = None,
    thinking: bool | None = None,
    vision=None,
) -> Batches:
    """The training batches of ``data`` (a path for :func:`load_samples`, or samples): each epoch shuffled with
    ``seed`` (differently per epoch), samples packed first-fit into ``packing_bins`` rows at a time (default
    ``batch_size``; more bins pack tighter), rows grouped ``batch_size`` at a time. ``num_epochs=None`` repeats
    forever. Deterministic: one process, no worker threads. See the module doc for the batch dict.

    Data with images or videos needs ``vision`` (the model's :class:`~k25jax.config.VisionConfig`): every batch
    then also carries ``media_index`` and the vision layout of its media (module doc)."""
    import grain
    from grain.experimental import FirstFitPackIterDataset

    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    name = os.fspath(data) if isinstance(data, str | os.PathLike) else "the samples"
    samples = load_samples(data) if isinstance(data, str | os.PathLike) else list(data)
    if not samples:
        raise DataError(f"{name}: no samples (the dataset is empty)")
    source, stats = tokenize_samples(samples, tokenizer, max_length=max_length, overlong=overlong, thinking=thinking)
    if len(source) == 0:
        raise DataError(
            f"{name}: all {stats.samples} samples are longer than max_length={max_length} and were dropped "
            "(overlong='drop'; use a larger max_length or overlong='truncate')"
        )
    packing_bins = packing_bins or batch_size
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    media = None
    if source.has_media:
        if vision is None:
            raise DataError(f"{name}: the samples hold images or videos but the model has no vision tower")
        media = (source, vision, tokenizer.token_id(chat.MEDIA_PAD))
    lengths = {"input_ids": max_length, "targets": max_length, "loss_mask": max_length, "sample_index": max_length}
    dataset = FirstFitPackIterDataset(dataset, length_struct=lengths, num_packing_bins=packing_bins, shuffle_bins=False)
    dataset = dataset.batch(batch_size, batch_fn=functools.partial(_stack_rows, batch_size=batch_size, media=media))
    settings = {
        "data": source.fingerprint(),
        "seed": seed,
        "batch_size": batch_size,
        "max_length": max_length,
        "overlong": overlong,
        "num_epochs": num_epochs,
        "packing_bins": packing_bins,
    }
    return Batches(dataset, stats, settings)
