"""``k25jax convert`` / ``export`` / ``inspect``: the converters on the command line.

Bad input ends with one line on stderr naming the file and tensor (``k25jax convert: error: ...``) and exit
status 2; nothing that looks complete is left behind.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def _fail(command: str, err: BaseException) -> int:
    print(f"k25jax {command}: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _input_errors() -> tuple[type[BaseException], ...]:
    from convert.destination import DestinationError
    from convert.to_orbax import ConvertError
    from convert.to_release import ExportError
    from k25jax.config import ConfigError
    from k25jax.release.reader import ReleaseError

    return (ReleaseError, ConvertError, ExportError, DestinationError, ConfigError, FileNotFoundError)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 5G or 500M, got {text!r}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.to_orbax import convert_release

    try:
        s = convert_release(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    except _input_errors() as e:
        return _fail("convert", e)
    rate = s["converted_bytes"] / max(s["seconds"], 1e-9)
    resumed = f", {_human(s['resumed_bytes'])} resumed" if s["resumed_bytes"] else ""
    print(
        f"k25jax convert: wrote {s['path']}: {s['entries']:,} tensor groups, "
        f"{_human(s['converted_bytes'])} in {s['seconds']:.1f} s ({_human(rate)}/s){resumed}"
    )
    return 0


def register_convert(sub) -> None:
    p = sub.add_parser("convert", help="release directory -> k25jax orbax checkpoint (streamed, resumable)")
    p.add_argument("src", help="release directory (config.json, safetensors shards, index)")
    p.add_argument("dst", help="checkpoint directory to create (built in DST.partial, renamed when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete checkpoint at DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)


def cmd_export(args: argparse.Namespace) -> int:
    from convert.to_release import export_checkpoint

    try:
        out = export_checkpoint(
            args.ckpt, args.out, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, progress=not args.quiet
        )
    except _input_errors() as e:
        return _fail("export", e)
    print(f"k25jax export: wrote {out}")
    return 0


def register_export(sub) -> None:
    p = sub.add_parser("export", help="k25jax checkpoint -> release format (INT4 pack-quantized experts)")
    p.add_argument("ckpt", help="k25jax checkpoint directory")
    p.add_argument("out", help="release directory to create")
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default="5G",
        help="shard size when the source layout is not kept (default 5G)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete release at OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


def cmd_inspect(args: argparse.Namespace) -> int:
    from convert.describe import format_json, format_report, inspect_path

    try:
        report = inspect_path(args.path, grid=args.grid, progress=args.grid and not args.quiet)
    except _input_errors() as e:
        return _fail("inspect", e)
    print(format_json(report) if args.json else format_report(report))
    return 1 if report.get("problem") else 0


def register_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a release or checkpoint holds (no weights loaded)")
    p.add_argument("path", help="release directory, k25jax checkpoint, or tiny (the demo release)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--grid",
        action="store_true",
        help="read every routed-expert INT4 tensor (streamed) and say which INT4 grid the release uses: "
        "kimi, compressed-tensors or unknown",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (--grid)")
    p.set_defaults(func=cmd_inspect)


REGISTRARS = [register_convert, register_export, register_inspect]
