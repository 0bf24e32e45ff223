"""``k25jax generate`` (one prompt, streamed reply) and ``k25jax chat`` (interactive multi-turn REPL).

The reply streams as it is generated, reasoning apart from the answer::

    --- thinking ---
    ...reasoning...
    --- answer ---
    ...answer...
    --- tool calls ---
    name {"arg": 1}  [functions.name:0]

``--image FILE`` and ``--video FILE`` (repeatable; images first, then videos) put media before the prompt text; in
``chat``, ``/image PATH`` and ``/video PATH`` attach one to the next message. ``chat`` keeps the conversation's
latent cache between turns (``k25jax.session``): each turn prefills only what differs from the cached prompt and
reply.
"""

from __future__ import annotations

import argparse
import os
import sys

from k25jax.demo.shipped import MODEL_HELP, RANDOM, TINY_NAMES, resolve


class ReplyPrinter:
    """Prints a streamed reply: reasoning under ``--- thinking ---``, the answer under ``--- answer ---``; the
    tool-call section is held back and printed parsed at the end. Special tokens other than the reply markers
    print nothing (as :func:`k25jax.chat.parse_ids` and the server skip them)."""

    def __init__(self, tokenizer, thinking: bool, out=None):
        from k25jax.chat import SECTION_BEGIN, SECTION_END
        from k25jax.chat_reply import skipped_special_ids
        from k25jax.tokenizer import StreamDecoder

        self.tok = tokenizer
        self.out = out or sys.stdout
        self.decoder = StreamDecoder(tokenizer)
        self.end_think = tokenizer.token_id("</think>")
        self.section_begin = tokenizer.token_id(SECTION_BEGIN)
        self.section_end = tokenizer.token_id(SECTION_END)
        self.stops = set(tokenizer.stop_ids)
        self.skip = skipped_special_ids(tokenizer)  # no text for them, as the parsed reply and the server
        self.in_calls = False
        self.ids: list[int] = []
        self._write("--- thinking ---\n" if thinking else "--- answer ---\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def push(self, token: int) -> None:
        self.ids.append(token)
        if token in self.stops or token in self.skip:
            return
        if token == self.end_think:
            self._write(self.decoder.flush() + "\n--- answer ---\n")
        elif token == self.section_begin:
            self.in_calls = True
        elif token == self.section_end:
            self.in_calls = False
        elif not self.in_calls:
            self._write(self.decoder.push(token))

    def finish(self, thinking: bool):
        """Print the parsed tool calls (if any) and return the parsed reply."""
        from k25jax.chat import parse_ids

        reply = parse_ids(self.ids, self.tok, thinking=thinking)
        tail = self.decoder.flush()
        self._write(tail + "\n")
        if reply.tool_calls:
            lines = [f"{c['function']['name']} {c['function']['arguments']}  [{c['id']}]" for c in reply.tool_calls]
            self._write("--- tool calls ---\n" + "\n".join(lines) + "\n")
        if reply.errors:  # malformed output (e.g. an unclosed tool-call section hid text): say so, apart
            print(f"(reply parsed with problems: {'; '.join(reply.errors)})", file=sys.stderr, flush=True)
        return reply


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--kernels``: the run settings every command that runs the model takes."""
    from k25jax.config import KERNELS

    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: float32 tiny, else bf16")
    p.add_argument(
        "--kernels", choices=list(KERNELS), default="xla", help="INT4 expert matmuls: XLA (default) or Pallas kernels"
    )
    p.add_argument(
        "--attention-block",
        default="auto",
        help="MLA attention: N (blockwise, online softmax over N-token blocks), 'plain', or 'auto' (default: "
        "blockwise 2048 when the context may exceed 32768 tokens, as `k25jax plan` assumes)",
    )


def attention_block(value: str | int | None, context: int | None) -> int | None:
    """``--attention-block``: an int, None for ``plain``, or for ``auto`` the planner's rule (block 2048 when the
    context exceeds 32768 tokens). A bad value exits naming the flag."""
    from k25jax.plan import LONG_CONTEXT, LONG_CONTEXT_BLOCK

    if value in (None, "plain"):
        return None
    if value == "auto":
        return LONG_CONTEXT_BLOCK if context is not None and context > LONG_CONTEXT else None
    try:
        block = int(value)
    except ValueError:
        raise SystemExit(
            f"k25jax: --attention-block must be a positive integer, 'plain' or 'auto', got {value!r}"
        ) from None
    if block < 1:
        raise SystemExit(f"k25jax: --attention-block must be positive, got {block}")
    return block


def _context_of(model: str, max_context: int | None) -> int | None:
    if max_context is not None or model == RANDOM:
        return max_context
    try:
        from k25jax import from_release_config

        return from_release_config(resolve(model)).text.max_position_embeddings
    except Exception:  # noqa: BLE001 (the loader reports a bad directory with its own message)
        return None


def run_config(model: str, dtype: str | None, kernels: str = "xla", block="plain", max_context: int | None = None):
    """The :class:`~k25jax.config.RunConfig` of ``--dtype`` / ``--kernels`` / ``--attention-block`` (float32 for the
    tiny models); ``auto`` decides from ``max_context`` (default: the model's ``max_position_embeddings``)."""
    from k25jax.config import RunConfig

    return RunConfig(
        compute_dtype=dtype or ("float32" if model in TINY_NAMES else "bfloat16"),
        kernels=kernels,
        attention_block=attention_block(block, _context_of(model, max_context)),
    )


def load_model_and_tokenizer(model: str, run, mesh=None):
    """The model (a release / checkpoint directory, ``'tiny'``: the shipped demo release, ``'tiny-random'``: the
    random-init tiny preset) and its tokenizer, with run config ``run``."""
    from k25jax import build_model, from_release_config, load_model, preset
    from k25jax.tokenizer import Tokenizer

    if model == RANDOM:
        return build_model(preset("tiny"), run), Tokenizer.tiny()
    try:
        model = resolve(model)
    except FileNotFoundError as err:
        raise SystemExit(f"k25jax: {err}") from None
    if not os.path.exists(os.path.join(model, "tiktoken.model")):
        raise SystemExit(
            f"k25jax: {model}: no tiktoken.model (a release directory has the tokenizer beside config.json)"
        )
    tokenizer = Tokenizer.from_pretrained(model)
    vocab = from_release_config(model).text.vocab_size  # checked before the (long) weight load
    if tokenizer.vocab_size != vocab:
        raise SystemExit(
            f"k25jax: {model}: tiktoken.model gives a vocabulary of {tokenizer.vocab_size} ids but config.json's "
            f"text_config.vocab_size is {vocab}"
        )
    return load_model(model, run, mesh=mesh), tokenizer


def start(args: argparse.Namespace):
    """Multi-host start-up (before any JAX device is touched), then the model and tokenizer, placed on the
    ``--mesh`` when given. Returns ``(model, tokenizer, out)``; only process 0 prints the reply."""
    import io

    from k25jax import distributed

    distributed.initialize(args)
    run = run_config(
        args.model,
        args.dtype,
        args.kernels,
        getattr(args, "attention_block", "plain"),
        getattr(args, "max_context", None),
    )
    if (
        args.mesh and args.model not in TINY_NAMES
    ):  # full-size models load straight onto the mesh, never whole on one host
        mesh = build_mesh(args.mesh, args.command)
        model, tokenizer = _on_mesh(lambda: load_model_and_tokenizer(args.model, run, mesh), args)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, run)
        if args.mesh:
            model = place_on_mesh(model, args.mesh, args.command)
    return model, tokenizer, (sys.stdout if distributed.is_main_process() else io.StringIO())


