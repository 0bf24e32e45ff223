"""Serving throughput and latency: the k25jax engine (continuous batching) vs one request at a time through
``k25jax.generate`` vs transformers, one CPU run.

Model: the one of ``generate_bench.py`` (``release_model``: small K2.5 architecture with its vision tower, Kimi
layout, INT4 experts on the kimi grid, written as a release directory and loaded from it by ``k25jax.load_model``
and by transformers' ``Kimi_K25ForConditionalGeneration``), float32 on both sides.

Workload: ``--requests`` (64) text requests, prompt lengths uniform on the integers ``--prompt-range`` (16..128,
both ends included; neither vLLM's ``[L(1-r), L(1+r)]`` nor SGLang's ``[L r, L]`` rule) and output lengths uniform
on ``--output-range`` (16..96), random ordinary token ids, seeded; greedy, no stop tokens, so every request gives
exactly its output length and every system does the same work. Systems:

- ``engine``: ``k25jax.Engine(model, max_slots=--slots, max_context=--max-context)``, other settings default; a
  fresh engine per run (no prefix reuse across runs).
  ``at once``: all requests submitted, then ``engine.run()``. ``poisson``: a single-thread loop submits the
  requests whose arrival time has passed, then ``engine.step()``, sleeping when idle until the next arrival.
- ``generate``: the requests one after another, each ``k25jax.generate(model, [prompt], max_new_tokens=n)``.
- ``transformers``: its continuous batching (``hf.init_continuous_batching`` manager sized like the engine,
  ``add_request`` per request with its own ``max_new_tokens``, at once and at the same Poisson arrival times)
  when it runs on this model (checked first with a 2-token probe); in
  transformers 5.24 it does not (the paged cache is laid out per KV head, ``DeepseekV3Attention`` writes its MLA
  latents into it: the error is recorded), and the script falls back to what users do without it: static batches of
  ``--slots`` requests through ``hf.generate`` (left-padded, run to the batch's longest output, each request cut to
  its own length); for arrivals, each batch takes the requests that have arrived (at most ``--slots``).

Arrivals: exponential gaps (seeded), first at 0, at ``--rate`` requests/s; by default ``--load`` (0.75) times the
request rate the engine reached at once in the same run, so the engine is loaded but not saturated. The same
arrival times go to every system.

Metrics (the keys of ``vllm bench serve``): request_throughput, output_throughput, total_token_throughput (per
second of the run: first arrival to last finish), ttft, tpot, e2el (mean / median / p99, ms), each request's
clock starting at its arrival (at once: the run's start, so queueing counts); TTFT is the time the host holds the
first token (the engine's ``Request.times``; transformers: its first ``StoppingCriteria`` call, or the CB
timestamps). ``generate`` returns whole replies, so it has no TTFT. Each system runs ``--repeats`` times, the
systems taking turns within a repeat; reported: medians over the repeats, min-max of the throughputs, ratios of
the medians. Warm-up (compilation) is reported apart: the engine's prefill and decode for groups of 1..
``--warmup-groups`` requests per prompt bucket and one untimed at-once run; ``generate`` one request per shape.
jax compilation still left inside a timed run (a group size the warm-up missed) is measured
(``jax.monitoring``) and printed with that run. Greedy tokens: every request's engine tokens (and
transformers') are compared with its ``generate`` tokens.

Threads: as ``generate_bench.py``: without ``--threads`` the library defaults (the headline), then a re-run of
itself with ``--threads 1`` on the same release; ``--threads 0`` / ``--threads 1`` measures only that setting.
Results: ``benchmarks/results/engine_bench.json`` and ``engine_bench.png`` (needs matplotlib).

    python benchmarks/engine_bench.py [--config small|tiny] [--requests 64] [--slots 16] [--repeats 3]
        [--rate R | --load 0.75] [--threads 0|1]
"""

from __future__ import annotations

import argparse
import json
import logging
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
from k25jax import Engine, Sampling  # noqa: E402
from k25jax.serve.engine import bucket  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides

