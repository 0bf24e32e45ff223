"""Train-step throughput: k25jax (INT4 QAT and plain float training) vs transformers + PyTorch AdamW, one CPU run.

Same dimensions on both sides (``tiny`` text stack, or ``small``; ``tests/oracle.hf_text_kwargs`` gives the
``DeepseekV3ForCausalLM`` of the same config), float32, the same random batch (``--batch`` rows of ``--seq``
tokens, every token a target). One iteration = forward + backward + optimizer step:

- ``k25jax qat``: routed experts as fake-quant weights (``to_fake_quant``, kimi grid, dynamic scales), every text
  parameter trained (``trainable_filter("^text/")``), ``make_train_step`` (AdamW, global-norm clip 1.0): the
  ``k25jax finetune`` step (``--storage-bf16`` adds its bf16 rounding of the non-expert parameters);
- ``k25jax float``: the same model with float experts and no fake-quant (``quantization=None``), same step;
- ``torch``: ``DeepseekV3ForCausalLM`` (transformers' default attention and experts implementations), mean
  cross-entropy, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW``.

Each repeat times ``--steps`` iterations; the sides take turns within every repeat (so a noisy neighbour hits all
of them alike); reported: the median of ``--repeats`` repeats after a warm-up, and the spread (min-max) in
tokens/s. k25jax compile time (``lower().compile()``) is reported apart. ``--experts`` runs the k25jax rows with
each expert strategy (``RunConfig.experts``); ``--breakdown`` adds per-iteration milliseconds of the forward, the
forward + backward, and the whole step.

Threads: by default both sides use every core (XLA's and torch's defaults); ``--threads 1`` gives each one thread
(torch ``set_num_threads``; XLA's ``intra_op_parallelism_threads`` with Eigen threading off).

    python benchmarks/train_bench.py [--config tiny|small] [--batch 32] [--seq 64] [--repeats 7] [--threads 1]
        [--experts auto grouped tiled per_row] [--breakdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


from cpu_threads import threads_from_argv  # noqa: E402  (benchmarks/, the script's own folder)

THREADS = threads_from_argv(sys.argv, default=0)  # before jax is imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import k25jax  # noqa: E402
from k25jax.config import RunConfig, tiny  # noqa: E402
from k25jax.train.qat import to_fake_quant, trainable_filter  # noqa: E402
from k25jax.train.step import OptimizerConfig, make_train_step, model_loss, split_model, storage_rounded  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides

LR = 1e-4
PAUSE_S = 0.3  # between sides: the other side's idle worker threads stop spinning before a timing starts


def configs(name):
    if name == "tiny":
        return dataclasses.replace(tiny(), vision=None, layout="deepseek_v3").validate()
    from generate_bench import small_config

    return small_config()


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.text.vocab_size - 256, (batch, seq + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
    }


class Jax:
    """One k25jax training setup: the jitted step compiled ahead of time, its state carried between calls."""

    def __init__(self, cfg, batch, *, qat: bool, experts: str, storage_bf16: bool):
        self.name = f"k25jax {'qat' if qat else 'float'} [{experts}]"
        run = RunConfig(compute_dtype="float32", experts=experts)
        model = k25jax.build_model(cfg if qat else dataclasses.replace(cfg, quantization=None), run, seed=0)
        if qat:
            to_fake_quant(model, grid="kimi", scales="dynamic")
        graphdef, trainable, self.frozen = split_model(model, trainable_filter("^text/"))
        optimizer = OptimizerConfig(lr=LR, steps=10_000, clip_norm=1.0)
        tx = optimizer.build()
        storage = "bfloat16" if storage_bf16 else None
        self.graphdef, self.storage = graphdef, storage
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.state = (trainable, tx.init(trainable))
        step = make_train_step(graphdef, tx, optimizer.schedule(), storage_dtype=storage)
        start = time.perf_counter()
        self.step = step.lower(*self.state, self.frozen, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.hlo = self.step.as_text()

    def __call__(self):
        trainable, opt_state, metrics = self.step(*self.state, self.frozen, self.batch)
        self.state = (trainable, opt_state)
        return float(metrics["loss"])

    def parts(self):
        """Jitted forward (loss) and forward + backward of the same function the step differentiates."""
        graphdef, frozen, storage = self.graphdef, self.frozen, self.storage

        def loss(params, batch):
            return model_loss(nnx.merge(graphdef, storage_rounded(params, storage), frozen), batch)[0]

        forward = jax.jit(loss)
        backward = jax.jit(jax.value_and_grad(loss))
        params = self.state[0]
        return (
            lambda: jax.block_until_ready(forward(params, self.batch)),
            lambda: jax.block_until_ready(backward(params, self.batch)),
        )


class Torch:
    """``DeepseekV3ForCausalLM`` of the same config with ``torch.optim.AdamW``."""

    def __init__(self, cfg, batch):
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        import oracle

        torch.set_grad_enabled(True)  # the oracle module turns gradients off when imported
        torch.manual_seed(0)
        self.model = DeepseekV3ForCausalLM(DeepseekV3Config(**oracle.hf_text_kwargs(cfg))).float().train()
        c = self.model.config
        self.name = "torch"
        self.impl = f"attention {c._attn_implementation}, experts {getattr(c, '_experts_implementation', '?')}"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        self.ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        self.targets = torch.as_tensor(batch["targets"], dtype=torch.long)
        self.compile_s = 0.0

    def loss(self):
        logits = self.model(input_ids=self.ids).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.targets.reshape(-1))

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()

    def parts(self):
        def forward():
            with torch.no_grad():
                self.loss()

        def backward():
            self.model.zero_grad(set_to_none=True)
            self.loss().backward()

        return forward, backward


def expert_paths(hlo: str) -> str:
    """Which routed-expert strategies the compiled step runs (their named scopes in the HLO), forward and backward
    (autodiff names its backward ops ``transpose(...)``)."""
    found = []
    for scope in ("grouped_swiglu_cpu_tiled", "grouped_swiglu_cpu_per_row", "grouped_swiglu_grouped"):
        lines = [line for line in hlo.splitlines() if scope in line]
        if lines:
            backward = sum("transpose(" in line for line in lines)
            found.append(f"{scope.replace('grouped_swiglu_', '')} ({len(lines) - backward} fwd / {backward} bwd ops)")
    return ", ".join(found) or "none found"


def rate(seconds: float, tokens: int) -> float:
    return tokens / seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="iterations per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for each side (default 0: the defaults)")
    ap.add_argument(
        "--experts", nargs="+", default=["auto", "grouped"], choices=["auto", "grouped", "tiled", "per_row"]
    )
    ap.add_argument("--no-float", action="store_true", help="skip the k25jax float-experts rows")
    ap.add_argument("--storage-bf16", action="store_true", help="the finetune default: forward sees bf16 params")
    ap.add_argument("--breakdown", action="store_true", help="also time forward and forward + backward")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = configs(args.config)
    batch = make_batch(cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    t = cfg.text
    print(
        f"config {args.config}: D {t.hidden_size}, layers {t.num_hidden_layers} ({t.first_k_dense_replace} dense), "
        f"heads {t.num_attention_heads}, experts {t.n_routed_experts} top-{t.num_experts_per_tok}, vocab "
        f"{t.vocab_size}; batch {args.batch} x {args.seq} tokens; float32, CPU ({os.cpu_count()} cores, "
        f"{args.threads or 'default'} threads each); jax {jax.__version__}, torch {torch.__version__}; "
        f"{args.repeats} repeats x {args.steps} steps after a warm-up"
    )
    sides = []
    for experts in args.experts:
        sides.append(Jax(cfg, batch, qat=True, experts=experts, storage_bf16=args.storage_bf16))
        if not args.no_float:
            sides.append(Jax(cfg, batch, qat=False, experts=experts, storage_bf16=args.storage_bf16))
    theirs = Torch(cfg, batch)
    sides.append(theirs)
    print(f"torch: {theirs.impl}")
    for side in sides:
        if isinstance(side, Jax):
            print(f"{side.name}: compile {side.compile_s:.1f} s; expert paths in the step: {expert_paths(side.hlo)}")
    for side in sides:  # warm-up: caches, allocator, thread pools
        for _ in range(2):
            side()
    times = {side.name: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            for _ in range(args.steps):
                side()
            times[side.name].append((time.perf_counter() - start) / args.steps)
    torch_rate = rate(statistics.median(times["torch"]), tokens)
    print(f"{'':<24} | {'tokens/s (median)':>17} | {'spread (min-max)':>17} | {'vs torch':>8} | {'ms/step':>8}")
    for side in sides:
        ts = times[side.name]
        median = rate(statistics.median(ts), tokens)
        low, high = rate(max(ts), tokens), rate(min(ts), tokens)
        print(
            f"{side.name:<24} | {median:>17.0f} | {low:>8.0f}-{high:<8.0f} | {median / torch_rate:>7.2f}x | "
            f"{1e3 * statistics.median(ts):>8.1f}"
        )
    by_name = {s.name: rate(statistics.median(times[s.name]), tokens) for s in sides}
    for experts in args.experts:
        qat, flt = by_name.get(f"k25jax qat [{experts}]"), by_name.get(f"k25jax float [{experts}]")
        if qat and flt:
            print(f"fake-quant overhead [{experts}]: {flt / qat - 1:+.1%} time per step (float {flt:.0f} tok/s)")
    if args.breakdown:
        print(f"{'':<24} | {'forward ms':>10} | {'fwd+bwd ms':>10} | {'step ms':>8}")
        for side in sides:
            forward, backward = side.parts()
            for fn in (forward, backward, forward, backward):  # compile and warm up
                fn()
            f_ms = 1e3 * statistics.median(_times(forward, args.repeats))
            b_ms = 1e3 * statistics.median(_times(backward, args.repeats))
            print(
                f"{side.name:<24} | {f_ms:>10.1f} | {b_ms:>10.1f} | {1e3 * statistics.median(times[side.name]):>8.1f}"
            )


def _times(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    main()