def build_mesh(mesh_text: str, command: str = "generate"):
    """The mesh ``--mesh`` names over all devices of all hosts (``expert=8,tensor=4``; ``data`` takes up the
    devices the named axes leave)."""
    import jax

    from k25jax.sharding import ShardingError, make_mesh, mesh_sizes

    try:
        return make_mesh(**mesh_sizes(mesh_text, jax.device_count()))
    except ShardingError as e:
        raise SystemExit(f"k25jax {command}: --mesh {mesh_text}: {e}") from None


def _on_mesh(load, args: argparse.Namespace):
    from k25jax.sharding import ShardingError

    try:
        return load()
    except ShardingError as e:
        raise SystemExit(f"k25jax {args.command}: --mesh {args.mesh}: {e}") from None


def place_on_mesh(model, mesh_text: str, command: str = "generate"):
    """Shard an in-memory ``model`` over the ``--mesh`` mesh."""
    from k25jax.sharding import ShardingError, shard_model

    mesh = build_mesh(mesh_text, command)
    try:
        return shard_model(model, mesh)
    except ShardingError as e:
        raise SystemExit(f"k25jax {command}: --mesh {mesh_text}: {e}") from None


def _sampling(args: argparse.Namespace):
    from k25jax.sampling import sampling_defaults

    base = sampling_defaults(thinking=not args.no_thinking)
    temperature = base.temperature if args.temperature is None else args.temperature
    top_p = base.top_p if args.top_p is None else args.top_p
    return dict(temperature=temperature, top_p=top_p, top_k=args.top_k)