GREEDY = Sampling(temperature=0.0, stop_token_ids=())
COMPILE_S = [0.0]  # tracing + lowering + XLA compilation, summed (jax.monitoring)


def _count_compile(event, seconds, **kwargs):
    if event.startswith("/jax/core/compile/"):
        COMPILE_S[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)
PAUSE_S = 0.3  # between systems: idle worker threads of the other library stop spinning
TARGETS = {"engine_vs_generate": 4.0, "engine_vs_transformers": 1.0}


# ------------------------------------------------------------------------------------------------------------
# Workload and metrics
# ------------------------------------------------------------------------------------------------------------


def make_workload(n, prompt_range, output_range, vocab, seed=0):
    rng = np.random.default_rng(seed)
    plen = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
    olen = rng.integers(output_range[0], output_range[1] + 1, n)
    return [
        (rng.integers(0, vocab - 256, int(p)).tolist(), int(o)) for p, o in zip(plen, olen, strict=True)
    ]  # ordinary (non-special) ids


def make_arrivals(n, rate, seed=1):
    gaps = np.random.default_rng(seed).exponential(1.0, n - 1) / rate
    return np.concatenate([[0.0], np.cumsum(gaps)]).tolist()


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def metrics(work, start, first, end, tokens) -> dict:
    """``start`` / ``first`` / ``end``: per request, seconds from the run's start (``first`` may be None)."""
    duration = max(end)
    out_tokens = sum(len(t) for t in tokens)
    prompt_tokens = sum(len(p) for p, _ in work)
    e2el = [(e - s) * 1e3 for s, e in zip(start, end, strict=True)]
    m = {
        "completed": len(work),
        "duration_s": duration,
        "request_throughput": len(work) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
    }
    series = {"e2el": e2el}
    if all(f is not None for f in first):
        series["ttft"] = [(f - s) * 1e3 for s, f in zip(start, first, strict=True)]
        series["tpot"] = [
            (e - f) * 1e3 / (len(t) - 1) for f, e, t in zip(first, end, tokens, strict=True) if len(t) > 1
        ]
    for key in ("ttft", "tpot", "e2el"):
        values = series.get(key)
        m[f"mean_{key}_ms"] = float(np.mean(values)) if values else None
        m[f"median_{key}_ms"] = pct(values, 50)
        m[f"p99_{key}_ms"] = pct(values, 99)
    m["ttft_ms"] = series.get("ttft")  # per request, for the plot
    m["e2el_ms"] = e2el
    return m


# ------------------------------------------------------------------------------------------------------------
# k25jax
# ------------------------------------------------------------------------------------------------------------


def engine_run(model, work, arrivals, args):
    """The engine, requests at ``arrivals`` (None: all at once). Returns (metrics, tokens, engine stats)."""
    engine = Engine(model, max_slots=args.slots, max_context=args.max_context)
    t0 = time.perf_counter()
    if arrivals is None:
        reqs = [engine.submit(p, GREEDY, max_tokens=n) for p, n in work]
        engine.run()
        start = [0.0] * len(work)
    else:
        reqs, i = [], 0
        while i < len(work) or not engine.idle:
            now = time.perf_counter() - t0
            while i < len(work) and arrivals[i] <= now:
                reqs.append(engine.submit(work[i][0], GREEDY, max_tokens=work[i][1]))
                i += 1
            if engine.idle:
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
                continue
            engine.step()
        start = arrivals
    first = [r.times["first_token"] - t0 for r in reqs]
    end = [r.times["finished"] - t0 for r in reqs]
    tokens = [list(r.tokens) for r in reqs]
    assert all(r.finish_reason == "length" for r in reqs) and [len(t) for t in tokens] == [n for _, n in work]
    return metrics(work, start, first, end, tokens), tokens, dict(engine.stats)


def generate_run(model, work):
    """One request at a time through ``k25jax.generate`` (all offered at the start)."""
    t0 = time.perf_counter()
    tokens, end = [], []
    for p, n in work:
        tokens.append(k25jax.generate(model, [p], max_new_tokens=n, temperature=0.0, stop_token_ids=())[0])
        end.append(time.perf_counter() - t0)
    return metrics(work, [0.0] * len(work), [None] * len(work), end, tokens), tokens


