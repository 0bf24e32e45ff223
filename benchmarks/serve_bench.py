"""HTTP serving benchmark: ``k25jax serve`` vs ``transformers serve`` on the benchmarks' small model, one CPU run.

Model: ``release_model`` (small K2.5 architecture with vision tower, Kimi layout, INT4 experts on the kimi grid),
written as a release directory (plus the embedded tiny tokenizer as ``tiktoken.model``), float32 on both sides.

Servers, each a subprocess on a free port, started one after the other (never both at once):

- ``k25jax serve --model REL --max-slots S --warmup 256`` (other settings default): the engine compiles the
  prefill and decode shapes of sequences up to 256 positions before it serves (its start-up time is recorded).
- ``transformers serve`` on the same weights, where it runs. In transformers 5.24 on this machine it does not load
  ``Kimi_K25ForConditionalGeneration`` (its processor needs torchvision, not installed: the error is recorded), so
  it serves the text model: ``DeepseekV3ForCausalLM`` holding the release's language-model and lm_head tensors
  (``oracle.hf_model_from_release``), ``save_pretrained`` with a ``PreTrainedTokenizerFast`` converted from the
  same ``tiktoken.model`` and a Kimi-style chat template. ``transformers serve`` always passes ``device_map``,
  which needs ``accelerate`` (not installed); the launcher maps ``device_map="cpu"`` to ``None`` (the model stays
  on the CPU, where it would go anyway) and runs the stock CLI otherwise. It has no ``ignore_eos``; the saved
  generation config has no EOS, so replies run to ``max_completion_tokens`` (checked: ``ran_to_max``).

Load: asyncio + httpx, ``--concurrency`` clients (1, 4, 16), each sending its next request when the last ends,
``max(--min-requests, 2 x clients)`` requests per level, each level after its own untimed warm-up pass (as many
requests, other prompts of the same length rule: the level's batch shapes compile there).
Streaming ``/v1/chat/completions`` with ``stream_options.include_usage``, ``max_completion_tokens``, temperature 0,
a fixed seed, ``ignore_eos`` (k25jax only). Workloads: ``fixed`` (prompt 64 tokens, output 64) and ``mixed``
(prompt and output lengths uniform on the integers of [L(1-r), L(1+r)] with r 0.5: vLLM's random-dataset rule,
not SGLang's [L r, L]). Prompts: random ordinary tokens of the tiny tokenizer, decoded to text (each re-encodes to
exactly its length); the chat template adds a fixed number of tokens (prompt counts come from ``usage``).

Metrics (``vllm bench serve`` names): request_throughput, output_throughput, total_token_throughput (per second of
the level's wall time), and mean / median / p99 (ms) of ttft (first chunk with choices), tpot ((latency - ttft) /
(output tokens - 1)), itl (gaps between chunks; k25jax sends one chunk per decode window of up to 8 tokens, so its
ITL is per chunk, not per token), e2el. Output tokens: ``usage.completion_tokens``.

    python benchmarks/serve_bench.py [--concurrency 1,4,16] [--workloads fixed,mixed] [--no-transformers]

Results: ``benchmarks/results/serve_bench.json`` and ``serve_bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import release_model  # noqa: E402  (puts tests/ and the checkout on sys.path)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)

TF_LAUNCHER = """
import sys
import transformers.modeling_utils as mu
_check = mu.check_and_set_device_map
mu.check_and_set_device_map = lambda dm: None if dm in ("cpu", None) else _check(dm)
from transformers.cli.transformers import main
sys.argv = ["transformers", "serve", *sys.argv[1:]]
main()
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


