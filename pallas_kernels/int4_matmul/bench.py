"""Benchmark ``int4_matmul``: the Pallas kernel, XLA's dequantize-then-dot and a bf16 dot, side by side.

Shapes are K2.5's expert matrices (gate/up 7168 -> 2048, down 2048 -> 7168), decode rows (M = 1, 8, 16)
and prefill rows (M = 512, 4096). Reported per case: time per call, achieved GB/s and TFLOP/s against the
device roofline (bytes = the weight in that impl's format + activations + output), speedup over bf16, and
the max relative difference from the XLA result.

    python -m pallas_kernels.int4_matmul.bench [--out results.json] [--quick] [--sweep]

``--quick`` runs tiny shapes (a smoke test, e.g. on CPU where the kernels are interpreted); ``--sweep`` (GPU)
also times a few Triton block configurations at decode sizes to guide the defaults.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp

from pallas_kernels import bench_util as B
from pallas_kernels import int4_layout as L
from pallas_kernels.int4_matmul import gpu, ops
from pallas_kernels.selfcheck import random_int4

K25_SHAPES = ((7168, 2048), (2048, 7168))


def int4_bytes(m: int, k: int, n: int) -> float:
    return k * n / 2 + (k // L.GROUP) * n * 2 + (m * k + m * n) * 2


def bf16_bytes(m: int, k: int, n: int) -> float:
    return (k * n + m * k + m * n) * 2


def bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """The bf16 baseline: the same weight stored dequantized in bf16 (4x the bytes)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _xs(m: int, k: int, repeats: int, seed: int) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), repeats)
    return [jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16) for key in keys]


def _rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))


def run_case(kind: str, m: int, k: int, n: int, impls, peaks, iters: int, repeats: int) -> list[B.Result]:
    packed, scales = random_int4(jax.random.key(k * 7 + n), (), k, n)
    xs = _xs(m, k, repeats, seed=m)
    case = f"{kind} M={m} K={k} N={n}"
    reference = jax.jit(lambda x, p, s: ops.int4_matmul(x, p, s, impl="xla"))(xs[0], packed, scales)
    out = []
    for impl in impls:
        if impl == "bf16":
            w = jax.jit(lambda p, s: L.dequantize_device(p, s, jnp.bfloat16))(packed, scales)
            fn, args, nbytes = bf16_dot, (w,), bf16_bytes(m, k, n)
        else:
            fn, args, nbytes = functools.partial(ops.int4_matmul, impl=impl), (packed, scales), int4_bytes(m, k, n)
        seconds = B.time_op(fn, args, xs, iters=iters)
        err = _rel(jax.jit(fn)(xs[0], *args), reference)
        out.append(B.Result("int4_matmul", case, impl, seconds, nbytes, 2.0 * m * k * n, *peaks, err))
    return out


def sweep(peaks, iters: int, repeats: int, seconds: float) -> list[B.Result]:
    """Triton block configurations at decode sizes (GPU only), until ``seconds`` have passed."""
    out = []
    deadline = time.monotonic() + seconds
    for (k, n), m in itertools.product(K25_SHAPES, (8,)):
        packed, scales = random_int4(jax.random.key(k + n), (), k, n)
        xs = _xs(m, k, repeats, seed=1)
        for bn, bk, sk, stages in itertools.product((32, 64, 128), (256, 512), (None, 4), (3,)):
            if time.monotonic() > deadline:
                print("sweep: time budget spent")
                return out
            fn = functools.partial(
                gpu.int4_matmul, block_m=16, block_n=bn, block_k=bk, split_k=sk, num_stages=stages, interpret=False
            )
            try:
                seconds = B.time_op(fn, (packed, scales), xs, iters=iters)
            except Exception as e:  # a configuration Triton rejects is reported, not fatal
                print(f"sweep bn={bn} bk={bk} sk={sk} stages={stages}: {type(e).__name__}: {str(e)[:200]}")
                continue
            note = f"bn={bn} bk={bk} split_k={sk} stages={stages}"
            out.append(
                B.Result(
                    "int4_matmul",
                    f"decode M={m} K={k} N={n}",
                    "pallas",
                    seconds,
                    int4_bytes(m, k, n),
                    2.0 * m * k * n,
                    *peaks,
                    note=note,
                )
            )
    return out


def main(argv=None) -> list[B.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write results here (.json, plus a .md table beside it)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--sweep", action="store_true", help="also time Triton block configurations (GPU)")
    p.add_argument("--impls", default="pallas,xla,bf16")
    p.add_argument("--sweep-seconds", type=float, default=120.0, help="time budget of the sweep")
    p.add_argument("--budget-seconds", type=float, help="stop starting new cases after this long")
    p.add_argument("--peak-gbps", type=float)
    p.add_argument("--peak-tflops", type=float)
    args = p.parse_args(argv)
    peaks = B.roofline(gbps=args.peak_gbps, tflops=args.peak_tflops)
    impls = args.impls.split(",")
    if args.quick:
        cases = [("decode", 1, 256, 128, 2, 2), ("prefill", 64, 256, 128, 2, 2)]
    else:
        cases = [("decode", m, k, n, 20, 8) for m in (1, 8, 16) for k, n in K25_SHAPES]
        cases += [("prefill", m, k, n, 5, 2) for m in (512, 4096) for k, n in K25_SHAPES]
    results, not_run = [], []
    stop = time.monotonic() + (args.budget_seconds or float("inf"))
    for kind, m, k, n, iters, repeats in cases:
        if time.monotonic() > stop:
            not_run.append(f"- {kind} M={m} K={k} N={n}: not run (time budget)")
            continue
        results += run_case(kind, m, k, n, impls, peaks, iters, repeats)
    md = f"### int4_matmul ({B.header()})\n\n" + B.table(results, "bf16" if "bf16" in impls else impls[-1])
    if not_run:
        md += "\n\n" + "\n".join(not_run)
    if args.sweep and jax.default_backend() == "gpu":
        swept = sweep(peaks, iters=20, repeats=8, seconds=args.sweep_seconds)
        results += swept
        md += "\n\n#### Triton block sweep (decode)\n\n" + B.table(swept, "none")
    print(md)
    B.write(args.out, results, md)
    return results


if __name__ == "__main__":
    main()
