"""Held-out accuracy of a chat model on the demo tasks (:mod:`k25jax.demo.tasks`), through the public API.

Every assistant turn of every sample is one evaluation prompt (:func:`k25jax.demo.tasks.prompt_messages`): the
messages before it rendered with the chat format (:func:`k25jax.chat.prepare`, tools declared as the sample
declares them, thinking or instant as the sample's mode), generated with :func:`k25jax.generate` in batches,
parsed with :func:`k25jax.chat_reply.parse_ids` and graded with :func:`k25jax.demo.tasks.score`.

``python -m k25jax.demo.evaluate --samples 200`` grades the shipped demo model (``--model tiny``) on the held-out
split (seed 1) and prints the table the README shows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from k25jax.demo import tasks

HELD_OUT_SEED = 1  # the training split is seed 0 (k25jax.demo.build)
CARD_TEMPERATURES = {"thinking": 1.0, "instant": 0.6}  # the model card's sampling defaults (top_p 0.95)


def _metric(task: str, turn: int, check: str) -> str:
    """The row a graded check counts in: tool samples are graded per turn (the call, then the answer)."""
    if task == "tool_call":
        task = "tool_call" if turn == 0 else "tool_answer"
    return task if check == "correct" else f"{task}:{check}"


def evaluate(
    model,
    tokenizer,
    samples: Sequence[dict],
    *,
    temperature: float | Mapping[str, float] = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 160,
    progress: bool = True,
) -> dict[str, Any]:
    """Grade ``model`` on ``samples``; greedy by default (``temperature=0``). ``temperature`` may be per mode,
    e.g. :data:`CARD_TEMPERATURES` (the model card's defaults, with ``top_p=0.95``).

    Returns ``{"accuracy": {mode: {metric: share}}, "counts": {mode: {metric: n}}, "correct": {mode: {metric:
    hits}}, "failures": [...]}`` where
    metrics are the tasks (``add``, ``sub``, ``compare``, ``tool_call`` (name and arguments exact),
    ``tool_call:valid_json``, ``tool_answer`` (the reply uses the tool result), ``no_tool``, ``image``,
    ``video``) and ``failures`` keeps the first 20 wrong replies for a look.
    """
    import k25jax
    from k25jax import chat, chat_reply

    jobs = []  # (sample, turn, thinking, prompt)
    for s in samples:
        thinking = s["meta"]["mode"] == "thinking"
        for turn, messages in enumerate(tasks.prompt_messages(s)):
            jobs.append((s, turn, thinking, chat.prepare(messages, tokenizer, tools=s.get("tools"), thinking=thinking)))
    temperatures = temperature if isinstance(temperature, Mapping) else dict.fromkeys(tasks.MODES, temperature)
    jobs.sort(key=lambda job: not job[2])  # thinking first: a batch is one mode, so one temperature
    hits: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="evaluate", unit="reply")
    batches = []
    for mode in (True, False):
        same = [job for job in jobs if job[2] is mode]
        batches += [same[i : i + batch_size] for i in range(0, len(same), batch_size)]
    start = 0
    for chunk in batches:
        start += len(chunk)
        media = [p.media for *_, p in chunk]
        outs = k25jax.generate(
            model,
            [p.ids for *_, p in chunk],
            temperature=temperatures["thinking" if chunk[0][2] else "instant"],
            top_p=top_p,
            seed=seed + start,
            max_new_tokens=max_new_tokens,
            media=media if any(m is not None for m in media) else None,
        )
        for (s, turn, thinking, _), ids in zip(chunk, outs, strict=True):
            reply = chat_reply.parse_ids(ids, tokenizer, thinking=thinking)
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in reply.tool_calls]
            if any("dropped" in e and "tool call" in e for e in reply.errors):
                calls.append({"name": "", "arguments": "<malformed>"})  # the parser drops a malformed call
            checks = tasks.score(s, turn, reply.content, calls)
            mode = s["meta"]["mode"]
            for check, ok in checks.items():
                key = _metric(s["meta"]["task"], turn, check)
                totals[mode][key] += 1
                hits[mode][key] += bool(ok)
            if not all(checks.values()) and len(failures) < 20:
                failures.append(
                    {
                        "task": s["meta"]["task"],
                        "mode": mode,
                        "turn": turn,
                        "checks": checks,
                        "reply": tokenizer.decode(ids),
                    }
                )
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    accuracy = {m: {k: hits[m][k] / n for k, n in sorted(totals[m].items())} for m in sorted(totals)}
    counts = {m: dict(sorted(totals[m].items())) for m in sorted(totals)}
    correct = {m: {k: hits[m][k] for k in counts[m]} for m in counts}
    return {"accuracy": accuracy, "counts": counts, "correct": correct, "failures": failures}


def table(result: dict[str, Any]) -> str:
    """A Markdown table of ``evaluate``'s accuracy: one row per metric, one column per mode (share and count); the
    ``no_tool_calls`` checks (no call where none is wanted) are left out."""
    modes = sorted(result["accuracy"])
    metrics = sorted({k for m in modes for k in result["accuracy"][m] if not k.endswith(":no_tool_calls")})
    lines = ["| task | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for k in metrics:
        cells = []
        for m in modes:
            if k in result["accuracy"][m]:
                cells.append(f"{100 * result['accuracy'][m][k]:.1f}% (n={result['counts'][m][k]})")
            else:
                cells.append("-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k25jax.demo.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="release directory, or 'tiny' (the shipped demo model)")
    p.add_argument("--samples", type=int, default=200, help="held-out samples (seed 1)")
    p.add_argument("--text-only", action="store_true", help="leave out the image and video tasks")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--card-sampling",
        action="store_true",
        help="the model card's defaults: temperature 1.0 thinking / 0.6 instant, top_p 0.95",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None, help="write the result here too")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    args = p.parse_args(argv)
    from k25jax.cli_generate import load_model_and_tokenizer, run_config

    model, tokenizer = load_model_and_tokenizer(args.model, run_config(args.model, args.dtype))
    mix = tasks.TEXT_MIX if args.text_only else None
    samples = tasks.generate(args.samples, HELD_OUT_SEED, mix=mix)
    temperature, top_p = (CARD_TEMPERATURES, 0.95) if args.card_sampling else (args.temperature, args.top_p)
    result = evaluate(model, tokenizer, samples, temperature=temperature, top_p=top_p, batch_size=args.batch_size)
    print(table(result))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