TEXT_KEYS = ("content", "reasoning_content", "reasoning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- model directories --------------------------------------------------------------------------------------


def make_release(out_dir: str) -> float:
    from importlib import resources

    seconds = release_model.write_release("small", out_dir)
    with resources.as_file(resources.files("k25jax") / "assets" / "tiny_tiktoken.model") as p:
        shutil.copy(p, os.path.join(out_dir, "tiktoken.model"))
    return seconds


def hf_tokenizer(release: str):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from k25jax.tokenizer import NUM_SPECIAL, PATTERN, Tokenizer

    tok = Tokenizer.from_pretrained(release)
    names = [tok.special_names.get(tok.num_base + i, f"<|reserved_token_{i}|>") for i in range(NUM_SPECIAL)]
    conv = TikTokenConverter(
        vocab_file=os.path.join(release, "tiktoken.model"), pattern=PATTERN, extra_special_tokens=names
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), eos_token="<|im_end|>", bos_token="[BOS]")
    fast.chat_template = CHAT_TEMPLATE
    sample = "hello there, how are you? 12345"
    assert fast.encode(sample) == tok.encode(sample), "converted tokenizer differs from k25jax's"
    return fast


def make_hf_dirs(release: str, kimi_dir: str, text_dir: str) -> dict:
    """Kimi_K25 and DeepseekV3 (text) directories for transformers serve; what loads where."""
    from transformers import AutoProcessor, DeepseekV3ForCausalLM

    hf = release_model.load_transformers(release)
    fast = hf_tokenizer(release)
    hf.save_pretrained(kimi_dir)
    fast.save_pretrained(kimi_dir)
    info = {}
    try:
        AutoProcessor.from_pretrained(kimi_dir)  # what transformers serve does first for a VLM
        info["kimi_k25"] = "loads"
    except Exception as err:  # noqa: BLE001  (recorded)
        info["kimi_k25"] = f"{type(err).__name__}: {err}"
    tc = hf.config.text_config
    tc.architectures = ["DeepseekV3ForCausalLM"]
    ds = DeepseekV3ForCausalLM(tc)
    state = {"model." + k: v for k, v in hf.model.language_model.state_dict().items()}
    state.update({"lm_head." + k: v for k, v in hf.lm_head.state_dict().items()})
    ds.load_state_dict(state, strict=True)
    ds.generation_config.eos_token_id = None
    ds.save_pretrained(text_dir)
    fast.save_pretrained(text_dir)
    return info


