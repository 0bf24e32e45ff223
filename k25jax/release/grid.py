"""Which INT4 grid a release's routed experts are on: the Kimi grid, compressed-tensors RTN, or neither.

The two grids (``shared/docs/qat.md``, :data:`k25jax.train.fakequant.GRIDS`), group 32, bf16 scales:

- ``"kimi"``: ``s = bf16(float32(amax) / 7)``, ``q`` in [-7, 7]: nibble 0 (``q = -8``) never occurs, every group
  that is not all zero has ``max|q| = 7``, and every scale is a fixed point of the rule applied to its own
  dequantized group (what :func:`k25jax.train.fakequant.group_scales` computes from the masters in ``"dynamic"``
  scale mode).
- ``"compressed-tensors"``: ``s = amax / 7.5``, ``q`` in [-8, 7]: a group's ``max|q|`` is 8 or 7 (the group
  maximum lands at +-7.5 up to the bf16 rounding of ``s``, and round-half-to-even plus the clamp at +7 give 8 for a
  negative maximum, 7 for a positive one).

The fixed-point test, stated as :func:`~k25jax.train.fakequant.group_scales` computes it: the master of a group is
``q * s``; its ``amax`` is taken in float32 from the master as stored. With float32 masters (``to_fake_quant``'s
default) ``amax = float32(max|q| * s)`` exactly, so the test is ``bf16(float32(max|q| * s) / 7) == s``
(:attr:`GridAudit.fixed_f32`). With bf16 masters the master is ``bf16(q * s)`` and the test is
``bf16(float32(bf16(max|q| * s)) / 7) == s`` (:attr:`GridAudit.fixed_bf16`; with ``max|q| = 7`` this is
``bf16(float32(bf16(7 s)) / 7) == s``). The first holds for every finite bf16 scale that does not overflow when
multiplied by 7, so with ``max|q| = 7`` it is the grid test; the second fails for about 11% of arbitrary bf16 scales
(those not of the form ``bf16(a / 7)`` with ``a`` itself a bf16 value, i.e. scales quantized from float32 rather
than bf16 weights): it tells whether dynamic scales from bf16 masters would reproduce the release, not which grid
it is on.

:func:`audit_release` streams the routed-expert ``weight_packed`` / ``weight_scale`` pairs one tensor at a time
(the 554 GB release is never loaded whole), with a progress bar over bytes.
"""

from __future__ import annotations

import dataclasses
import os

import ml_dtypes
import numpy as np

from k25jax.config import K25Config
from k25jax.release.config import from_release_config
from k25jax.release.keymap import release_entries
from k25jax.release.reader import ReleaseError, ReleaseReader

KIMI, COMPRESSED_TENSORS, UNKNOWN = "kimi", "compressed-tensors", "unknown"
BF16 = np.dtype(ml_dtypes.bfloat16)
NIBBLES = 16
QMAX_ABS = 8  # the largest |q| a nibble can hold (q = -8)

# max |q| of the four nibbles of one little-endian 16-bit half-word of a release word: half-word j of word w holds
# input columns 8w + 4j ... 8w + 4j + 3, low nibble first, offset binary (q = u - 8).
_HALF = np.arange(1 << 16, dtype=np.int32)
_HALF_MAX_ABS = np.max([np.abs(((_HALF >> (4 * i)) & 0xF) - 8) for i in range(4)], axis=0).astype(np.uint8)
del _HALF


def _row_max(a: np.ndarray) -> np.ndarray:
    """``a [M, W]`` -> ``[M]`` row maxima (pairwise halving: numpy's reduction over a short last axis is slow)."""
    while a.shape[1] > 1 and a.shape[1] % 2 == 0:
        half = a.shape[1] // 2
        a = np.maximum(a[:, :half], a[:, half:])
    return a.max(axis=1)


