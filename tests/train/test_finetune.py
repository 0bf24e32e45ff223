"""``k25jax finetune`` end to end: resume after SIGKILL bit for bit, NaN stops, bad input named before the first
step, export equal to the trained forward bit for bit, a 0-step run exporting the input's bytes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import k25jax
from k25jax.config import RunConfig, tiny
from k25jax.train.data import DataError
from k25jax.train.qat import QATError, quantize_experts
from k25jax.train.trainer import FinetuneConfig, TrainingError, finetune, trained_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _write_samples(path, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            sample = {
                "messages": [
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": f"{a + b}"},
                ]
            }
            f.write(json.dumps(sample) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return _write_samples(d / "train.jsonl", 64), _write_samples(d / "eval.jsonl", 8, seed=1)


def _cfg(out, data, **kw) -> FinetuneConfig:
    base = dict(
        model="tiny-random",
        data=data,
        out=str(out),
        steps=10,
        batch_size=4,
        max_length=64,
        lr=3e-3,
        warmup=2,
        save_every=2,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def _losses(out) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _state(cfg) -> dict:
    model = trained_model(cfg)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.slow  # ~50 s; CI keeps the in-process resume checks (LoRA run, data pipeline)
def test_resume_after_sigkill_is_bitwise(tmp_path, samples):
    train, _ = samples
    whole = _cfg(tmp_path / "whole", train)
    finetune(whole)
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        os.path.join(HERE, "slow_finetune.py"),
        "finetune",
        "--model",
        "tiny-random",
        "--data",
        train,
        "--out",
        str(killed),
        "--steps",
        "10",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--save-every",
        "2",
        "--seed",
        "3",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, SLOW_STEP_SECONDS="0.4", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        if proc.poll() is not None:
            pytest.fail("the slowed run ended before it could be killed")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the slowed run wrote no metrics in 240 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    steps_done = len(metrics.read_text().splitlines())
    assert 5 <= steps_done < 10
    resumed = _cfg(killed, train, resume=True)
    summary = finetune(resumed)
    assert summary["start_step"] in (4, 6, 8) and summary["start_step"] <= steps_done
    want, got = _losses(whole.out), _losses(killed)
    for step in range(summary["start_step"] + 1, 11):
        assert got[step] == want[step], step
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    import orbax.checkpoint as ocp

    def opt(out):
        with ocp.CheckpointManager(os.path.join(out, "checkpoints")) as m:
            return m.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["opt_state"]

    for x, y in zip(jax.tree.leaves(opt(whole.out)), jax.tree.leaves(opt(str(killed))), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, samples):
    train, _ = samples
    cfg = _cfg(tmp_path / "nan", train, lr=1e30, clip_norm=None, warmup=0, save_every=1, steps=6)
    with pytest.raises(TrainingError, match=r"the loss is (nan|inf)") as err:
        finetune(cfg)
    losses = _losses(cfg.out)
    last = max(losses)
    assert all(np.isfinite(v) for v in losses.values()) and last < 6
    assert f"step {last}" in str(err.value)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(cfg.out, "checkpoints")) as m:
        assert m.latest_step() == last


def test_bad_inputs_fail_before_the_first_step(tmp_path, samples):
    train, _ = samples
    bad = tmp_path / "bad.jsonl"
    lines = open(train, encoding="utf-8").read().splitlines()
    bad.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    cases = [
        (dict(data=str(bad)), DataError, r"bad\.jsonl:4: "),
        (dict(data=str(tmp_path / "empty.jsonl")), DataError, "empty|no samples"),
        (dict(trainable="^nothing/"), QATError, r"--trainable '\^nothing/' matches no"),
        (dict(max_length=4), DataError, "longer than max_length=4"),
        (dict(steps=-1), QATError, "--steps must be >= 0"),
    ]
    (tmp_path / "empty.jsonl").write_text("")
    for i, (change, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            finetune(_cfg(out, change.pop("data", train), **change))
        assert not out.exists(), change  # nothing half-written
    # the CLI: one line naming the file and line, exit status 2
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "k25jax.cli",
            "finetune",
            "--model",
            "tiny-random",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=300,
    )
    assert result.returncode == 2 and "bad.jsonl:4:" in result.stderr


def test_overlong_samples_are_counted(tmp_path, samples):
    train, _ = samples
    summary = finetune(_cfg(tmp_path / "t", train, steps=1, max_length=20, overlong="truncate"))
    assert summary["data"]["truncated"] > 0 and summary["data"]["dropped"] == 0


def test_export_equals_the_trained_forward_bitwise(tmp_path, samples):
    train, evaluation = samples
    cfg = _cfg(tmp_path / "run", train, eval_data=evaluation, steps=4, export=str(tmp_path / "export"), eval_every=2)
    summary = finetune(cfg)
    assert "eval_loss" in summary["last"]
    trained = trained_model(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, tiny().text.vocab_size)
    want = np.asarray(trained(ids))
    exported = k25jax.load_model(summary["export"], RunConfig(compute_dtype="float32"), progress=False)
    assert np.array_equal(np.asarray(exported(ids)), want)
    assert os.path.exists(os.path.join(summary["export"], "tiktoken.model"))
    # and the exported directory is a --model for a later finetune
    again = finetune(_cfg(tmp_path / "again", train, model=summary["export"], steps=1))
    assert again["steps"] == 1


def test_zero_step_run_exports_a_kimi_grid_input_byte_for_byte(tmp_path, samples):
    from convert.to_release import export_model

    train, _ = samples
    model = k25jax.build_model(tiny(), RunConfig(compute_dtype="float32"), seed=4)
    quantize_experts(model, "kimi")
    source = export_model(model, tmp_path / "source", progress=False)
    finetune(
        FinetuneConfig(model="tiny-random", data=train, out=str(tmp_path / "tok"), steps=0, export=str(tmp_path / "t"))
    )
    for name in ("tiktoken.model", "chat_template.jinja"):  # the tokenizer a release carries beside its weights
        os.link(os.path.join(tmp_path / "t", name), os.path.join(source, name))
    cfg = _cfg(tmp_path / "zero", train, model=source, steps=0, export=str(tmp_path / "out"))
    out = finetune(cfg)["export"]
    names = sorted(os.listdir(source))
    assert sorted(os.listdir(out)) == names
    for name in names:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(source, name), "rb").read(), name


def test_on_step_sees_the_logged_values_and_can_stop_the_run(tmp_path, samples):
    train, evals = samples
    seen = []

    class Enough(Exception):
        pass

    def on_step(step, values):
        seen.append((step, values))
        if step == 4:
            raise Enough

    cfg = _cfg(tmp_path / "cb", train, eval_data=evals, eval_every=2, steps=10)
    with pytest.raises(Enough):
        finetune(cfg, on_step=on_step)
    with open(os.path.join(cfg.out, "metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert [s for s, _ in seen] == [1, 2, 3, 4] == [r["step"] for r in logged]
    for (_, values), record in zip(seen, logged, strict=True):
        assert values == {k: v for k, v in record.items() if k != "step"}
    assert [("eval_loss" in v) for _, v in seen] == [False, True, False, True]
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(cfg.out, "checkpoints")) as m:
        assert m.latest_step() == 4  # saved every 2 steps; the run stopped after step 4


def test_no_qat_trains_float_experts_and_exports_them_post_training_quantized(tmp_path, samples):
    from k25jax.tokenizer import Tokenizer
    from k25jax.train.qat import expert_weights
    from k25jax.train.trainer import held_out_loss

    train, evaluation = samples
    cfg = _cfg(
        tmp_path / "ptq", train, eval_data=evaluation, steps=4, eval_every=4, qat=False, export=str(tmp_path / "e")
    )
    summary = finetune(cfg)
    trained = trained_model(cfg)
    assert {type(w).__name__ for *_, w, _ in expert_weights(trained)} == {"Param"}  # float experts trained
    tok = Tokenizer.tiny()
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length)
    float_loss = held_out_loss(trained, evaluation, tok, **kw)
    # what the run evaluated (not bit for bit: the run's own eval and this later one, same jitted function and
    # equal inputs, differ by ~2e-5 relative on CPU, in QAT runs alike; cause not found)
    np.testing.assert_allclose(float_loss, summary["last"]["eval_loss"], rtol=1e-4)
    quantize_experts(trained, "kimi", float_only=True)
    ptq_loss = held_out_loss(trained, evaluation, tok, **kw)
    exported = k25jax.load_model(summary["export"], RunConfig(compute_dtype="float32"), progress=False)
    assert {type(w).__name__ for *_, w, _ in expert_weights(exported)} == {"Int4Weight"}
    assert held_out_loss(exported, evaluation, tok, **kw) == ptq_loss  # the export is the PTQ model
    assert ptq_loss != float_loss
    with pytest.raises(TrainingError, match="qat"):  # resuming with QAT on is a different run
        finetune(dataclasses.replace(cfg, qat=True, resume=True, steps=6))
