"""Crash safety: a conversion killed mid-way (a real SIGKILL of the CLI process) resumes without redoing finished
work and produces the same checkpoint; DST appears only complete; existing outputs are protected."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import convert_helpers as helpers
import pytest

from convert.describe import inspect_path
from convert.destination import JOURNAL_NAME, DestinationError
from convert.to_orbax import checkpoint_specs, convert_release, read_config
from k25jax.checkpoint import CHECKPOINT_MARKER
from k25jax.cli import main
from k25jax.release.keymap import release_entries
from k25jax.release.reader import ReleaseReader

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_AFTER = 40  # tensor groups journaled before the converter stops and waits to be killed
PAUSER = os.path.join(ROOT, "tests", "pause_convert.py")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return helpers.make_release(configs.grouped(), tmp_path_factory.mktemp("resume") / "release", seed=21)


def _journaled(partial: str) -> set[str]:
    done = set()
    with open(os.path.join(partial, JOURNAL_NAME)) as f:
        for line in f.readlines()[1:]:
            done.update(json.loads(line)["done"])
    return done


def _chunk_mtimes(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if not n.startswith((".", "_")) and "." in os.path.basename(dirpath):
                out[os.path.relpath(os.path.join(dirpath, n), root)] = os.stat(os.path.join(dirpath, n)).st_mtime_ns
    return out


def _entry_chunk_files(release: str) -> tuple[dict[str, set[str]], dict[str, int]]:
    """``{entry key: chunk files (relative to the checkpoint) it writes}`` and ``{entry key: source bytes}``."""
    cfg = read_config(release)
    entries = release_entries(cfg)
    specs = checkpoint_specs(cfg, entries)
    reader = ReleaseReader(release)
    files, nbytes = {}, {}
    for e in entries:
        files[e.key] = set()
        for t in e.targets:
            spec = specs[t.path]
            region = tuple(slice(i, i + 1) for i in t.index) + (slice(None),) * (len(spec.shape) - len(t.index))
            files[e.key] |= {os.path.join(spec.name, k) for k in spec.chunk_keys(region)}
        nbytes[e.key] = sum(reader.tensors[s.name].nbytes for s in e.sources)
    return files, nbytes


def _run_until_paused(release: str, dst: str, timeout: float = 240) -> subprocess.Popen:
    """Start the converter (through tests/pause_convert.py) and return once it says it paused; a converter that
    exits or stays silent for ``timeout`` seconds fails the test instead of hanging it."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, PAUSER, str(PAUSE_AFTER), "convert", release, dst, "--quiet"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:  # stderr closed: the converter exited
            break
        seen.append(line)
        if "paused after" in line:
            return proc
    proc.kill()
    raise AssertionError(f"converter did not pause (exit {proc.wait()}): {''.join(seen)[-2000:]}")


def test_killed_conversion_resumes_to_an_identical_checkpoint(release, tmp_path):
    dst = str(tmp_path / "ckpt")
    proc = _run_until_paused(release, dst)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = dst + ".partial"
    assert not os.path.exists(dst) and os.path.isdir(partial)
    assert not os.path.exists(os.path.join(partial, CHECKPOINT_MARKER))  # nothing looks complete
    journaled = _journaled(partial)
    # Each retired unit is committed on its own, so each commit journals at most one key: the committer stops at
    # exactly PAUSE_AFTER, and nothing later is journaled.
    assert len(journaled) == PAUSE_AFTER
    status = inspect_path(dst)["status"]  # inspect finds the unfinished conversion
    assert status.startswith(f"partial: {len(journaled)} of ") and "re-run the conversion to resume" in status
    before = _chunk_mtimes(partial)

    summary = convert_release(release, dst, progress=False)  # same arguments: resumes
    print(
        f"killed after {len(journaled)} journaled tensor groups; resumed {summary['resumed_bytes']} of "
        f"{summary['source_bytes']} bytes"
    )
    entry_files, entry_bytes = _entry_chunk_files(release)
    # Exactly the journaled entries are skipped: their source bytes are the resumed bytes, ...
    assert summary["resumed_bytes"] == sum(entry_bytes[k] for k in journaled)
    assert 0 < summary["resumed_bytes"] < summary["source_bytes"]
    assert summary["converted_bytes"] == summary["source_bytes"] - summary["resumed_bytes"]
    # ... their chunk files are kept as they were, and every other chunk file on disk at the kill is rewritten
    # (the writers went on after the pause: those files belong to entries the journal does not name).
    kept = set().union(*(entry_files[k] for k in journaled))
    assert kept <= before.keys()
    after = _chunk_mtimes(dst)
    untouched = {p for p, t in before.items() if after.get(p) == t}
    print(f"{len(kept)} chunk files of journaled entries kept; {len(before) - len(kept)} others on disk redone")
    assert untouched == kept

    fresh = str(tmp_path / "fresh")
    convert_release(release, fresh, progress=False)
    a, b = helpers.tree_files(dst), helpers.tree_files(fresh)
    assert a.keys() == b.keys()
    differ = [p for p in a if a[p] != b[p]]
    assert differ == ["_CHECKPOINT_METADATA"]  # its timestamps only
    print(f"{len(a)} files compared byte for byte against an uninterrupted conversion")


def test_complete_destination_needs_overwrite(release, tmp_path, capsys):
    dst = str(tmp_path / "ckpt")
    assert main(["convert", release, dst, "--quiet"]) == 0
    stamp = os.stat(os.path.join(dst, CHECKPOINT_MARKER)).st_mtime_ns
    assert main(["convert", release, dst, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"k25jax convert: error: {dst}: a complete checkpoint is already there; pass --overwrite to replace it"
    )
    assert os.stat(os.path.join(dst, CHECKPOINT_MARKER)).st_mtime_ns == stamp
    assert main(["convert", release, dst, "--quiet", "--overwrite"]) == 0
    assert os.stat(os.path.join(dst, CHECKPOINT_MARKER)).st_mtime_ns != stamp
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial or .replaced leftovers


def test_foreign_nonempty_destination_is_refused(release, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", release, str(dst), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"k25jax convert: error: {dst}: directory is not empty and is not a k25jax checkpoint")
        assert "notes.txt" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(dst)) == ["notes.txt"] and not os.path.exists(str(dst) + ".partial")


def test_empty_destination_directory_is_fine(release, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    convert_release(release, dst, progress=False)
    assert os.path.isfile(dst / CHECKPOINT_MARKER)


def test_partial_from_another_source_is_not_resumed(release, tmp_path):
    dst = str(tmp_path / "ckpt")
    os.makedirs(dst + ".partial")
    with open(os.path.join(dst + ".partial", JOURNAL_NAME), "w") as f:
        f.write(json.dumps({"header": {"format": 1, "source": "elsewhere"}}) + "\n")
    with pytest.raises(DestinationError, match=r"ckpt\.partial: an unfinished checkpoint that was started with other"):
        convert_release(release, dst, progress=False)
    summary = convert_release(release, dst, progress=False, overwrite=True)
    assert summary["resumed_bytes"] == 0 and os.path.isfile(os.path.join(dst, CHECKPOINT_MARKER))