def warm_engine(model, work, args):
    """Compile what the runs use. The engine compiles its batched prefill once per (number of slots prefilled
    together, prompt bucket) and its decode window once per (live slots rounded up to a power of two, cache span
    bucket), about 3 s each here; so warm up groups of 1..``--warmup-groups`` requests for each bucket the prompts
    fall in, each decoding a window (what Poisson arrivals mostly give), then the at-once run itself (untimed).
    Compilation left inside a timed run is reported with it. Returns the buckets."""
    rng = np.random.default_rng(2)
    buckets = sorted({bucket(len(p)) for p, _ in work})
    engine = Engine(model, max_slots=args.slots, max_context=args.max_context)
    for T in buckets:
        for group in range(1, min(args.warmup_groups, args.slots) + 1):
            for _ in range(group):  # admitted and prefilled together, then decoded together: all slots are free
                engine.submit(rng.integers(0, 1024, T).tolist(), GREEDY, max_tokens=args.warmup_tokens)
            engine.run()
    engine_run(model, work, None, args)
    return buckets


def warm_generate(model, work):
    """``generate`` sizes its engine per call: one request per (prompt bucket, context bucket) of the workload."""
    seen = {}
    for p, n in work:
        seen.setdefault((bucket(len(p)), bucket(len(p) + n, 128)), (p, n))
    for p, n in seen.values():
        k25jax.generate(model, [p], max_new_tokens=n, temperature=0.0, stop_token_ids=())
    return sorted(seen)


# ------------------------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------------------------


def cb_config(slots):
    """Sized like the engine (``slots`` requests, 256-token pages): left to itself, transformers' CB takes 90% of
    the free memory for its cache on CPU too."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=2 * slots, max_batch_tokens=2048, max_requests_per_batch=slots)


def cb_probe(hf, slots):
    """None when transformers' continuous batching generates on this model, else the error text."""
    from transformers import GenerationConfig

    log = logging.getLogger("ContinuousBatchingLogger")  # its traceback: the error text is reported instead
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        manager = hf.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=2),
            continuous_batching_config=cb_config(slots),
        )
    except Exception as err:  # noqa: BLE001  (whatever it raises is the answer)
        log.setLevel(level)
        return f"{type(err).__name__}: {err}"
    manager.start()
    try:
        manager.add_request([1, 2, 3, 4], request_id="probe", max_new_tokens=2)
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                return None if r.error is None else r.error
            if r is None and not manager.is_running():
                return "the generation thread stopped without a result"
        return "no result within 300 s"
    finally:
        manager.stop(block=True, timeout=30)
        log.setLevel(level)


def cb_run(hf, work, arrivals, slots):
    """transformers' continuous batching: requests added at ``arrivals`` (None: all at once) from this thread."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work))
    manager = hf.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config(slots))
    manager.start()
    t0 = time.perf_counter()
    sent, results, i = {}, {}, 0
    try:
        while len(results) < len(work):
            now = time.perf_counter() - t0
            while i < len(work) and (arrivals is None or arrivals[i] <= now):
                sent[f"r{i}"] = time.perf_counter() - t0
                manager.add_request(work[i][0], request_id=f"r{i}", max_new_tokens=work[i][1], record_timestamps=True)
                i += 1
            wait = 0.5 if i == len(work) else max(1e-3, arrivals[i] - (time.perf_counter() - t0))
            r = manager.get_result(timeout=wait)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"transformers CB request {r.request_id}: {r.error}")
                results[r.request_id] = (r, time.perf_counter() - t0)
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers CB: the generation thread stopped")
    finally:
        manager.stop(block=True, timeout=30)
    keys = [f"r{i}" for i in range(len(work))]
    tokens = [list(results[k][0].generated_tokens) for k in keys]
    first = [results[k][0].timestamps[0] - t0 for k in keys]
    end = [results[k][1] for k in keys]
    start = [0.0] * len(work) if arrivals is None else arrivals
    return metrics(work, start, first, end, tokens), tokens


class _FirstToken:
    """A stopping criterion that never stops and notes when it is first called (the first new token)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_batch(hf, batch, pad_id):
    """One static batch through ``hf.generate``: (tokens per request, first-token time, end time)."""
    from transformers import StoppingCriteriaList

    width = max(len(p) for p, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, _) in enumerate(batch):  # left padding
        ids[b, width - len(p) :] = torch.as_tensor(p)
        mask[b, width - len(p) :] = 1
    longest = max(n for _, n in batch)
    first = _FirstToken()
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=longest,
        min_new_tokens=longest,
        do_sample=False,
        pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList([first]),
    )
    end = time.perf_counter()
    return [out[b, width : width + n].tolist() for b, (_, n) in enumerate(batch)], first.at, end


