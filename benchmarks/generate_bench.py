"""Time to first token, prefill and decode throughput: ``k25jax.generate`` vs transformers ``generate``, one CPU run.

The model is what users load: a small K2.5-architecture model (``release_model.small_config``: Kimi layout,
vision tower and projector, routed experts INT4 on the kimi grid) exported as a release directory
(``convert.to_release.export_model``), then read from that directory by ``k25jax.load_model`` and by transformers
(``tests/oracle.hf_model_from_release``: ``Kimi_K25ForConditionalGeneration``, eager attention). Both compute in
float32 so their greedy tokens can be compared; text prompts, greedy, stop tokens off.

Per batch size ``B`` (prompts of ``--prompt`` random tokens), both through their public API, end to end (engine
set-up, prefill, host overhead included): ``t1`` = generate 1 new token (prefill + first token, i.e. the time to
first token), ``tN`` = generate ``--new + 1`` tokens. Prefill tok/s = ``B * P / t1``, decode tok/s =
``B * new / (tN - t1)``, end-to-end tok/s = ``B * (new + 1) / tN``. Each repeat runs the four timings in turn,
the sides interleaved (a noisy neighbour hits both alike); reported: median and min-max of ``--repeats`` repeats
after a warm-up (k25jax's warm-up, which compiles, is reported apart); ratios are k25jax / transformers of the
medians. "equal" says whether both sides gave the same greedy tokens.

Threads: the headline is each library's default (torch's ``get_num_threads()``, XLA's own pool: all cores). Run
without ``--threads``, the script measures that, then re-runs itself with ``--threads 1`` (one thread each:
torch ``set_num_threads(1)``; XLA ``intra_op_parallelism_threads=1``, Eigen threading off) on the same release
directory and reports both; ``--threads 0`` (defaults) or ``--threads 1`` measures only that setting.
Results go to ``benchmarks/results/generate_bench.json``.

    python benchmarks/generate_bench.py [--config small|tiny] [--prompt 32] [--new 64] [--batch 1 8]
        [--repeats 5] [--threads 0|1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


from cpu_threads import run_environment, threads_from_argv  # noqa: E402  (benchmarks/, the script's own folder)

THREADS = threads_from_argv(sys.argv, default=0)  # before jax is imported
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import release_model  # noqa: E402  (puts this checkout and tests/ on sys.path)
import torch  # noqa: E402

import k25jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides

PAUSE_S = 0.2  # between sides: the other side's idle worker threads stop spinning before a timing starts
TARGETS = {  # from the issue: k25jax / transformers
    "decode_b1": 3.0,
    "decode_b1_goal": 5.0,
    "decode_b8": 3.0,
    "prefill": 2.0,
}


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def measure(model, hf, cfg, args) -> dict:
    """The rows for every batch size at the current thread setting."""
    rng = np.random.default_rng(0)
    rows = []
    load_before = os.getloadavg()
    N = args.new + 1
    for B in args.batch:
        prompts = rng.integers(0, cfg.text.vocab_size - 256, (B, args.prompt))  # ordinary (non-special) ids
        ids = torch.as_tensor(prompts)
        mask = torch.ones_like(ids)

        def ours(n):
            return k25jax.generate(model, prompts.tolist(), max_new_tokens=n, temperature=0.0, stop_token_ids=())

        def theirs(n):
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[:, args.prompt :].tolist()

        def clock(fn, n):
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            out = fn(n)
            return time.perf_counter() - start, out

        start = time.perf_counter()
        ours(N)
        ours(1)
        compile_s = time.perf_counter() - start
        theirs(2)  # transformers' first call (allocations, lazy init)
        t = {"ours_1": [], "hf_1": [], "ours_n": [], "hf_n": []}
        equal = True
        for _ in range(args.repeats):
            for key, fn, n in (("ours_1", ours, 1), ("hf_1", theirs, 1), ("ours_n", ours, N), ("hf_n", theirs, N)):
                seconds, out = clock(fn, n)
                t[key].append(seconds)
                if key == "ours_n":
                    mine = out
                if key == "hf_n":
                    equal = equal and mine == out
        row = {"batch": B, "equal": equal, "k25jax_warmup_compile_s": compile_s}
        for side, a, b in (("k25jax", "ours_1", "ours_n"), ("transformers", "hf_1", "hf_n")):
            t1, tn = t[a], t[b]
            row[side] = {
                "ttft_s": spread(t1),
                "e2e_s": spread(tn),
                # per repeat, from that repeat's two timings
                "prefill_tok_s": spread([B * args.prompt / x for x in t1]),
                "decode_tok_s": spread([B * args.new / (y - x) for x, y in zip(t1, tn, strict=True)]),
                "e2e_tok_s": spread([B * N / y for y in tn]),
            }
        m1, mn = statistics.median(t["ours_1"]), statistics.median(t["ours_n"])
        h1, hn = statistics.median(t["hf_1"]), statistics.median(t["hf_n"])
        row["ratio"] = {  # of the medians of the times
            "ttft": h1 / m1,
            "prefill": h1 / m1,
            "decode": (hn - h1) / (mn - m1),
            "e2e": hn / mn,
        }
        rows.append(row)
        print_row(row, args)
    return {
        **run_environment(THREADS, load_before),
        "rows": rows,
    }


def header(threads: str, torch_threads: int) -> None:
    print(f"\nthreads: {threads} (torch {torch_threads}, XLA {'1' if threads == '1' else 'default pool'})")
    print(
        f"{'B':>2} | {'TTFT ms':^21} | {'prefill tok/s':^23} | {'decode tok/s':^23} | {'end-to-end tok/s':^23} | equal"
    )
    print(f"{'':>2} | {'k25jax':>6} {'torch':>6} {'ratio':>6} |" + f" {'k25jax':>7} {'torch':>7} {'ratio':>6} |" * 3)


def cell(stat, scale=1.0, fmt=".0f"):
    return f"{stat['median'] * scale:{fmt}}"


def print_row(row, args) -> None:
    ours, hf, r = row["k25jax"], row["transformers"], row["ratio"]
    print(
        f"{row['batch']:>2} | {cell(ours['ttft_s'], 1e3):>6} {cell(hf['ttft_s'], 1e3):>6} {r['ttft']:>5.2f}x |"
        f" {cell(ours['prefill_tok_s']):>7} {cell(hf['prefill_tok_s']):>7} {r['prefill']:>5.2f}x |"
        f" {cell(ours['decode_tok_s']):>7} {cell(hf['decode_tok_s']):>7} {r['decode']:>5.2f}x |"
        f" {cell(ours['e2e_tok_s']):>7} {cell(hf['e2e_tok_s']):>7} {r['e2e']:>5.2f}x |"
        f" {'yes' if row['equal'] else 'NO'}"
    )


def print_spread(result) -> None:
    load = result["load_average_before_after"]
    print(f"  machine load average (1 min) {load[0][0]:.1f} before, {load[1][0]:.1f} after (shared machine)")
    print(f"  spread over {len(result['rows'][0]['k25jax']['ttft_s']['runs'])} repeats (min-max):")
    for row in result["rows"]:
        parts = []
        for side in ("k25jax", "transformers"):
            s = row[side]
            parts.append(
                f"{side} TTFT {s['ttft_s']['min'] * 1e3:.0f}-{s['ttft_s']['max'] * 1e3:.0f} ms, "
                f"decode {s['decode_tok_s']['min']:.0f}-{s['decode_tok_s']['max']:.0f} tok/s"
            )
        print(
            f"  B {row['batch']}: "
            + "; ".join(parts)
            + f"; k25jax warm-up incl. compile {row['k25jax_warmup_compile_s']:.1f} s"
        )


def targets(results) -> list[str]:
    """The issue's targets, checked on each thread setting's medians."""

    def check(name, ratio, goal, word="NOT met"):
        return f"{name} {ratio:.2f}x (>= {goal:.0f}x: {'met' if ratio >= goal else word})"

    lines = []
    for res in results:
        by_b = {row["batch"]: row["ratio"] for row in res["rows"]}
        checks = []
        if 1 in by_b:
            d = by_b[1]["decode"]
            checks.append(check("decode B1", d, TARGETS["decode_b1"]))
            checks.append(check("goal", d, TARGETS["decode_b1_goal"], "not met"))
        if 8 in by_b:
            checks.append(check("decode B8", by_b[8]["decode"], TARGETS["decode_b8"]))
        for b, r in sorted(by_b.items()):
            checks.append(check(f"prefill B{b}", r["prefill"], TARGETS["prefill"]))
        lines.append(f"threads {res['threads']}: " + "; ".join(checks))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["small", "tiny"], default="small")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=64, help="decode tokens per sequence (after the first)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=None, help="0: library defaults only; 1: one thread each only (default: both)"
    )
    ap.add_argument("--release", help="an existing release directory (default: write one to a temporary folder)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "generate_bench.json"), help="where to write results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the re-run for --threads 1
    args = ap.parse_args(argv)
    both = args.threads is None
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = release_model.config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.release or os.path.join(tmp, "release")
        write_s = 0.0 if args.release else release_model.write_release(args.config, out_dir)
        start = time.perf_counter()
        model = release_model.load_k25jax(out_dir)
        load_s = time.perf_counter() - start
        hf = release_model.load_transformers(out_dir)
        if not args.child:
            print(
                f"model {release_model.describe(cfg)}; release written in {write_s:.1f} s, k25jax load {load_s:.1f} s\n"
                f"float32 both sides, CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
                f"prompt {args.prompt}, {args.new} + 1 new tokens, greedy, {args.repeats} repeats; "
                f"jax {jax.__version__}, torch {torch.__version__}, "
                f"transformers {__import__('transformers').__version__}"
            )
        header(str(THREADS or "default"), torch.get_num_threads())
        results = [measure(model, hf, cfg, args)]
        print_spread(results[0])
        if both:
            del model, hf
            with tempfile.TemporaryDirectory() as sub_tmp:
                sub_json = os.path.join(sub_tmp, "one.json")
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--threads",
                    "1",
                    "--release",
                    out_dir,
                    "--json",
                    sub_json,
                ]
                cmd += ["--config", args.config, "--prompt", str(args.prompt), "--new", str(args.new)]
                cmd += ["--repeats", str(args.repeats), "--batch", *map(str, args.batch), "--child"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"the --threads 1 run failed ({proc.returncode})")
                sys.stdout.write(proc.stdout)
                with open(sub_json) as f:
                    results += json.load(f)["results"]
    summary = targets(results)
    if not args.child:
        print("\ntargets (k25jax / transformers, medians):")
        for line in summary:
            print("  " + line)
    record = {
        "command": "python benchmarks/generate_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": release_model.describe(cfg),
        "prompt": args.prompt,
        "new_tokens": args.new + 1,
        "repeats": args.repeats,
        "cpu_cores": os.cpu_count(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "results": results,
        "targets": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    if not args.child:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