# -- servers ------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, name: str, argv: list[str], port: int, model: str, log: str):
        self.name, self.port, self.model, self.log_path = name, port, model, log
        self.log = open(log, "w")  # noqa: SIM115
        start = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready(start)

    def wait_ready(self, start: float, timeout: float = 900.0) -> None:  # k25jax serve --warmup compiles first
        import httpx

        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {tail(self.log_path)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tail(path: str, n: int = 2000) -> str:
    with open(path) as f:
        return f.read()[-n:]


# -- workloads ----------------------------------------------------------------------------------------------


def prompt_text(tok, rng: random.Random, length: int) -> str:
    """Text of random ordinary tokens that re-encodes to exactly ``length`` ids."""
    for _ in range(1000):
        ids = [rng.randrange(256, tok.num_base) for _ in range(length)]
        text = tok.decode(ids)
        again = tok.encode(text, allow_special=False)
        if len(again) >= length:
            text = tok.decode(again[:length])
            if len(tok.encode(text, allow_special=False)) == length:
                return text
    raise RuntimeError(f"no prompt of {length} tokens")


def workload(kind: str, count: int, seed: int, prompt_len: int = 64, output_len: int = 64, ratio: float = 0.5):
    from k25jax.tokenizer import Tokenizer

    tok = Tokenizer.tiny()
    rng = random.Random(seed)

    def draw(n):
        return n if kind == "fixed" else rng.randint(int(n * (1 - ratio)), int(n * (1 + ratio)))

    out = []
    for _ in range(count):
        p, o = draw(prompt_len), draw(output_len)
        out.append((prompt_text(tok, rng, p), max(o, 2)))
    return out


# -- load generator -----------------------------------------------------------------------------------------


async def one_request(client, server: Server, prompt: str, max_tokens: int, seed: int, ignore_eos: bool) -> dict:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": max_tokens,
        "temperature": 0,
        "seed": seed,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    ttft, last, itl, usage = None, None, [], None
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if chunk.get("choices") and (any(k in delta for k in TEXT_KEYS) or (ttft is None and not delta)):
                if ttft is None:
                    ttft = now - start
                else:
                    itl.append(now - last)
                last = now
    e2e = time.perf_counter() - start
    n = usage["completion_tokens"]
    return {
        "ttft": ttft,
        "e2el": e2e,
        "itl": itl,
        "tpot": (e2e - ttft) / (n - 1) if n > 1 else None,
        "output_tokens": n,
        "prompt_tokens": usage["prompt_tokens"],
        "asked": max_tokens,
    }


async def run_level(server: Server, requests, concurrency: int, seed: int, ignore_eos: bool):
    import httpx

    queue = list(enumerate(requests))
    results = []

    async def client_loop(client):
        while queue:
            i, (prompt, n) = queue.pop(0)
            results.append(await one_request(client, server, prompt, n, seed + i, ignore_eos))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def pct(values, q):
    s = sorted(values)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results, wall: float) -> dict:
    out_tok = sum(r["output_tokens"] for r in results)
    in_tok = sum(r["prompt_tokens"] for r in results)
    row = {
        "completed": len(results),
        "duration_s": wall,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "ran_to_max": all(r["output_tokens"] == r["asked"] for r in results),
        "request_throughput": len(results) / wall,
        "output_throughput": out_tok / wall,
        "total_token_throughput": (in_tok + out_tok) / wall,
    }
    series = {
        "ttft": [r["ttft"] for r in results],
        "tpot": [r["tpot"] for r in results if r["tpot"] is not None],
        "itl": [g for r in results for g in r["itl"]],
        "e2el": [r["e2el"] for r in results],
    }
    for key, vals in series.items():
        ms = [v * 1000 for v in vals]
        row[f"mean_{key}_ms"] = statistics.fmean(ms) if ms else None
        row[f"median_{key}_ms"] = statistics.median(ms) if ms else None
        row[f"p99_{key}_ms"] = pct(ms, 99)
    return row


def bench_server(server: Server, args, ignore_eos: bool) -> list[dict]:
    rows = []
    for kind in args.workloads:
        for c in args.concurrency:
            # warm-up at this level (its batch shapes compile), other prompts of the same lengths, not timed
            warm = workload(kind, max(args.min_requests, 2 * c), args.seed + 999 + c)
            asyncio.run(run_level(server, warm, c, args.seed, ignore_eos))
            reqs = workload(kind, max(args.min_requests, 2 * c), args.seed)
            results, wall = asyncio.run(run_level(server, reqs, c, args.seed, ignore_eos))
            row = {"server": server.name, "workload": kind, "concurrency": c, **summarize(results, wall)}
            print(
                f"{server.name:13s} {kind:5s} c={c:3d}: {row['output_throughput']:8.1f} out tok/s, "
                f"{row['request_throughput']:6.2f} req/s, median ttft {row['median_ttft_ms']:8.1f} ms, "
                f"median tpot {row['median_tpot_ms']:7.2f} ms, to max {row['ran_to_max']}",
                flush=True,
            )
            rows.append(row)
    return rows


