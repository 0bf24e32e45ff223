"""The demo recipe's pieces that run in seconds: the polish stage's data and the loss plot over both runs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from k25jax.demo import build, tasks


def test_polish_data_follows_its_mix(tmp_path):
    path = build.make_polish_data(str(tmp_path), 600, text_only=False)
    samples = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(samples) == 600
    names = [s["meta"]["task"] for s in samples]
    weights = np.array(list(build.POLISH_MIX.values()))
    for task, w in zip(build.POLISH_MIX, weights / weights.sum(), strict=True):
        assert abs(names.count(task) / 600 - w) < 0.05, (task, names.count(task))
    instant = sum(s["meta"]["mode"] == "instant" for s in samples) / 600
    assert abs(instant - build.POLISH_INSTANT) < 0.06, instant
    # seeded, and not the held-out split's seed
    assert samples[:20] == tasks.generate(20, build.POLISH_SEED, mix=build.POLISH_MIX, instant=build.POLISH_INSTANT)
    assert build.POLISH_SEED != 1
    # a finished stage is kept
    mtime = (tmp_path / "polish.jsonl").stat().st_mtime_ns
    build.make_polish_data(str(tmp_path), 5, text_only=False)
    assert (tmp_path / "polish.jsonl").stat().st_mtime_ns == mtime


def test_polish_data_text_only(tmp_path):
    path = build.make_polish_data(str(tmp_path), 200, text_only=True)
    names = {json.loads(line)["meta"]["task"] for line in open(path, encoding="utf-8")}
    assert names <= {"add", "sub", "compare", "tool_call", "no_tool"} and len(names) >= 4


def test_loss_plot_joins_the_runs(tmp_path, capsys):
    runs = []
    for k, n in enumerate((6, 4)):
        path = tmp_path / f"run{k}.jsonl"
        rows = [{"step": i + 1, "loss": 2.0 / (i + 1 + 10 * k)} for i in range(n)]
        rows[-1]["eval_loss"] = rows[-1]["loss"] * 1.1
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        runs.append(str(path))
    png = tmp_path / "loss.png"
    build.plot_loss(runs + [str(tmp_path / "missing.jsonl")], str(png))
    assert "missing.jsonl is missing" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # something was drawn
    assert not list(tmp_path.glob("*.tmp*"))