@dataclasses.dataclass
class GridAudit:
    """Counts over every routed-expert INT4 tensor of a release.

    Attributes:
      tensors: ``weight_packed`` tensors read.
      nibbles: 16 counts; ``nibbles[u]`` values stored as nibble ``u`` (``q = u - 8``: ``nibbles[0]`` counts
        ``q = -8``).
      group_max: 9 counts; ``group_max[m]`` groups of 32 whose ``max|q|`` is ``m`` (``group_max[0]``: all-zero
        groups).
      fixed_f32: groups whose scale ``s`` satisfies ``bf16(float32(max|q| * s) / 7) == s`` (the kimi rule returns
        ``s`` from float32 masters ``q * s``).
      fixed_bf16: groups whose scale satisfies ``bf16(float32(bf16(max|q| * s)) / 7) == s`` (from bf16 masters).
      zero_groups_nonzero_scale: all-zero groups with a scale other than 0 (no symmetric RTN writes one).
      bytes: bytes read (words and scales).
    """

    tensors: int = 0
    nibbles: list[int] = dataclasses.field(default_factory=lambda: [0] * NIBBLES)
    group_max: list[int] = dataclasses.field(default_factory=lambda: [0] * (QMAX_ABS + 1))
    fixed_f32: int = 0
    fixed_bf16: int = 0
    zero_groups_nonzero_scale: int = 0
    bytes: int = 0

    @property
    def values(self) -> int:
        return sum(self.nibbles)

    @property
    def groups(self) -> int:
        return sum(self.group_max)

    @property
    def nonzero_groups(self) -> int:
        return self.groups - self.group_max[0]

    @property
    def verdict(self) -> str:
        """``"kimi"``, ``"compressed-tensors"`` or ``"unknown"`` (also when the release has no INT4 experts)."""
        if not self.groups or self.zero_groups_nonzero_scale:
            return UNKNOWN
        if self.nibbles[0] == 0 and self.group_max[7] == self.nonzero_groups and self.fixed_f32 == self.groups:
            return KIMI
        if self.group_max[8] and self.group_max[7] + self.group_max[8] == self.nonzero_groups:
            return COMPRESSED_TENSORS
        return UNKNOWN

    def add(self, words: np.ndarray, scales: np.ndarray, group_size: int, what: str = "tensor") -> None:
        """Count one release tensor pair: ``words int32 [O, I/8]`` and ``scales bf16 [O, I/group_size]``."""
        if words.dtype != np.int32 or words.ndim != 2:
            raise ReleaseError(f"{what}: INT4 words must be int32 [O, I/8], got {words.dtype} {list(words.shape)}")
        out_dim, nwords = words.shape
        groups = nwords * 8 // group_size
        if group_size % 8 or nwords * 8 % group_size or scales.shape != (out_dim, groups):
            raise ReleaseError(
                f"{what}: scales {list(scales.shape)} do not fit words {list(words.shape)} at group size {group_size}"
            )
        # Half-words hold four nibbles in column order: their histogram folds into the nibble histogram, and a
        # 64K-entry table gives their max |q| (16-bit rather than byte granularity halves the passes over the data).
        data = np.ascontiguousarray(words).view(np.uint16)  # [O, 2 I/8]
        counts = np.bincount(data.ravel(), minlength=1 << 16).reshape(16, 16, 16, 16)  # one axis per nibble
        nib = sum(counts.sum(axis=tuple(a for a in range(4) if a != keep)) for keep in range(4))
        self.nibbles = [a + int(b) for a, b in zip(self.nibbles, nib, strict=True)]
        per_half = np.take(_HALF_MAX_ABS, data).reshape(out_dim * groups, group_size // 4)
        group_max = _row_max(per_half).reshape(out_dim, groups)
        hist = np.bincount(group_max.ravel(), minlength=QMAX_ABS + 1)
        self.group_max = [a + int(b) for a, b in zip(self.group_max, hist, strict=True)]
        s = np.asarray(scales).astype(BF16)
        sf = s.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            amax = group_max.astype(np.float32) * sf  # exact in float32: 4 bits times 8 bits
            self.fixed_f32 += int(np.count_nonzero((amax / np.float32(7)).astype(BF16) == s))
            amax_bf16 = amax.astype(BF16).astype(np.float32)
            self.fixed_bf16 += int(np.count_nonzero((amax_bf16 / np.float32(7)).astype(BF16) == s))
        self.zero_groups_nonzero_scale += int(np.count_nonzero((group_max == 0) & (sf != 0)))
        self.tensors += 1
        self.bytes += words.nbytes + scales.nbytes

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "tensors": self.tensors,
            "values": self.values,
            "groups": self.groups,
            "nibbles": list(self.nibbles),
            "group_max_abs_q": list(self.group_max),
            "fixed_point_f32": self.fixed_f32,
            "fixed_point_bf16": self.fixed_bf16,
            "zero_groups_nonzero_scale": self.zero_groups_nonzero_scale,
        }


