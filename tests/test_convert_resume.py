"""Crash safety: a conversion killed mid-way (a real SIGKILL of the CLI process) resumes without redoing finished
work and produces the same checkpoint; DST appears only complete; existing outputs are protected."""

import json
import os
import signal
import subprocess
import sys
import time

import convert_helpers as helpers
import pytest

from convert.describe import inspect_path
from convert.destination import JOURNAL_NAME, DestinationError
from convert.to_orbax import PAUSE_ENV, convert_release
from k25jax.checkpoint import CHECKPOINT_MARKER
from k25jax.cli import main

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_AFTER = 40  # tensor groups journaled before the converter stops and waits to be killed


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


def _run_until_paused(release: str, dst: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **{PAUSE_ENV: str(PAUSE_AFTER)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "k25jax.cli", "convert", release, dst, "--quiet"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        if "paused after" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"converter did not pause (exit {proc.wait()})")


def test_killed_conversion_resumes_to_an_identical_checkpoint(release, tmp_path):
    dst = str(tmp_path / "ckpt")
    proc = _run_until_paused(release, dst)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = dst + ".partial"
    assert not os.path.exists(dst) and os.path.isdir(partial)
    assert not os.path.exists(os.path.join(partial, CHECKPOINT_MARKER))  # nothing looks complete
    journaled = _journaled(partial)
    assert len(journaled) >= PAUSE_AFTER
    status = inspect_path(dst)["status"]  # inspect finds the unfinished conversion
    assert status.startswith(f"partial: {len(journaled)} of ") and "re-run the conversion to resume" in status
    before = _chunk_mtimes(partial)

    summary = convert_release(release, dst, progress=False)  # same arguments: resumes
    print(
        f"killed after {len(journaled)} journaled tensor groups; resumed {summary['resumed_bytes']} of "
        f"{summary['source_bytes']} bytes"
    )
    assert 0 < summary["resumed_bytes"] < summary["source_bytes"]
    assert summary["converted_bytes"] == summary["source_bytes"] - summary["resumed_bytes"]
    after = _chunk_mtimes(dst)
    untouched = [p for p, t in before.items() if after.get(p) == t]
    assert len(untouched) >= PAUSE_AFTER // 2  # journaled work was not redone (its chunk files kept)

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
