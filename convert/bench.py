"""Conversion benchmark: release -> checkpoint throughput against a raw read of the same files, and peak RSS.

    python -m convert.bench [--dir /tmp/k25jax-bench] [--experts 64] [--moe-layers 2] [--vocab 32768]

Generates a release-format directory at K2.5's real per-tensor shapes (hidden 7168, expert width 2048, 64
heads, MLA ranks 1536 / 512, dense width 18432, vision blocks of width 1152) with fewer layers, experts and a
smaller vocabulary (default ~5.8 GB in 1 GiB shards; random bytes, valid headers, correct ``weight_shape``
tensors), then, side by side in one run:

1. ``--repeat`` rounds (default 3) of: ``cat`` of every shard file to ``/dev/null``; ``k25jax convert`` (step 3);
   ``cat`` again; each from a cold page cache (``/proc/sys/vm/drop_caches``; when that is not writable, all runs
   read warm files instead: each file is read once first, and the report says which). A round's ratio is the
   conversion's rate over the mean of its two reads; the median round is reported, and every round printed;
2. ``dd`` of as many zero bytes to a file (``O_DIRECT``, fsync): the disk's sequential write rate, the ceiling
   for a converter that writes to the disk it reads; and ``cp`` of the same files to another directory then
   ``sync``: what a plain copy (read and write every byte) reaches;
3. ``k25jax convert`` of the same directory in a child process (a fresh destination each round), timed from the
   call to the finished (fsync'd, renamed) checkpoint; peak RSS of that child from ``wait4`` (max over rounds);
4. ``k25jax export`` back, timed the same way, with a byte comparison of the exported shards to the originals.

Targets (issue 4): conversion >= 0.5x raw read throughput; peak RSS <= 1.5 x the largest shard + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from convert.to_release import header_bytes, plan_shards, source_nbytes
from k25jax.config import VisionConfig, k25
from k25jax.release.config import to_release_config
from k25jax.release.keymap import release_entries
from k25jax.release.reader import INDEX_NAME

POOL_BYTES = 64 << 20


def bench_config(experts: int, moe_layers: int, vocab: int, vision_layers: int):
    base = k25()
    text = base.text.__class__(
        **{
            **base.text.__dict__,
            "vocab_size": vocab,
            "num_hidden_layers": 1 + moe_layers,
            "n_routed_experts": experts,
            "num_experts_per_tok": min(8, experts),
        }
    )
    vision = VisionConfig(num_hidden_layers=vision_layers) if vision_layers else None
    return base.replace(text=text, vision=vision, name="bench").validate()


def generate(cfg, out: str, shard_bytes: int, seed: int = 0) -> int:
    """Write a release directory of random tensors for ``cfg``; returns the total file bytes."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    # bf16 values of moderate magnitude (exponent bits kept in range) so the files hold ordinary numbers
    pool = (
        rng.integers(0x3A00, 0x3E00, POOL_BYTES // 2, dtype=np.uint16) ^ rng.integers(0, 2, 1, np.uint16) << 15
    ).view(np.uint8)
    entries = release_entries(cfg)
    plans = plan_shards(entries, None, shard_bytes)
    shapes = {  # weight_shape tensors hold the unpacked [out, in]
        e.sources[1].name: (e.sources[0].shape[0], e.sources[0].shape[1] * 8)
        for e in entries
        if len(e.sources) == 2 and e.sources[1].name.endswith("weight_shape")
    }
    weight_map, total = {}, 0
    cursor = 0
    for plan in plans:
        head, _ = header_bytes(plan)
        path = os.path.join(out, plan.file)
        with open(path, "wb") as f:
            f.write(head)
            for s in plan.tensors:
                n = source_nbytes(s)
                weight_map[s.name] = plan.file
                if s.name in shapes:
                    f.write(np.array(shapes[s.name], np.int32).tobytes())
                    continue
                while n:
                    take = min(n, POOL_BYTES - cursor)
                    f.write(pool[cursor : cursor + take].data)
                    cursor = (cursor + take) % POOL_BYTES
                    n -= take
        total += os.path.getsize(path)
    with open(os.path.join(out, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(to_release_config(cfg), f, indent=2)
    return total


SETTLE_SECONDS = 20


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def raw_read(files: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def raw_write(total: int, out: str) -> float:
    """``dd`` of ``total`` zero bytes to a file, ``O_DIRECT`` then fsync: this disk's sequential write rate. A
    converter reading and writing the same disk cannot beat it; its ratio to ``cat`` is the ceiling of the
    conversion-vs-read ratio on this machine."""
    block = 16 << 20
    count = max(1, total // block)
    cmd = ["dd", "if=/dev/zero", f"of={out}", f"bs={block}", f"count={count}", "conv=fsync"]
    start = time.perf_counter()
    if subprocess.run([*cmd, "oflag=direct"], stderr=subprocess.DEVNULL).returncode:  # tmpfs: no O_DIRECT
        start = time.perf_counter()
        subprocess.run(cmd, stderr=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - start
    os.remove(out)
    return seconds * total / (count * block)  # the time ``total`` bytes take at the measured rate


def settle(cold: bool) -> None:
    """Before each timed step: flush, give the (virtual) disk time to finish writes it acknowledged early, drop
    the page cache. Without the pause a read right after a conversion ran at half speed here."""
    os.sync()
    time.sleep(SETTLE_SECONDS)
    if cold:
        drop_caches()


def raw_copy(files: list[str], out: str) -> float:
    """``cp`` of the files then ``sync``: what any conversion must at least do (read and write every byte)."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["cp", *files, out], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def run_child(args: list[str]) -> tuple[dict, int, float]:
    """Run ``python -m convert.bench --child ...``; returns (its JSON result, peak RSS bytes, wall seconds)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convert.bench", "--child", *args], stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"bench child {args} failed")
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss * 1024, wall


def child(argv: list[str]) -> None:
    import resource

    what, src, dst = argv
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if what == "convert":
        from convert.to_orbax import convert_release

        start = time.perf_counter()
        convert_release(src, dst, progress=False)
    else:
        from convert.to_release import export_checkpoint

        start = time.perf_counter()
        export_checkpoint(src, dst, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_after_imports": base_rss}))


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/k25jax-bench")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--shard-gb", type=float, default=1.0, help="GiB per release shard")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--repeat", type=int, default=3, help="(raw read, convert, raw read) rounds; medians are reported")
    args = p.parse_args(argv)

    cfg = bench_config(args.experts, args.moe_layers, args.vocab, args.vision_layers)
    src, ckpt, back = (os.path.join(args.dir, n) for n in ("release", "ckpt", "export"))
    shutil.rmtree(args.dir, ignore_errors=True)
    t = time.perf_counter()
    total = generate(cfg, src, int(args.shard_gb * 2**30))
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors"))
    largest = max(os.path.getsize(f) for f in files)
    print(
        f"generated {total / 1e9:.2f} GB in {len(files)} shards (largest {largest / 1e9:.2f} GB) "
        f"in {time.perf_counter() - t:.0f} s: {cfg.text.num_hidden_layers} layers, {cfg.text.n_routed_experts} "
        f"experts, vocab {cfg.text.vocab_size}, hidden {cfg.text.hidden_size}, expert width "
        f"{cfg.text.moe_intermediate_size}"
    )

    cold = drop_caches()
    if not cold:
        raw_read(files)  # warm both runs alike
    # Rounds of raw read, convert, raw read, each after a settle and from a cold cache: this disk's rate wanders
    # by tens of percent between runs, so each round compares the conversion with the reads just before and after
    # it, and the medians are reported. Each round converts into a fresh directory: deleting the previous round's
    # output first slowed the next raw read (the disk discards the freed blocks), which flattered the conversion.
    rounds, n_rounds = [], max(1, args.repeat)
    for i in range(n_rounds):
        out = ckpt if i == n_rounds - 1 else f"{ckpt}.round{i}"
        settle(cold)
        before = raw_read(files)
        settle(cold)
        conv, conv_rss, conv_wall = run_child(["convert", src, out])
        settle(cold)
        after = raw_read(files)
        raw_s = (before + after) / 2
        rounds.append((raw_s, conv, conv_rss, conv_wall))
        print(
            f"round {i + 1}: cat {total / before / 1e9:.2f} GB/s, convert {total / conv['seconds'] / 1e9:.2f} GB/s, "
            f"cat {total / after / 1e9:.2f} GB/s: {raw_s / conv['seconds']:.2f}x raw read"
        )
    per_round = [r[0] / r[1]["seconds"] for r in rounds]
    ratios = sorted(per_round)
    raw_s = sorted(r[0] for r in rounds)[len(rounds) // 2]
    conv_s = sorted(r[1]["seconds"] for r in rounds)[len(rounds) // 2]
    conv = dict(rounds[-1][1], seconds=conv_s)
    conv_rss = max(r[2] for r in rounds)
    conv_wall = sorted(r[3] for r in rounds)[len(rounds) // 2]
    for i in range(n_rounds - 1):  # free the disk space before the copy and the export
        shutil.rmtree(f"{ckpt}.round{i}")
    settle(cold)
    write_s = raw_write(total, os.path.join(args.dir, "dd.bin"))
    settle(cold)
    copy_s = raw_copy(files, os.path.join(args.dir, "copy"))
    settle(cold)
    exp, exp_rss, _ = run_child(["export", ckpt, back])
    same = all(_same_file(f, os.path.join(back, os.path.basename(f))) for f in files)

    gb = total / 1e9
    raw_rate, conv_rate, exp_rate = gb / raw_s, gb / conv["seconds"], gb / exp["seconds"]
    copy_rate, write_rate = gb / copy_s, gb / write_s
    rss_limit = 1.5 * largest + 1e9
    ckpt_bytes = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(ckpt) for n in ns)
    result = {
        "cache": "cold (page cache dropped before each run)" if cold else "warm (each file read once before both)",
        "release_gb": round(gb, 3),
        "checkpoint_gb": round(ckpt_bytes / 1e9, 3),
        "shards": len(files),
        "largest_shard_gb": round(largest / 1e9, 3),
        "raw_read_s": round(raw_s, 2),
        "raw_read_gb_s": round(raw_rate, 3),
        "write_s": round(write_s, 2),
        "write_gb_s": round(write_rate, 3),
        "write_vs_raw": round(write_rate / raw_rate, 3),
        "copy_s": round(copy_s, 2),
        "copy_gb_s": round(copy_rate, 3),
        "convert_vs_copy": round(conv_rate / copy_rate, 3),
        "convert_vs_write": round(conv_rate / write_rate, 3),
        "convert_s": round(conv["seconds"], 2),
        "convert_gb_s": round(conv_rate, 3),
        "convert_vs_raw": round(ratios[len(ratios) // 2], 3),
        "convert_vs_raw_per_round": [round(r, 3) for r in per_round],
        "convert_process_wall_s": round(conv_wall, 2),
        "convert_peak_rss_gb": round(conv_rss / 1e9, 3),
        "convert_rss_after_imports_gb": round(conv["rss_after_imports"] / 1e9, 3),
        "rss_limit_gb": round(rss_limit / 1e9, 3),
        "export_s": round(exp["seconds"], 2),
        "export_gb_s": round(exp_rate, 3),
        "export_peak_rss_gb": round(exp_rss / 1e9, 3),
        "export_files_identical": same,
        "target_throughput_met": ratios[len(ratios) // 2] >= 0.5,
        "target_rss_met": conv_rss <= rss_limit,
    }
    print(f"raw read (cat, {result['cache']}): {raw_rate:.2f} GB/s ({raw_s:.1f} s, median of {len(rounds)})")
    print(
        f"sequential write (dd, O_DIRECT + fsync): {write_rate:.2f} GB/s = {write_rate / raw_rate:.2f}x raw read "
        "(the ceiling for a converter writing to the disk it reads)"
    )
    print(f"plain copy (cp + sync): {copy_rate:.2f} GB/s ({copy_s:.1f} s)")
    print(
        f"convert: {conv_rate:.2f} GB/s ({conv['seconds']:.1f} s) = {result['convert_vs_raw']:.2f}x raw read "
        f"(median of the rounds' ratios {result['convert_vs_raw_per_round']}) "
        f"[target >= 0.5x: {'met' if result['target_throughput_met'] else 'MISSED'}], "
        f"{conv_rate / copy_rate:.2f}x plain copy, {conv_rate / write_rate:.2f}x sequential write"
    )
    print(
        f"convert peak RSS: {conv_rss / 1e9:.2f} GB (after imports {conv['rss_after_imports'] / 1e9:.2f} GB); "
        f"limit 1.5 x {largest / 1e9:.2f} + 1 = {rss_limit / 1e9:.2f} GB "
        f"[{'met' if result['target_rss_met'] else 'MISSED'}]"
    )
    print(
        f"export: {exp_rate:.2f} GB/s ({exp['seconds']:.1f} s), peak RSS {exp_rss / 1e9:.2f} GB, "
        f"shards byte-identical to the originals: {same}"
    )
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def _same_file(a: str, b: str, block: int = 64 << 20) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    sys.exit(main())
