"""The ``k25jax`` command line. Each subcommand lives in its own ``register_*`` function."""

from __future__ import annotations

import argparse
import sys


def cmd_forward(args: argparse.Namespace) -> int:
    """One forward pass: print the top next-token candidates for a list of token ids."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from k25jax.cli_generate import load_model_and_tokenizer, run_config

    model = load_model_and_tokenizer(
        args.model, run_config(args.model, args.dtype, args.kernels, args.attention_block)
    )[0]
    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    if not ids:
        raise SystemExit("k25jax forward: --ids needs at least one token id")
    vocab = model.cfg.text.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SystemExit(f"k25jax forward: token ids {bad} are outside the vocabulary [0, {vocab})")
    logits = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray([ids], jnp.int32)))[0, -1]
    top = np.argsort(-logits)[: args.top]
    print(f"model {model.cfg.name}: {len(ids)} tokens in, logits over {vocab} ids")
    for rank, tok in enumerate(top, 1):
        print(f"  {rank}. id {int(tok):>7d}  logit {logits[tok]:+.4f}")
    return 0


def register_forward(sub) -> None:
    p = sub.add_parser("forward", help="run one forward pass and print the top next-token ids")
    from k25jax.demo.shipped import MODEL_HELP

    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--ids", default="1,2,3,4", help="comma-separated token ids")
    p.add_argument("--top", type=int, default=5)
    from k25jax.cli_generate import add_run_arguments

    add_run_arguments(p)
    p.set_defaults(func=cmd_forward)


def _generate_registrars():
    from k25jax.cli_generate import register_chat, register_generate

    return [register_generate, register_chat]


def _finetune_registrar(sub) -> None:
    from k25jax.cli_finetune import register_finetune

    register_finetune(sub)


def _plan_registrar(sub) -> None:
    from k25jax.cli_plan import register_plan

    register_plan(sub)


def _serve_registrar(sub) -> None:
    from k25jax.cli_serve import register_serve

    register_serve(sub)


PLUGIN_GROUP = "k25jax.commands"  # entry points adding subcommands (the converters' convert / export / inspect)


def _plugin_registrars():
    """Subcommands other packages add through the ``k25jax.commands`` entry-point group (each entry point names a
    list of ``register(subparsers)`` functions). The converters register this way, so the library never imports
    the ``convert`` package (imports flow ``convert -> k25jax``)."""
    from importlib.metadata import entry_points

    registrars = []
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        registrars.extend(entry.load())
    return registrars


REGISTRARS = [
    register_forward,
    *_generate_registrars(),
    _plan_registrar,
    _finetune_registrar,
    _serve_registrar,
    *_plugin_registrars(),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k25jax", description="Kimi K2.5 in JAX: load, run, convert, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