def media_parts(images: list[str], videos: list[str], command: str) -> list[dict]:
    """Chat content parts for image and video files (images first), each checked now so that a bad file fails
    before any generation. Videos are opened and probed for a video stream, not decoded."""
    from k25jax.vision import MediaError, load_image
    from k25jax.vision.video import probe_video

    for check, path in [(load_image, p) for p in images] + [(probe_video, p) for p in videos]:
        try:
            check(path)
        except MediaError as err:
            raise SystemExit(f"k25jax {command}: {err}") from None
    return [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]


def _check_vision(model, command: str) -> None:
    if getattr(model, "vision", None) is None:
        raise SystemExit(f"k25jax {command}: this model has no vision tower (its config has no vision_config)")


def reply_to(model, tokenizer, messages: list[dict], args: argparse.Namespace, seed: int, out=None, session=None):
    """Render ``messages`` (images preprocessed), stream the model's reply through a :class:`ReplyPrinter`,
    return the parsed reply. With a ``k25jax.session.Session`` the cached conversation prefix is reused."""
    from k25jax.chat import prepare
    from k25jax.generation import stream

    thinking = not args.no_thinking
    ids, media = prepare(messages, tokenizer, thinking=thinking)
    printer = ReplyPrinter(tokenizer, thinking, out)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=seed, stop_token_ids=tokenizer.stop_ids, **_sampling(args))
    if session is not None:
        tokens = session.stream(ids, media, **kw)
    else:
        steps = stream(model, [ids], media=[media], max_context=args.max_context, **kw)
        tokens = (step[0] for step in steps if step[0] is not None)
    for token in tokens:
        printer.push(token)
    return printer.finish(thinking)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a reply to one prompt and stream it."""
    media = media_parts(args.image, args.video, "generate")
    model, tokenizer, out = start(args)
    if media:
        _check_vision(model, "generate")
    content = media + [{"type": "text", "text": args.prompt}] if media else args.prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    reply_to(model, tokenizer, messages, args, args.seed, out)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat on stdin/stdout. ``/image PATH`` and ``/video PATH`` attach an image or a video to the next
    message, ``/reset`` clears the history (and pending media), ``/exit`` (or end of input) quits."""
    from k25jax.session import Session

    model, tokenizer, _ = start(args)
    session = Session(model, max_context=args.max_context)  # later turns prefill only what changed
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    system = list(history)
    pending: list[dict] = []  # media parts for the next user message
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history, pending = list(system), []
            session.reset()
            print("(history cleared)", flush=True)
            continue
        command = text.split(maxsplit=1)[0] if text.strip() else ""
        if command in ("/image", "/video"):
            kind, path = command[1:], text[len(command) :].strip()
            try:
                _check_vision(model, "chat")
                if path:
                    pending += media_parts([path] if kind == "image" else [], [path] if kind == "video" else [], "chat")
            except SystemExit as err:
                print(err, file=sys.stderr, flush=True)
                continue
            print(f"({kind} attached to the next message: {path})" if path else f"usage: {command} PATH", flush=True)
            continue
        history.append({"role": "user", "content": pending + [{"type": "text", "text": text}] if pending else text})
        pending = []
        print(f"=== turn {turn + 1} ===", flush=True)
        try:
            reply = reply_to(model, tokenizer, history, args, args.seed + turn, session=session)
        except ValueError as e:  # e.g. the conversation outgrew --max-context, or an image became unreadable
            history.pop()
            print(f"k25jax chat: {e}", file=sys.stderr, flush=True)
            continue
        history.append(reply.message())
        turn += 1
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-thinking", action="store_true", help="instant mode: no reasoning before the answer")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="default: 1.0 thinking, 0.6 instant; 0 greedy")
    p.add_argument("--top-p", type=float, default=None, help="default 0.95")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=None, help="tokens per sequence (default: the model's 256K)")
    add_run_arguments(p)
    p.add_argument("--mesh", default=None, help="shard over all devices, e.g. expert=8,tensor=4 (data takes the rest)")
    from k25jax import distributed

    distributed.add_arguments(p)


def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a reply to one prompt, streamed (reasoning shown apart)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], help="image file to show the model (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file to show the model (repeatable; PyAV)")
    _common(p)
    p.set_defaults(func=cmd_generate)


def register_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat on stdin (/image PATH, /video PATH, /reset, /exit)")
    _common(p)
    p.set_defaults(func=cmd_chat)
