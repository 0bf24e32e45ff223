"""Benchmark ``int4_gmm``: the Pallas kernel, XLA's dequantize-then-``ragged_dot`` and bf16 ``ragged_dot``.

K2.5's routed experts: 384 experts of 7168 -> 2048 (gate/up) and 2048 -> 7168 (down), 8 active per token,
tokens routed to 8 distinct experts uniformly at random. Decode: 1, 8, 64 tokens (8 to 512 rows); prefill:
512 and 4096 tokens (4096 and 32768 rows). Bytes count only the experts that own rows (what a grouped
kernel must read) in each impl's format, plus activations and output.

    python -m pallas_kernels.int4_gmm.bench [--out results.json] [--quick] [--sweep] [--experts 384]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import bench_util as B
from pallas_kernels import int4_layout as L
from pallas_kernels.int4_gmm import gpu, ops
from pallas_kernels.int4_matmul.bench import _rel, _xs
from pallas_kernels.selfcheck import random_int4

K25_SHAPES = ((7168, 2048), (2048, 7168))
TOP_K = 8


def routed_group_sizes(tokens: int, experts: int, top_k: int, seed: int) -> np.ndarray:
    """Rows per expert when each token picks ``top_k`` distinct experts uniformly at random."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(experts, size=top_k, replace=False) for _ in range(tokens)])
    return np.bincount(picks.reshape(-1), minlength=experts).astype(np.int32)