# -- report -------------------------------------------------------------------------------------------------


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (server, kind), style in zip(
        sorted({(r["server"], r["workload"]) for r in rows}), ["o-", "s--", "o-", "s--"], strict=False
    ):
        pts = sorted((r["concurrency"], r) for r in rows if r["server"] == server and r["workload"] == kind)
        xs = [c for c, _ in pts]
        color = "tab:blue" if server == "k25jax" else "tab:orange"
        label = f"{server} ({kind})"
        axes[0].plot(xs, [r["output_throughput"] for _, r in pts], style, color=color, label=label)
        axes[1].plot(xs, [r["median_tpot_ms"] for _, r in pts], style, color=color, label=label)
    for ax, title in zip(axes, ["output throughput (tok/s)", "median TPOT (ms)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("serve_bench: small K2.5 model, CPU, streaming /v1/chat/completions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--workloads", default="fixed,mixed")
    ap.add_argument("--min-requests", type=int, default=8, help="requests per level: max(this, 2 x clients)")
    ap.add_argument("--max-slots", type=int, default=16, help="k25jax serve --max-slots")
    ap.add_argument(
        "--warmup", type=int, default=256, help="k25jax serve --warmup (compile the shapes of sequences up to N)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.workloads = args.workloads.split(",")
    os.makedirs(args.out, exist_ok=True)
    import torch
    import transformers

    tmp = tempfile.mkdtemp(prefix="serve_bench_")
    report = {
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
        "model": release_model.describe(release_model.config("small")),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "workloads": {
            "fixed": "prompt 64 tokens (before the chat template), output 64",
            "mixed": "prompt and output uniform on integers of [L(1-r), L(1+r)], L 64, r 0.5 (vLLM rule)",
        },
        "requests_per_level": f"max({args.min_requests}, 2 x concurrency), after an untimed warm-up pass at that level",
        "servers": {},
        "rows": [],
    }
    try:
        release = os.path.join(tmp, "release")
        report["release_write_s"] = make_release(release)
        port = free_port()
        argv = [os.path.join(BIN, "k25jax"), "serve", "--model", release, "--port", str(port)]
        argv += ["--max-slots", str(args.max_slots), "--log-level", "warning", "--warmup", str(args.warmup)]
        srv = Server("k25jax", argv, port, "kimi-k2.5", os.path.join(tmp, "k25jax.log"))
        report["servers"]["k25jax"] = {"argv": " ".join(argv[1:]).replace(tmp, "$TMP"), "startup_s": srv.startup_s}
        try:
            report["rows"] += bench_server(srv, args, ignore_eos=True)
        finally:
            srv.stop()
        if not args.no_transformers:
            kimi, text = os.path.join(tmp, "hf_kimi"), os.path.join(tmp, "hf_text")
            info = make_hf_dirs(release, kimi, text)
            port = free_port()
            launcher = os.path.join(tmp, "tf_serve.py")
            with open(launcher, "w") as f:
                f.write(TF_LAUNCHER)
            argv = [PYTHON, launcher, text, "--device", "cpu", "--dtype", "float32", "--port", str(port)]
            entry = {"kimi_k25_dir": info["kimi_k25"], "served": "DeepseekV3ForCausalLM (text model of the release)"}
            entry["device_map_patch"] = "device_map='cpu' -> None (accelerate not installed)"
            try:
                srv = Server("transformers", argv, port, text, os.path.join(tmp, "tf.log"))
            except RuntimeError as err:
                entry["error"] = str(err)
                srv = None
            if srv is not None:
                entry["startup_s"] = srv.startup_s
                try:
                    report["rows"] += bench_server(srv, args, ignore_eos=False)
                finally:
                    srv.stop()
            report["servers"]["transformers"] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by = {(r["server"], r["workload"], r["concurrency"]): r for r in report["rows"]}
    ratios = {}
    top = max(args.concurrency)
    for kind in args.workloads:
        k1, kt = by.get(("k25jax", kind, 1)), by.get(("k25jax", kind, top))
        tf = by.get(("transformers", kind, top))
        ratios[kind] = {
            f"k25jax_c{top}_vs_c1": kt["output_throughput"] / k1["output_throughput"] if k1 and kt else None,
            f"k25jax_vs_transformers_c{top}": kt["output_throughput"] / tf["output_throughput"] if tf and kt else None,
        }
    report["ratios_output_throughput"] = ratios
    print(json.dumps(ratios, indent=1))
    with open(os.path.join(args.out, "serve_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report["rows"], os.path.join(args.out, "serve_bench.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
