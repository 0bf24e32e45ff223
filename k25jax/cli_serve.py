"""``k25jax serve``: the OpenAI- and Anthropic-compatible HTTP server (``k25jax.serve.server``).

    k25jax serve --model /path/to/Kimi-K2.5 --mesh expert=8 --port 8000
    k25jax serve --model tiny                 # the shipped demo model (trained, tiny), for trying clients

It binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM / Ctrl-C drain: no new connections, in-flight
requests get ``--drain-timeout`` seconds, then the engine stops.
"""

from __future__ import annotations

import argparse

from k25jax.demo.shipped import MODEL_HELP, TINY_NAMES


def cmd_serve(args: argparse.Namespace) -> int:
    from k25jax.cli_generate import load_model_and_tokenizer, place_on_mesh, run_config

    try:
        from k25jax.serve.server import create_app, serve
    except ImportError as err:
        raise SystemExit(f"k25jax serve: {err.name} is missing: pip install 'k25jax[serve]'") from None
    run = run_config(args.model, args.dtype, args.kernels, args.attention_block, args.max_context)
    if args.mesh and args.model not in TINY_NAMES:  # full-size weights load straight onto the mesh
        from k25jax.cli_generate import build_mesh

        model, tokenizer = load_model_and_tokenizer(args.model, run, build_mesh(args.mesh, "serve"))
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, run)
        if args.mesh:
            model = place_on_mesh(model, args.mesh, "serve")
    for name in ("max_slots", "max_queue", "decode_window", "prefill_chunk", "warmup"):
        least = 0 if name in ("max_queue", "warmup") else 1
        if getattr(args, name) < least:
            raise SystemExit(f"k25jax serve: --{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    name = args.served_model_name or ("k25jax-tiny" if args.model in TINY_NAMES else "kimi-k2.5")
    app = create_app(
        model,
        tokenizer,
        served_model_name=name,
        root=args.model,
        api_key=args.api_key,
        max_slots=args.max_slots,
        max_context=args.max_context,
        max_queue=args.max_queue,
        max_tokens_cap=args.max_tokens_cap,
        allow_remote_media=args.allow_remote_media,
        engine_options={"decode_window": args.decode_window, "prefill_chunk": args.prefill_chunk},
        warmup=args.warmup,
    )
    print(f"k25jax serve: model {name!r} ({args.model}) on http://{args.host}:{args.port}/v1", flush=True)
    serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    return 0


def register_serve(sub) -> None:
    from k25jax.cli_generate import add_run_arguments

    p = sub.add_parser("serve", help="OpenAI- and Anthropic-compatible HTTP server (chat, messages, completions)")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as `model` (default: kimi-k2.5; k25jax-tiny for the tiny models)",
    )
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY or x-api-key: KEY)")
    p.add_argument("--max-slots", type=int, default=8, help="sequences decoded together (cache rows)")
    p.add_argument("--max-context", type=int, default=None, help="positions per sequence (default: the model's)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (more: 503)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="the most new tokens a request gets")
    p.add_argument("--decode-window", type=int, default=8, help="decode steps per dispatch")
    p.add_argument("--prefill-chunk", type=int, default=512, help="most prompt tokens per prefill chunk")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="N",
        help="before serving, compile the prefill and decode shapes of sequences up to N positions, so early "
        "requests do not wait for the compiler (0: off; e.g. 2048)",
    )
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image / video URLs")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--mesh", default=None, help="shard over all devices, e.g. expert=8,tensor=4 (data takes the rest)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_serve)
