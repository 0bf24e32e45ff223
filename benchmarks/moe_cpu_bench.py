"""CPU strategies of the grouped SwiGLU by row count: one row at a time, tiles of 1..64 rows, and what ``"auto"``
picks (``ops.cpu_strategy`` / ``ops.cpu_tile``), on one layer of layer-stacked INT4 (or float) experts.

Rows are sorted by expert with random group sizes (uniform expert choice, seeded), as a decode step of
``rows / top_k`` tokens or a prefill chunk gives them. Each figure is the best of ``--trials`` means over
``--iters`` calls of the jitted op (microseconds per call, one MoE layer); every column of a row comes from the same
run. Defaults: the benchmarks' small model (E 32, D 256, F 128, ``benchmarks/release_model.py``).

    python benchmarks/moe_cpu_bench.py [--experts 32 --hidden 256 --ffn 128] [--rows 4 16 32 64 128 256 1024]
        [--tiles 1 2 4 8 16 32 64] [--float] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import release_model  # noqa: F401  (benchmarks/: puts this checkout on sys.path)

from k25jax.quant import Int4Array
from pallas_kernels.grouped_swiglu import cpu
from pallas_kernels.grouped_swiglu.ops import cpu_strategy, cpu_tile


def _weights(experts: int, hidden: int, ffn: int, layers: int, int4: bool, seed: int):
    rng = np.random.default_rng(seed)
    shapes = ((layers, experts, hidden, ffn), (layers, experts, hidden, ffn), (layers, experts, ffn, hidden))
    ws = [jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.05) for s in shapes]
    if not int4:
        return ws
    return [Int4Array.from_float(w) for w in ws]


def _time(fn, args, iters: int, trials: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters * 1e6)
    return best


def run(args) -> list[dict]:
    weights = _weights(args.experts, args.hidden, args.ffn, 2, not args.float, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    layer = jnp.int32(1)
    results = []
    print(
        f"E {args.experts}, D {args.hidden}, F {args.ffn}, {'float32' if args.float else 'INT4'} experts; us per call"
    )
    print(f"{'rows':>6} {'groups':>6} {'per_row':>8} " + " ".join(f"{'t' + str(t):>7}" for t in args.tiles) + "   auto")
    for rows in args.rows:
        x = jnp.asarray(rng.normal(size=(rows, args.hidden)).astype(np.float32))
        chosen = np.sort(rng.integers(0, args.experts, rows))
        sizes = jnp.asarray(np.bincount(chosen, minlength=args.experts).astype(np.int32))
        per_row = jax.jit(lambda x, g, w: cpu.per_row(x, g, *w, dtype=jnp.float32, layer=layer))
        per_row_us = _time(per_row, (x, sizes, weights), args.iters, args.trials)
        row = {"rows": rows, "groups": int((sizes > 0).sum()), "per_row_us": per_row_us}
        row["tiled_us"] = {}
        for tile in args.tiles:
            fn = jax.jit(lambda x, g, w, t=tile: cpu.tiled(x, g, *w, dtype=jnp.float32, layer=layer, tile=t))
            row["tiled_us"][tile] = _time(fn, (x, sizes, weights), args.iters, args.trials)
        strategy = cpu_strategy(rows, args.experts)
        row["auto"] = strategy if strategy != "tiled" else f"tiled {cpu_tile(rows, args.experts)}"
        results.append(row)
        cells = " ".join(f"{row['tiled_us'][t]:7.0f}" for t in args.tiles)
        print(f"{rows:6d} {row['groups']:6d} {row['per_row_us']:8.0f} {cells}   {row['auto']}", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 16, 32, 64, 128, 256, 1024])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--float", action="store_true", help="float32 experts instead of INT4")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    for name in ("experts", "hidden", "ffn", "iters", "trials"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % 32 or args.ffn % 32:
        ap.error(f"--hidden ({args.hidden}) and --ffn ({args.ffn}) must be multiples of 32 (the INT4 group)")
    if min(args.rows + args.tiles) < 1:
        ap.error("--rows and --tiles must be >= 1")
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "backend": jax.default_backend(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
