"""Bytes each device moves per MoE layer of K2.5 under expert parallelism, from the compiled program.

One K2.5 MoE layer (D 7168, 384 INT4 experts, top-8, width 2048) is compiled (never run: the weights are
abstract) on 8 fake CPU devices for decode and prefill batches. Activations are float32 here: XLA:CPU runs bf16
collectives in float32 anyway (it promotes them), and float32 everywhere keeps the comparison exact; a bf16 run on
GPU/TPU moves half of every figure. The collectives of the compiled HLO are counted
(``k25jax.plan.collectives``: ring-algorithm bytes sent per device) for the all-gather + reduce-scatter dispatch
that k25jax uses. For the alternatives the bytes are counted exactly from routing the same number of tokens
through a K2.5-shaped router (random weights, so near-uniform routing, the balanced case that K2's load-balancing
bias aims for):

- ragged all-to-all: each (token, expert) pair whose expert lives on another device is sent there and its result
  sent back (unimplemented on XLA:CPU, so not compiled here);
- ragged all-to-all with de-duplication: a token goes once to each other device that holds one of its experts;
- padded all-to-all (the portable stand-in): every device sends every other device a buffer sized for the worst
  case, ``tokens_per_device * min(k, E_local)`` rows.

    python benchmarks/moe_comm.py [--meshes expert=8 expert=4,tensor=2] [--decode 8 64] [--prefill 8x512]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from k25jax.config import k25  # noqa: E402
from k25jax.moe import Experts, MoE, route  # noqa: E402
from k25jax.plan import collectives  # noqa: E402
from k25jax.sharding import (  # noqa: E402
    logical_spec,
    make_mesh,
    parse_mesh,
    state_shardings,
    use_mesh,
)

MB = 1e6


def abstract_moe(cfg):
    def build():
        moe = MoE(cfg, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        for _, m in nnx.iter_modules(moe):
            if isinstance(m, Experts):
                m.to_int4()
        return moe

    return nnx.eval_shape(build)


def compiled_bytes(moe, mesh, batch: int, seq: int) -> tuple[float, dict[str, float]]:
    """(MB sent per device, MB by collective kind) of one MoE layer call compiled on ``mesh``."""
    graphdef, state = nnx.split(moe)
    shardings = state_shardings(state, mesh)
    x_spec = logical_spec(("batch", "seq", "act_embed"), (batch, seq, moe.cfg.hidden_size), mesh, fit=True)
    x = jax.ShapeDtypeStruct((batch, seq, moe.cfg.hidden_size), jnp.float32, sharding=NamedSharding(mesh, x_spec))
    abstract_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    with use_mesh(mesh):
        compiled = jax.jit(lambda st, h: nnx.merge(graphdef, st)(h)).lower(abstract_state, x).compile()
    kinds: dict[str, float] = {}
    for op in collectives(compiled.as_text()):
        kinds[op.op] = kinds.get(op.op, 0.0) + op.moved_bytes / MB
    return sum(kinds.values()), kinds


def routed_alternatives(cfg, tokens: int, ep: int, seed: int = 0) -> dict[str, float]:
    """MB sent per device (dispatch + return) by the all-to-all alternatives for ``tokens`` tokens split over
    ``ep`` expert shards, counted from the routing of random tokens through a K2.5-shaped random router."""
    rng = np.random.default_rng(seed)
    D, E, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = jnp.asarray(rng.standard_normal((tokens, D)), jnp.float32)
    router = jnp.asarray(0.02 * rng.standard_normal((D, E)), jnp.float32)
    _, experts = route(x, router, jnp.zeros((E,), jnp.float32), cfg)
    owner = np.asarray(experts) // (E // ep)  # [N, k] device holding each chosen expert
    source = np.arange(tokens)[:, None] * ep // tokens  # tokens split evenly over the shards
    row = D * 4  # one float32 token row
    off_pairs = (owner != source).sum()
    off_dedup = sum(len(set(o) - {s}) for o, s in zip(owner.tolist(), source[:, 0].tolist(), strict=True))
    per_device = tokens / ep
    padded = (ep - 1) * per_device * min(k, E // ep)
    return {
        "ragged all-to-all": 2 * off_pairs * row / ep / MB,
        "ragged all-to-all, de-duplicated": 2 * off_dedup * row / ep / MB,
        "padded all-to-all": 2 * padded * row / MB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshes", nargs="+", default=["expert=8", "expert=4,tensor=2"])
    ap.add_argument("--decode", nargs="+", type=int, default=[8, 64], help="decode batches (one token each)")
    ap.add_argument("--prefill", nargs="+", default=["8x512"], help="prefill BATCHxTOKENS")
    args = ap.parse_args()
    cfg = k25().text
    moe = abstract_moe(cfg)
    shapes = [(b, 1) for b in args.decode] + [tuple(int(v) for v in p.split("x")) for p in args.prefill]
    print(f"K2.5 MoE layer: D {cfg.hidden_size}, {cfg.n_routed_experts} INT4 experts, top-{cfg.num_experts_per_tok}")
    print("MB sent per device per MoE layer (dispatch + combine); 'compiled' counts the collectives of the compiled")
    print("program (k25jax's all-gather + reduce-scatter, plus tensor-parallel sums); the rest count routed pairs.\n")
    header = f"{'mesh':<18s}{'batch x T':>10s}{'compiled':>10s}  {'(by kind)':<44s}{'ragged a2a':>11s}"
    print(header + f"{'dedup':>8s}{'padded':>9s}")
    for text in args.meshes:
        sizes = parse_mesh(text)
        mesh = make_mesh(**sizes, data=8 // math.prod(sizes.values()))
        ep = mesh.shape["expert"]
        for batch, seq in shapes:
            total, kinds = compiled_bytes(moe, mesh, batch, seq)
            # Tokens in one expert group (those the all-gather collects): the batch rows split over data.
            group_tokens = batch * seq // mesh.shape["data"] if batch % mesh.shape["data"] == 0 else batch * seq
            alt = routed_alternatives(cfg, group_tokens, ep)
            by_kind = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items()))
            print(
                f"{text:<18s}{f'{batch} x {seq}':>10s}{total:>10.2f}  {by_kind:<44s}"
                f"{alt['ragged all-to-all']:>11.2f}{alt['ragged all-to-all, de-duplicated']:>8.2f}"
                f"{alt['padded all-to-all']:>9.2f}"
            )


if __name__ == "__main__":
    main()
