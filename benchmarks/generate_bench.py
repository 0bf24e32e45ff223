"""Prefill and decode throughput: k25jax (latent cache, absorbed decode) vs transformers (PyTorch), same CPU run.

Both run the same function: a random ``DeepseekV3ForCausalLM`` is written as a release directory (the test
oracle's writer) and loaded by k25jax, float32 on both sides, greedy, stop tokens off. Method, identical for
both: ``t1`` = generate 1 new token (prefill + one sample), ``tN`` = generate ``N + 1`` new tokens;
prefill tokens/s = ``B * P / t1``, decode tokens/s = ``B * N / (tN - t1)``; median of ``--repeats`` runs after a
warm-up (k25jax compile time reported apart).

Threads: ``--threads N`` gives both sides N CPU threads (torch ``set_num_threads``; XLA's CPU client
``intra_op_parallelism_threads`` with Eigen threading off when N is 1). The default, 1, keeps the ratio steady on
a shared machine, where a multi-threaded torch degrades badly when other processes take its cores.

    python benchmarks/generate_bench.py [--config small|tiny] [--prompt 128] [--new 64] [--batch 1 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


from cpu_threads import threads_from_argv  # noqa: E402  (benchmarks/, the script's own folder)

THREADS = threads_from_argv(sys.argv, default=1)  # before jax is imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout's k25jax, and the oracle's release writer

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from k25jax import load_model  # noqa: E402
from k25jax.config import RunConfig, tiny  # noqa: E402
from k25jax.generation import generate  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides


def small_config():
    """Wider and deeper than ``tiny`` (still CPU-sized): D 256, 6 layers, 8 heads, 32 experts top-4."""
    base = tiny()
    text = dataclasses.replace(
        base.text,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
    )
    return dataclasses.replace(base, text=text, vision=None, layout="deepseek_v3", name="small").validate()


def configs(name):
    if name == "tiny":
        return dataclasses.replace(tiny(), vision=None, layout="deepseek_v3").validate()
    return small_config()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["small", "tiny"], default="small")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=64, help="decode tokens per sequence")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for each side (default 1; 0: all cores)")
    args = ap.parse_args(argv)

    import oracle

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = configs(args.config)
    hf = oracle.make_hf_text_model(cfg, seed=0)
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as tmp:
        oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp, num_shards=1)
        model = load_model(tmp, RunConfig(compute_dtype=jnp.float32), progress=False)

    t = cfg.text
    print(
        f"config {args.config}: D {t.hidden_size}, layers {t.num_hidden_layers}, heads {t.num_attention_heads}, "
        f"experts {t.n_routed_experts} top-{t.num_experts_per_tok}, vocab {t.vocab_size}; float32, CPU "
        f"({os.cpu_count()} cores, {args.threads or 'all'} thread(s) each), prompt {args.prompt}, "
        f"{args.new} new tokens, jax {jax.__version__}, "
        f"torch {torch.__version__}"
    )
    print(f"{'batch':>5} | {'prefill tok/s':>27} | {'decode tok/s':>27} | greedy tokens equal")
    print(f"{'':>5} | {'k25jax':>8} {'torch':>8} {'ratio':>8} | {'k25jax':>8} {'torch':>8} {'ratio':>8} |")
    rng = np.random.default_rng(0)
    for B in args.batch:
        prompts = rng.integers(0, t.vocab_size - 256, (B, args.prompt))
        ids = torch.as_tensor(prompts)
        mask = torch.ones_like(ids)

        def ours(n):
            return generate(model, prompts.tolist(), max_new_tokens=n, temperature=0.0, stop_token_ids=())

        def theirs(n):
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        start = time.perf_counter()
        ours(args.new + 1)
        ours(1)
        compile_s = time.perf_counter() - start
        theirs(2)
        ours_1, ours_n = timed(lambda: ours(1), args.repeats), timed(lambda: ours(args.new + 1), args.repeats)
        hf_1, hf_n = timed(lambda: theirs(1), args.repeats), timed(lambda: theirs(args.new + 1), args.repeats)
        equal = ours(args.new + 1) == theirs(args.new + 1)[:, args.prompt :].tolist()
        pre = (B * args.prompt / ours_1, B * args.prompt / hf_1)
        dec = (B * args.new / (ours_n - ours_1), B * args.new / (hf_n - hf_1))
        print(
            f"{B:>5} | {pre[0]:>8.0f} {pre[1]:>8.0f} {pre[0] / pre[1]:>7.2f}x | "
            f"{dec[0]:>8.0f} {dec[1]:>8.0f} {dec[0] / dec[1]:>7.2f}x | {'yes' if equal else 'NO'}"
            f"   (k25jax warm-up incl. compile {compile_s:.1f} s)"
        )


if __name__ == "__main__":
    main()
