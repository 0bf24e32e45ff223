"""The GPU check behind ``scripts/gpu_check.sh``: native INT4 kernel checks, then both benchmarks, within a budget.

    python scripts/gpu_check.py --out DIR [--budget 420] [--skip-checks] [--no-sweep] [--quick]

Writes into DIR: ``env.txt``, ``native_checks.txt`` (unless ``--skip-checks``), ``int4_gmm.{json,md}``,
``int4_matmul.{json,md}`` and ``summary.md`` (the issue's targets, met or not). Every stage is guarded: a
failure is written down and the next stage still runs. Needs only jax (with a GPU backend) and numpy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pallas_kernels import bench_util  # noqa: E402


def _write(out: str, name: str, text: str) -> None:
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def native_checks(out: str, deadline: float, quick: bool) -> str:
    from pallas_kernels import selfcheck

    lines, failed = [], 0
    for case in selfcheck.cases():
        if quick and case.k > 96:
            continue
        if time.monotonic() > deadline:
            lines.append(f"{case.name}: NOT RUN (time budget)")
            continue
        start = time.monotonic()
        try:
            err, tol = selfcheck.run(case, impl="pallas")
            ok = err <= tol
            failed += not ok
            took = time.monotonic() - start
            lines.append(f"{case.name}: {'PASS' if ok else 'FAIL'} rel err {err:.2e} (tol {tol:g}) {took:.1f}s")
        except Exception as e:  # noqa: BLE001 - a crash is a result to report
            failed += 1
            lines.append(f"{case.name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        print(lines[-1], flush=True)
    summary = f"native checks: {len(lines) - failed} of {len(lines)} pass"
    _write(out, "native_checks.txt", "\n".join([summary, *lines]) + "\n")
    return summary


def targets(gmm_results, matmul_results) -> list[str]:
    """The issue's targets: int4_matmul at M <= 16 >= 70% of HBM bandwidth; int4_gmm decode >= 2x bf16 ragged_dot."""
    lines = []
    dec = [r for r in matmul_results if r.impl == "pallas" and not r.note and r.case.startswith("decode")]
    if dec and dec[0].peak_gbps:
        worst = min(r.gbps / r.peak_gbps for r in dec)
        best = max(r.gbps / r.peak_gbps for r in dec)
        lines.append(
            f"int4_matmul decode (M <= 16): {100 * worst:.0f}-{100 * best:.0f}% of HBM bandwidth "
            f"(target >= 70%): {'MET' if worst >= 0.7 else 'NOT MET'}"
        )
    base = {r.case: r.seconds for r in gmm_results if r.impl == "bf16"}
    speedups = [
        base[r.case] / r.seconds
        for r in gmm_results
        if r.impl == "pallas" and r.case.startswith("decode") and r.case in base and not r.note
    ]
    if speedups:
        lines.append(
            f"int4_gmm decode vs bf16 ragged_dot: {min(speedups):.2f}x-{max(speedups):.2f}x "
            f"(target >= 2x): {'MET' if min(speedups) >= 2 else 'NOT MET'}"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    p.add_argument("--skip-checks", action="store_true", help="native checks already ran (pytest)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny benchmark shapes (smoke test of this script)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    env = f"{bench_util.header()}\ndevices: {jax.devices()}\npython {sys.version.split()[0]}\n"
    _write(args.out, "env.txt", env)
    print(env, flush=True)
    report = [f"# INT4 kernels: GPU check\n\n{bench_util.header()}\n"]
    gpu = jax.default_backend() == "gpu"
    if not gpu:
        report.append(f"**No GPU backend** (backend {jax.default_backend()}): timings below are not GPU numbers.\n")

    if not args.skip_checks:
        try:
            report.append(
                native_checks(args.out, t0 + 0.35 * args.budget, args.quick) + " (details: native_checks.txt)\n"
            )
        except Exception:  # noqa: BLE001
            report.append("native checks crashed:\n```\n" + traceback.format_exc()[-2000:] + "\n```\n")

    from pallas_kernels.int4_gmm import bench as gmm_bench
    from pallas_kernels.int4_matmul import bench as matmul_bench

    results = {}
    for name, bench, extra in (
        ("int4_gmm", gmm_bench, ["--prefill", "512"]),
        ("int4_matmul", matmul_bench, []),
    ):
        left = deadline - time.monotonic()
        if left < 30:
            report.append(f"{name}: not run (time budget)\n")
            continue
        share = left * (0.55 if name == "int4_gmm" else 0.9)  # the gmm bench runs first
        argv_b = ["--out", os.path.join(args.out, f"{name}.json"), "--budget-seconds", str(int(share * 0.6)), *extra]
        if args.quick:
            argv_b.append("--quick")
        if gpu and not args.no_sweep and left > 200:
            # the gmm bench goes first; leave the matmul bench its share
            argv_b += ["--sweep", "--sweep-seconds", str(int(share * 0.3))]
        try:
            results[name] = bench.main(argv_b)
            with open(os.path.join(args.out, f"{name}.md")) as f:
                report.append(f.read())
        except Exception:  # noqa: BLE001
            report.append(f"{name} benchmark crashed:\n```\n" + traceback.format_exc()[-3000:] + "\n```\n")
    lines = targets(results.get("int4_gmm", []), results.get("int4_matmul", []))
    report.insert(1, "\n".join(f"- {line}" for line in lines) + "\n" if lines else "")
    report.append(f"\n(total {time.monotonic() - t0:.0f} s)\n")
    _write(args.out, "summary.md", "\n".join(report))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
