"""Benchmark plumbing shared by the ops' ``bench.py``: device rooflines, timing, result tables.

Timing: one jitted program runs the op on ``repeats`` distinct activation arrays (distinct so XLA cannot
merge the calls; passed as separate arguments so no slicing kernels sit between them), and the program is
dispatched ``iters`` times asynchronously before one ``block_until_ready``. The per-op time is the wall time
over ``iters * repeats`` calls, so host dispatch overlaps device work and is amortized; launch gaps between
kernels inside the program are included, as they would be in a model. The median of ``trials`` such
measurements is reported. Every number in a result table comes from the same run, side by side.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence

import jax

# (peak HBM GB/s, peak dense bf16 TFLOP/s) by device kind substring, from vendor data sheets.
ROOFLINES = {
    "H200": (4800.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "B200": (8000.0, 2250.0),
    "A100": (2039.0, 312.0),
    "TPU v6 lite": (1640.0, 918.0),
    "TPU v6e": (1640.0, 918.0),
    "TPU v5p": (2765.0, 459.0),
    "TPU v5 lite": (819.0, 197.0),
    "TPU v5e": (819.0, 197.0),
    "TPU v4": (1200.0, 275.0),
}


def roofline(device=None, gbps: float | None = None, tflops: float | None = None) -> tuple[float | None, float | None]:
    """Peak (GB/s, TFLOP/s) of ``device`` (default: the first device); explicit values win."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peaks in ROOFLINES.items():
        if name.lower() in kind.lower():
            return gbps or peaks[0], tflops or peaks[1]
    return gbps, tflops


def time_op(
    fn: Callable, args: Sequence, xs: Sequence, *, iters: int, trials: int = 3, slow_call_s: float = 0.05
) -> float:
    """Seconds per call of ``fn(x, *args)``, over the distinct activations ``xs`` (see module docstring).

    A call slower than ``slow_call_s`` needs no amortizing: it is timed alone (median of two calls).
    """
    single = jax.jit(fn)
    jax.block_until_ready(single(xs[0], *args))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(single(xs[0], *args))
    first = time.perf_counter() - start
    if first > slow_call_s:
        start = time.perf_counter()
        jax.block_until_ready(single(xs[0], *args))
        return statistics.median([first, time.perf_counter() - start])

    @jax.jit
    def program(args, xs):
        return [fn(x, *args) for x in xs]

    jax.block_until_ready(program(args, xs))  # compile and warm up
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = program(args, xs)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (iters * len(xs)))
    return statistics.median(samples)


@dataclasses.dataclass
class Result:
    op: str
    case: str  # e.g. "decode M=8 K=7168 N=2048"
    impl: str
    seconds: float
    bytes: float  # the least traffic this impl's weight format needs (weights + activations + output)
    flops: float
    peak_gbps: float | None
    peak_tflops: float | None
    max_rel_err: float | None = None  # against the XLA dequantize-then-dot result of the same case
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def roofline_fraction(self) -> float | None:
        """Roofline time (max of bytes / peak BW and flops / peak FLOP/s) over measured time."""
        if not self.peak_gbps or not self.peak_tflops:
            return None
        ideal = max(self.bytes / (self.peak_gbps * 1e9), self.flops / (self.peak_tflops * 1e12))
        return ideal / self.seconds

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(us=self.seconds * 1e6, gbps=self.gbps, tflops=self.tflops, roofline_fraction=self.roofline_fraction)
        return d


def table(results: Sequence[Result], baseline: str) -> str:
    """A markdown table; ``speedup`` is against the ``baseline`` impl of the same case."""
    base = {r.case: r.seconds for r in results if r.impl == baseline}
    lines = [
        "| case | impl | us | GB/s | % HBM | TFLOP/s | % roofline | speedup vs " + baseline + " | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        hbm = f"{100 * r.gbps / r.peak_gbps:.0f}" if r.peak_gbps else "-"
        roof = f"{100 * r.roofline_fraction:.0f}" if r.roofline_fraction is not None else "-"
        speed = f"{base[r.case] / r.seconds:.2f}x" if r.case in base else "-"
        err = f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else "-"
        lines.append(
            f"| {r.case} | {r.impl}{' ' + r.note if r.note else ''} | {r.seconds * 1e6:.1f} | {r.gbps:.0f} | "
            f"{hbm} | {r.tflops:.1f} | {roof} | {speed} | {err} |"
        )
    return "\n".join(lines)


def header() -> str:
    d = jax.devices()[0]
    gbps, tflops = roofline(d)
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, device {d.device_kind} x{len(jax.devices())}, "
        f"roofline {gbps or '?'} GB/s, {tflops or '?'} bf16 TFLOP/s"
    )


def write(path: str | None, results: Sequence[Result], markdown: str) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"header": header(), "results": [r.row() for r in results]}, f, indent=1)
    with open(path.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(markdown + "\n")
