"""``k25jax inspect``: what a release directory or a k25jax checkpoint holds, from headers and metadata only.

Reads ``config.json``, safetensors headers or the checkpoint's array metadata; no tensor data. Reports the
config summary, parameter counts (an INT4 weight counts its unpacked values, as the model does), bytes by kind
(INT4 expert words and scales, bf16, float32) and the quantization. With ``grid=True`` (``--grid``) it also reads
every routed-expert INT4 tensor of a release, streamed one at a time, and says which INT4 grid it is on
(:mod:`k25jax.release.grid`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

from convert.destination import JOURNAL_NAME, PARTIAL_SUFFIX, read_journal
from convert.orbax_format import read_array_specs
from k25jax.checkpoint import CHECKPOINT_MARKER
from k25jax.config import K25Config
from k25jax.release import grid as int4_grid
from k25jax.release.config import from_release_config
from k25jax.release.keymap import release_entries
from k25jax.release.reader import INDEX_NAME, SINGLE_NAME, ReleaseError, ReleaseReader


def _params(cfg: K25Config) -> dict[str, int]:
    """Logical parameter counts by part (INT4 experts count their unpacked values; scales are not counted)."""
    out: Counter = Counter()
    for e in release_entries(cfg):
        part = e.targets[0].path[0]  # text | vision | projector
        if e.kind == "expert":
            if e.sources[0].name.endswith("weight_packed"):  # INT4: packed [O, I/8] (+ shape); scales not counted
                o, words = e.sources[0].shape
                out["routed experts"] += o * words * 8
            elif not e.sources[0].name.endswith("weight_scale"):
                out["routed experts"] += math.prod(e.sources[0].shape)
        else:
            out[part] += math.prod(e.sources[0].shape)
    return dict(out)


def _kind(path_or_name: str, dtype: str) -> str:
    if path_or_name.endswith(("weight_packed", ".packed", "/packed")):
        return "INT4 expert words (int32)"
    if path_or_name.endswith(("weight_scale", ".scales", "/scales")):
        return "INT4 expert scales (bf16)"
    if path_or_name.endswith("weight_shape"):
        return "INT4 expert shapes (int32)"
    return {"BF16": "bf16", "bfloat16": "bf16", "F32": "float32", "float32": "float32"}.get(dtype, dtype)


def config_summary(cfg: K25Config) -> dict:
    t, v, q = cfg.text, cfg.vision, cfg.quantization
    out = {
        "layout": cfg.layout,
        "text": (
            f"{t.num_hidden_layers} layers ({t.num_dense_layers} dense + {t.num_moe_layers} MoE), hidden "
            f"{t.hidden_size}, {t.num_attention_heads} heads, MLA q_lora {t.q_lora_rank} / kv_lora {t.kv_lora_rank}, "
            f"vocab {t.vocab_size}"
        ),
        "experts": (
            f"{t.n_routed_experts} routed ({t.num_experts_per_tok} per token, groups {t.n_group}/{t.topk_group}) + "
            f"{t.n_shared_experts} shared, width {t.moe_intermediate_size}"
        ),
        "vision": "none"
        if v is None
        else f"MoonViT {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads",
        "quantization": "none (bf16 experts)"
        if q is None
        else (
            f"compressed-tensors {q.format}, int{q.num_bits} {'symmetric' if q.symmetric else 'asymmetric'}, "
            f"group {q.group_size}, routed experts only"
        ),
    }
    return out


def inspect_release(path: str, *, grid: bool = False, progress: bool = False) -> dict:
    from k25jax.release.loader import check_tensors

    cfg = from_release_config(path)
    reader = ReleaseReader(path)
    by_kind: Counter = Counter()
    for name, info in reader.tensors.items():
        by_kind[_kind(name, info.dtype)] += info.nbytes
    try:
        check_tensors(reader, release_entries(cfg))
        problem = None
    except ReleaseError as e:
        problem = str(e)
    audit = None
    if grid and problem is None:
        audit = int4_grid.audit_release(path, progress=progress, cfg=cfg).as_dict()
    return {
        "kind": "release",
        "path": path,
        "files": len(reader.files),
        "file_bytes": sum(reader.file_bytes(f) for f in reader.files),
        "tensors": len(reader.tensors),
        "config": config_summary(cfg),
        "parameters": _params(cfg),
        "bytes": dict(by_kind),
        "problem": problem,
        **({"grid": audit} if grid else {}),
    }


def inspect_checkpoint(path: str) -> dict:
    from convert.to_orbax import checkpoint_specs

    complete = os.path.isfile(os.path.join(path, CHECKPOINT_MARKER))
    cfg = from_release_config(path)
    entries = release_entries(cfg)
    specs = checkpoint_specs(cfg, entries)
    status = "complete"
    if not complete:
        journal = read_journal(os.path.join(path, JOURNAL_NAME))
        done = len(journal[1]) if journal else 0
        status = f"partial: {done} of {len(entries)} tensor groups converted (re-run the conversion to resume)"
        arrays = specs
    else:
        arrays = read_array_specs(path, specs)
    by_kind: Counter = Counter()
    for p, s in arrays.items():
        by_kind[_kind("/".join(p), str(s.dtype))] += s.nbytes
    disk, files = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            disk += os.path.getsize(os.path.join(root, n))
            files += 1
    return {
        "kind": "checkpoint",
        "path": path,
        "status": status,
        "arrays": len(arrays),
        "files": files,
        "file_bytes": disk,
        "config": config_summary(cfg),
        "parameters": _params(cfg),
        "bytes": dict(by_kind),
        "problem": None,
    }


def inspect_path(path: str | os.PathLike, *, grid: bool = False, progress: bool = False) -> dict:
    """A report dict for a release directory, a checkpoint, or an unfinished conversion (``DST.partial``).

    ``grid``: also audit a release's INT4 grid (reads the routed-expert tensors; a checkpoint raises). ``"tiny"`` is
    the shipped demo release."""
    from k25jax.demo.shipped import resolve

    path = os.path.abspath(resolve(path))
    if not os.path.exists(path) and os.path.isdir(path + PARTIAL_SUFFIX):
        path += PARTIAL_SUFFIX
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, CHECKPOINT_MARKER)) or os.path.isfile(os.path.join(path, JOURNAL_NAME)):
        if grid:
            raise ReleaseError(f"{path}: --grid audits a release directory; this is a k25jax checkpoint")
        return inspect_checkpoint(path)
    if os.path.isfile(os.path.join(path, INDEX_NAME)) or os.path.isfile(os.path.join(path, SINGLE_NAME)):
        return inspect_release(path, grid=grid, progress=progress)
    raise ReleaseError(f"{path}: neither a release (no {INDEX_NAME}) nor a k25jax checkpoint (no {CHECKPOINT_MARKER})")


def _gb(n: int) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale / 10:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def format_report(r: dict) -> str:
    lines = []
    if r["kind"] == "release":
        lines.append(f"release {r['path']}: {r['files']} shard files, {_gb(r['file_bytes'])}, {r['tensors']:,} tensors")
    else:
        lines.append(
            f"k25jax checkpoint {r['path']} ({r['status']}): {r['arrays']} arrays, {r['files']:,} files, "
            f"{_gb(r['file_bytes'])} on disk"
        )
    for k, v in r["config"].items():
        lines.append(f"  {k + ':':<14}{v}")
    params = r["parameters"]
    lines.append(f"  {'parameters:':<14}{sum(params.values()):,}")
    for k, v in sorted(params.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<24}{v:>20,}")
    lines.append(f"  {'bytes:':<14}{_gb(sum(r['bytes'].values()))} of tensor data")
    for k, v in sorted(r["bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<28}{_gb(v):>16}")
    if r.get("problem"):
        lines.append(f"  problem:      {r['problem']}")
    if r.get("grid"):
        lines += ["  " + line for line in int4_grid.format_audit(r["grid"]).splitlines()]
    return "\n".join(lines)


def format_json(r: dict) -> str:
    return json.dumps(r, indent=2)