def int4_expert_pairs(cfg: K25Config) -> list[tuple[str, str]]:
    """``(weight_packed name, weight_scale name)`` of every routed-expert INT4 weight (empty when unquantized)."""
    packed: dict[tuple, str] = {}
    pairs = []
    for e in release_entries(cfg):
        if e.kind != "expert" or len(e.targets) != 1 or e.targets[0].path[-1] not in ("packed", "scales"):
            continue
        t = e.targets[0]
        key = (t.path[:-1], t.index)
        if t.path[-1] == "packed":
            packed[key] = e.sources[0].name
        else:
            pairs.append((packed.pop(key), e.sources[0].name))
    return pairs


def audit_release(path: str | os.PathLike, *, progress: bool = True, cfg: K25Config | None = None) -> GridAudit:
    """Audit the INT4 grid of the release at ``path``: reads each routed-expert word and scale tensor once, one
    pair at a time (memory: one tensor's words, its bytes and a byte per group). Raises :class:`ReleaseError`
    naming a missing or malformed tensor."""
    from tqdm.auto import tqdm

    path = os.fspath(path)
    cfg = cfg or from_release_config(path)
    group = cfg.quantization.group_size if cfg.quantization is not None else 32
    pairs = int4_expert_pairs(cfg)
    audit = GridAudit()
    with ReleaseReader(path) as reader:
        for names in pairs:
            for n in names:
                if n not in reader.tensors:
                    raise ReleaseError(f"{path}: tensor {n} (routed-expert INT4) is missing")
        total = sum(reader.tensors[n].nbytes for names in pairs for n in names)
        with tqdm(total=total, unit="B", unit_scale=True, desc="grid audit", disable=not progress) as bar:
            for words_name, scale_name in pairs:
                words, scales = reader.read(words_name), reader.read(scale_name)
                audit.add(words, scales, group, what=f"{path}: {words_name}")
                bar.update(words.nbytes + scales.nbytes)
    return audit


def format_audit(audit: GridAudit | dict) -> str:
    """The audit (or its :meth:`GridAudit.as_dict`) as text: verdict, nibble histogram, max |q| per group,
    fixed-point counts."""
    a = audit.as_dict() if isinstance(audit, GridAudit) else audit
    groups = a["groups"]
    lines = [
        f"INT4 grid: {a['verdict']} ({a['tensors']:,} routed-expert tensors, {a['values']:,} values, "
        f"{groups:,} groups of 32)",
        "  nibble histogram (nibble u holds q = u - 8):",
    ]
    for u, n in enumerate(a["nibbles"]):
        lines.append(f"    nibble {u:>2} (q = {u - 8:+d}){n:>20,}")
    lines.append("  groups by max |q|:")
    for m, n in enumerate(a["group_max_abs_q"]):
        if n or m >= 7:
            lines.append(f"    max |q| = {m}{n:>26,}")
    lines += [
        f"  kimi fixed point, float32 masters (bf16(float32(max|q| s) / 7) == s): {a['fixed_point_f32']:,} of "
        f"{groups:,} groups",
        f"  kimi fixed point, bf16 masters (bf16(float32(bf16(max|q| s)) / 7) == s): {a['fixed_point_bf16']:,} of "
        f"{groups:,} groups",
    ]
    if a["zero_groups_nonzero_scale"]:
        lines.append(f"  all-zero groups with a non-zero scale: {a['zero_groups_nonzero_scale']:,}")
    return "\n".join(lines)