def static_run(hf, work, arrivals, slots, pad_id):
    """Static batches of at most ``slots`` requests: in order (arrivals None), or each batch taking the requests
    that have arrived when it starts (waiting for the next one when none has)."""
    t0 = time.perf_counter()
    n = len(work)
    tokens, first, end = [None] * n, [None] * n, [None] * n
    i = 0
    while i < n:
        if arrivals is None:
            take = list(range(i, min(n, i + slots)))
        else:
            now = time.perf_counter() - t0
            if arrivals[i] > now:
                time.sleep(arrivals[i] - now)
                now = time.perf_counter() - t0
            take = [j for j in range(i, min(n, i + slots)) if arrivals[j] <= now]
        outs, at, done = hf_batch(hf, [work[j] for j in take], pad_id)
        for j, t in zip(take, outs, strict=True):
            tokens[j], first[j], end[j] = t, at - t0, done - t0
        i = take[-1] + 1
    start = [0.0] * n if arrivals is None else arrivals
    return metrics(work, start, first, end, tokens), tokens


# ------------------------------------------------------------------------------------------------------------
# One thread setting
# ------------------------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats of every metric, min-max of the throughputs, per-request series pooled."""
    out = {"repeats": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, list):
            continue
        if value is None:
            out[key] = None
            continue
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        if key.endswith("throughput"):
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
            out[f"{key}_runs"] = values
    for key in ("ttft_ms", "e2el_ms"):
        out[key] = None if runs[0][key] is None else [x for r in runs for x in r[key]]
    return out