def bf16_ragged_dot(x, w, group_sizes):
    """The bf16 baseline: experts stored dequantized in bf16 (4x the bytes), XLA's ``ragged_dot``."""
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def run_case(kind, tokens, experts, k, n, impls, peaks, iters, repeats, per_row, max_call_s, skipped):
    """Time every impl on one case. ``per_row`` (impl -> seconds per row, from the last case of that shape)
    predicts this case's call time; impls predicted above ``max_call_s`` are skipped (``ragged_dot`` has been
    seen to compute densely over all experts, which at prefill sizes takes minutes) and noted in ``skipped``."""
    m = tokens * TOP_K
    sizes_np = routed_group_sizes(tokens, experts, TOP_K, seed=tokens)
    sizes = jnp.asarray(sizes_np)
    active = int((sizes_np > 0).sum())
    packed, scales = random_int4(jax.random.key(k * 7 + n), (experts,), k, n)
    xs = _xs(m, k, repeats, seed=tokens)
    case = f"{kind} tokens={tokens} rows={m} K={k} N={n} active={active}/{experts}"
    act = (m * k + m * n) * 2
    int4_bytes = active * (k * n / 2 + (k // L.GROUP) * n * 2) + act
    reference = jax.jit(lambda x, p, s, g: ops.int4_gmm(x, p, s, g, impl="xla"))(xs[0], packed, scales, sizes)
    out = []
    for impl in impls:
        predicted = per_row.get((impl, k, n), 0.0) * m
        if predicted > max_call_s:
            skipped.append(f"{case} / {impl}: skipped, predicted {predicted:.1f} s per call from the previous case")
            continue
        if impl == "bf16":
            w = jax.jit(lambda p, s: L.dequantize_device(p, s, jnp.bfloat16))(packed, scales)
            fn, args, nbytes = bf16_ragged_dot, (w, sizes), active * k * n * 2 + act
        else:
            fn, args, nbytes = functools.partial(ops.int4_gmm, impl=impl), (packed, scales, sizes), int4_bytes
        seconds = B.time_op(fn, args, xs, iters=iters)
        err = _rel(jax.jit(fn)(xs[0], *args), reference)
        out.append(B.Result("int4_gmm", case, impl, seconds, nbytes, 2.0 * m * k * n, *peaks, err))
        per_row[(impl, k, n)] = seconds / m
    return out


def sweep(experts, peaks, iters, repeats, seconds) -> list[B.Result]:
    """Triton block configurations at a decode size (8 tokens = 64 rows), GPU only, until ``seconds`` pass."""
    out = []
    deadline = time.monotonic() + seconds
    tokens = 8
    sizes_np = routed_group_sizes(tokens, experts, TOP_K, seed=tokens)
    sizes, active = jnp.asarray(sizes_np), int((sizes_np > 0).sum())
    for k, n in K25_SHAPES:
        packed, scales = random_int4(jax.random.key(k + n), (experts,), k, n)
        xs = _xs(tokens * TOP_K, k, repeats, seed=3)
        nbytes = active * (k * n / 2 + (k // L.GROUP) * n * 2) + (tokens * TOP_K * (k + n)) * 2
        for bm, bn, bk, stages in itertools.product((16,), (32, 64, 128), (256, 512), (3,)):
            if time.monotonic() > deadline:
                print("sweep: time budget spent")
                return out
            fn = functools.partial(gpu.int4_gmm, block_m=bm, block_n=bn, block_k=bk, num_stages=stages, interpret=False)
            try:
                seconds = B.time_op(fn, (packed, scales, sizes), xs, iters=iters)
            except Exception as e:  # a configuration Triton rejects is reported, not fatal
                print(f"sweep bn={bn} bk={bk} stages={stages}: {type(e).__name__}: {str(e)[:200]}")
                continue
            case = f"decode tokens={tokens} rows={tokens * TOP_K} K={k} N={n} active={active}/{experts}"
            out.append(
                B.Result(
                    "int4_gmm",
                    case,
                    "pallas",
                    seconds,
                    nbytes,
                    2.0 * tokens * TOP_K * k * n,
                    *peaks,
                    note=f"bm={bm} bn={bn} bk={bk} stages={stages}",
                )
            )
    return out


def main(argv=None) -> list[B.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write results here (.json, plus a .md table beside it)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--sweep", action="store_true", help="also time Triton block configurations (GPU)")
    p.add_argument("--experts", type=int, default=384)
    p.add_argument("--impls", default="pallas,xla,bf16")
    p.add_argument("--prefill", default="512,4096", help="prefill token counts ('' for none)")
    p.add_argument("--max-call-s", type=float, default=2.0, help="skip impls predicted slower than this per call")
    p.add_argument("--sweep-seconds", type=float, default=120.0, help="time budget of the sweep")
    p.add_argument("--budget-seconds", type=float, help="stop starting new cases after this long")
    p.add_argument("--peak-gbps", type=float)
    p.add_argument("--peak-tflops", type=float)
    args = p.parse_args(argv)
    peaks = B.roofline(gbps=args.peak_gbps, tflops=args.peak_tflops)
    impls = args.impls.split(",")
    if args.quick:
        e = min(args.experts, 16)
        cases = [("decode", 1, e, 256, 128, 2, 2), ("prefill", 16, e, 256, 128, 2, 2)]
    else:
        e = args.experts
        cases = [("decode", t, e, k, n, 20, 8) for t in (1, 8, 64) for k, n in K25_SHAPES]
        prefill = [int(t) for t in args.prefill.split(",") if t]
        cases += [("prefill", t, e, k, n, 3, 2) for t in prefill for k, n in K25_SHAPES]
    results, per_row, skipped = [], {}, []
    stop = time.monotonic() + (args.budget_seconds or float("inf"))
    for kind, tokens, experts, k, n, iters, repeats in cases:
        if time.monotonic() > stop:
            skipped.append(f"{kind} tokens={tokens} K={k} N={n}: not run (time budget)")
            continue
        results += run_case(
            kind, tokens, experts, k, n, impls, peaks, iters, repeats, per_row, args.max_call_s, skipped
        )
    md = f"### int4_gmm ({B.header()})\n\n" + B.table(results, "bf16" if "bf16" in impls else impls[-1])
    if skipped:
        md += "\n\n" + "\n".join(f"- {line}" for line in skipped)
    if args.sweep and jax.default_backend() == "gpu":
        swept = sweep(e, peaks, iters=20, repeats=8, seconds=args.sweep_seconds)
        results += swept
        md += "\n\n#### Triton block sweep (decode, 8 tokens)\n\n" + B.table(swept, "none")
    print(md)
    B.write(args.out, results, md)
    return results


if __name__ == "__main__":
    main()