def measure(model, hf, cfg, args, work) -> dict:
    pad_id = cfg.pad_token_id
    load_before = os.getloadavg()
    start = time.perf_counter()
    buckets = warm_engine(model, work, args)
    warm = {"engine_s": time.perf_counter() - start, "engine_prefill_buckets": buckets}
    start = time.perf_counter()
    warm["generate_shapes"] = [list(s) for s in warm_generate(model, work)]
    warm["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cb_error = None if args.no_cb else cb_probe(hf, args.slots)
    warm["transformers_cb_probe_s"] = time.perf_counter() - start
    hf_name = "transformers CB" if cb_error is None and not args.no_cb else "transformers static batches"
    start = time.perf_counter()
    hf_batch(hf, work[:2], pad_id)
    warm["transformers_s"] = time.perf_counter() - start
    print(
        f"warm-up (compile): engine {warm['engine_s']:.1f} s (prefill buckets {buckets}), generate "
        f"{warm['generate_s']:.1f} s ({len(warm['generate_shapes'])} shapes), transformers "
        f"{warm['transformers_s']:.1f} s"
        + ("" if args.no_cb else f", CB probe {warm['transformers_cb_probe_s']:.1f} s")
    )
    if cb_error is not None:
        print(f"transformers continuous batching does not run on this model: {cb_error.splitlines()[-1][:300]}")
        print(f"  -> {hf_name} through hf.generate instead")

    def hf_run(arrivals):
        if hf_name == "transformers CB":
            return cb_run(hf, work, arrivals, args.slots)
        return static_run(hf, work, arrivals, args.slots, pad_id)

    names = [("engine", "at once"), ("engine", "poisson"), ("generate", "at once"), (hf_name, "at once")]
    names.append((hf_name, "poisson"))
    runs = {k: [] for k in names}
    stats = {}
    equal = {k: [] for k in names if k[0] != "generate"}
    rate = args.rate
    arrivals = None if rate is None else make_arrivals(len(work), rate)
    for rep in range(args.repeats):
        got = {}
        for name, mode in names:
            if mode == "poisson" and arrivals is None:  # rate from this run's engine at once
                rate = args.load * runs[("engine", "at once")][0]["request_throughput"]
                arrivals = make_arrivals(len(work), rate)
            time.sleep(PAUSE_S)
            when = None if mode == "at once" else arrivals
            compiled_before = COMPILE_S[0]
            if name == "engine":
                m, tokens, stats[mode] = engine_run(model, work, when, args)
            elif name == "generate":
                m, tokens = generate_run(model, work)
            else:
                m, tokens = hf_run(when)
            m["compile_s"] = COMPILE_S[0] - compiled_before  # jax compilation inside the timed run (0 = warm)
            runs[(name, mode)].append(m)
            got[(name, mode)] = tokens
            print(
                f"  repeat {rep + 1}: {name:<27} {mode:<8} {m['output_throughput']:7.0f} output tok/s, "
                f"{m['duration_s']:6.2f} s" + (f" (incl. {m['compile_s']:.1f} s jax compile)" if m["compile_s"] else "")
            )
        ref = got[("generate", "at once")]
        for k in equal:
            equal[k].append(sum(a == b for a, b in zip(got[k], ref, strict=True)))
    systems = {f"{n} | {m}": summarize(runs[(n, m)]) for n, m in names}
    for (n, m), counts in equal.items():
        systems[f"{n} | {m}"]["tokens_equal_generate"] = f"{min(counts)}/{len(work)}"
    return {
        **run_environment(THREADS, load_before),
        "rate": rate,
        "warmup": warm,
        "transformers_cb_error": cb_error,
        "transformers_system": hf_name,
        "engine_stats_last_run": stats,
        "systems": systems,
    }


def fmt(v, spec=".0f"):
    return "-" if v is None else f"{v:{spec}}"


def print_table(res) -> None:
    print(
        f"\nthreads: {res['threads']} (torch {res['torch_threads']}); Poisson rate {res['rate']:.2f} req/s; "
        "medians over the repeats, throughput min-max; machine load average (1 min) "
        f"{res['load_average_before_after'][0][0]:.1f} before, {res['load_average_before_after'][1][0]:.1f} after"
    )
    print(
        f"{'system':<28} {'arrivals':<8} | {'req/s':>6} | {'output tok/s (min-max)':>22} | {'TTFT ms mean/med/p99':>20}"
        f" | {'TPOT ms med':>11} | {'e2el ms mean/med/p99':>20} | equal"
    )
    for key, s in res["systems"].items():
        name, mode = key.split(" | ")
        tp = f"{s['output_throughput']:.0f} ({s['output_throughput_min']:.0f}-{s['output_throughput_max']:.0f})"
        ttft = "/".join(fmt(s[f"{a}_ttft_ms"]) for a in ("mean", "median", "p99"))
        e2el = "/".join(fmt(s[f"{a}_e2el_ms"]) for a in ("mean", "median", "p99"))
        print(
            f"{name:<28} {mode:<8} | {s['request_throughput']:6.2f} | {tp:>22} | {ttft:>20} | "
            f"{fmt(s['median_tpot_ms'], '.1f'):>11} | {e2el:>20} | {s.get('tokens_equal_generate', 'ref')}"
        )


def ratios(res) -> dict:
    s = res["systems"]
    hf = res["transformers_system"]
    out = {
        "engine_vs_generate": s["engine | at once"]["output_throughput"] / s["generate | at once"]["output_throughput"],
        "engine_vs_transformers_at_once": s["engine | at once"]["output_throughput"]
        / s[f"{hf} | at once"]["output_throughput"],
        "engine_vs_transformers_poisson": s["engine | poisson"]["output_throughput"]
        / s[f"{hf} | poisson"]["output_throughput"],
        "ttft_median_transformers_over_engine_poisson": s[f"{hf} | poisson"]["median_ttft_ms"]
        / s["engine | poisson"]["median_ttft_ms"],
    }
    return out


def target_lines(results) -> list[str]:
    lines = []
    for res in results:
        r = ratios(res)
        hf = res["transformers_system"]
        ahead = min(r["engine_vs_transformers_at_once"], r["engine_vs_transformers_poisson"]) > 1
        lines.append(
            f"threads {res['threads']}: engine / one-at-a-time generate {r['engine_vs_generate']:.2f}x output tok/s "
            f"(>= {TARGETS['engine_vs_generate']:.0f}x: "
            f"{'met' if r['engine_vs_generate'] >= TARGETS['engine_vs_generate'] else 'NOT met'}); engine / {hf} "
            f"{r['engine_vs_transformers_at_once']:.2f}x at once, {r['engine_vs_transformers_poisson']:.2f}x Poisson "
            f"(ahead: {'met' if ahead else 'NOT met'}); "
            f"median TTFT under Poisson {r['ttft_median_transformers_over_engine_poisson']:.1f}x lower"
        )
    return lines


# ------------------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------------------


def plot(record, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    results = record["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    keys = list(results[0]["systems"])
    labels = [k.replace("transformers static batches", "transformers static").replace(" | ", "\n") for k in keys]
    width = 0.8 / len(results)
    colors = ["tab:blue", "tab:orange"]
    for j, res in enumerate(results):
        med = [res["systems"][k]["output_throughput"] for k in keys]
        lo = [m - res["systems"][k]["output_throughput_min"] for k, m in zip(keys, med, strict=True)]
        hi = [res["systems"][k]["output_throughput_max"] - m for k, m in zip(keys, med, strict=True)]
        x = np.arange(len(keys)) + (j - (len(results) - 1) / 2) * width
        ax.bar(x, med, width, yerr=[lo, hi], capsize=3, color=colors[j % 2], label=f"threads: {res['threads']}")
        for xi, m in zip(x, med, strict=True):
            ax.text(xi, m, f"{m:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), labels, fontsize=7)
    ax.set_ylabel("output tokens/s (median, min-max bars)")
    rates = ", ".join(f"{r['rate']:.1f}" for r in results)
    ax.set_title(f"{record['workload']['requests']} requests, output tok/s (Poisson at {rates} req/s)", fontsize=9)
    ax.legend(fontsize=8)
    head = results[0]
    for ax, series, title in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "e2el_ms", "end-to-end latency")):
        for k in keys:
            values = head["systems"][k][series]
            if values is None:
                continue
            v = np.sort(values)
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), color=f"C{keys.index(k)}", label=k.replace(" | ", ", "))
        ax.set_xscale("log")
        ax.set_xlabel(f"{title}, ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF, threads: {head['threads']}, all repeats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"k25jax engine vs one-at-a-time generate vs transformers on CPU ({record['cpu_cores']} cores), "
        f"{record['model'].split(':')[0]} model, float32",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["small", "tiny"], default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[16, 128], metavar=("LO", "HI"))
    ap.add_argument("--output-range", type=int, nargs=2, default=[16, 96], metavar=("LO", "HI"))
    ap.add_argument("--slots", type=int, default=16, help="engine max_slots; transformers' static batch size")
    ap.add_argument("--max-context", type=int, default=256, help="engine max_context")
    ap.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (default: --load x engine's)")
    ap.add_argument("--load", type=float, default=0.75, help="default rate as a fraction of the engine's at once")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-tokens", type=int, default=9, help="new tokens of each engine warm-up request")
    ap.add_argument(
        "--warmup-groups",
        type=int,
        default=4,
        help="engine warm-up: prefill group sizes 1..N per bucket (--slots: all)",
    )
    ap.add_argument("--no-cb", action="store_true", help="skip the transformers CB probe (static batches)")
    ap.add_argument(
        "--threads", type=int, default=None, help="0: library defaults only; 1: one thread each only (default: both)"
    )
    ap.add_argument("--release", help="an existing release directory (default: write one to a temporary folder)")
    ap.add_argument("--json", default=os.path.join(RESULTS, "engine_bench.json"))
    ap.add_argument("--plot", default=os.path.join(RESULTS, "engine_bench.png"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the re-run for --threads 1
    args = ap.parse_args(argv)
    both = args.threads is None
    if args.threads:
        torch.set_num_threads(args.threads)
    if max(args.prompt_range) + max(args.output_range) > args.max_context:
        raise SystemExit("--max-context must hold the longest prompt plus the longest output")

    cfg = release_model.config(args.config)
    work = make_workload(args.requests, args.prompt_range, args.output_range, cfg.text.vocab_size)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.release or os.path.join(tmp, "release")
        write_s = 0.0 if args.release else release_model.write_release(args.config, out_dir)
        model = release_model.load_k25jax(out_dir)
        hf = release_model.load_transformers(out_dir)
        if not args.child:
            print(
                f"model {release_model.describe(cfg)}; release written in {write_s:.1f} s; float32 both sides\n"
                f"CPU {platform.machine()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); "
                f"{args.requests} requests, prompts uniform {args.prompt_range[0]}..{args.prompt_range[1]}, "
                f"outputs uniform {args.output_range[0]}..{args.output_range[1]} tokens, greedy, no stop; "
                f"engine max_slots {args.slots}, max_context {args.max_context}; {args.repeats} repeats; "
                f"jax {jax.__version__}, torch {torch.__version__}, "
                f"transformers {__import__('transformers').__version__}"
            )
        print(f"\nthreads: {THREADS or 'default'}")
        results = [measure(model, hf, cfg, args, work)]
        print_table(results[0])
        if both:
            del model, hf
            with tempfile.TemporaryDirectory() as sub_tmp:
                sub_json = os.path.join(sub_tmp, "one.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--threads", "1", "--release", out_dir]
                cmd += ["--json", sub_json, "--child", "--config", args.config, "--requests", str(args.requests)]
                cmd += ["--prompt-range", *map(str, args.prompt_range), "--output-range", *map(str, args.output_range)]
                cmd += ["--slots", str(args.slots), "--max-context", str(args.max_context), "--load", str(args.load)]
                cmd += ["--repeats", str(args.repeats), "--warmup-tokens", str(args.warmup_tokens)]
                cmd += ["--warmup-groups", str(args.warmup_groups)]
                cmd += (["--rate", str(args.rate)] if args.rate else []) + (["--no-cb"] if args.no_cb else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                sys.stdout.write(proc.stdout)
                if proc.returncode:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"the --threads 1 run failed ({proc.returncode})")
                with open(sub_json) as f:
                    results += json.load(f)["results"]
    summary = target_lines(results)
    record = {
        "command": "python benchmarks/engine_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": release_model.describe(cfg),
        "workload": {
            "requests": args.requests,
            "prompt_tokens": "uniform integers {}..{}".format(*args.prompt_range),
            "output_tokens": "uniform integers {}..{}".format(*args.output_range),
            "total_prompt_tokens": sum(len(p) for p, _ in work),
            "total_output_tokens": sum(n for _, n in work),
            "seed": 0,
            "arrival_seed": 1,
        },
        "slots": args.slots,
        "max_context": args.max_context,
        "repeats": args.repeats,
        "cpu_cores": os.cpu_count(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "wall_s": time.perf_counter() - wall,
        "results": results,
        "ratios": [ratios(r) for r in results],
        "targets": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    if args.child:
        return
    print("\ntargets (output tok/s, medians):")
    for line in summary:
        print("  " + line)
    print(f"wrote {args.json}")
    if plot(record, args.plot):
        print(f"wrote {args.plot}")
    print(f"total wall time {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
