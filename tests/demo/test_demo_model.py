"""The shipped demo model (``--model tiny``, ``k25jax/assets/demo``): a trained K2.5 that answers its held-out tasks,
stored in the released INT4 format on the ``kimi`` grid, computing what transformers computes on the same files."""

import re

import numpy as np
import pytest

import k25jax
from k25jax.config import RunConfig
from k25jax.demo import evaluate, tasks
from k25jax.demo.shipped import demo_dir

CI_SAMPLES = 50  # held-out samples graded greedily here; python -m k25jax.demo.evaluate grades more
TOL = 1e-4  # oracle agreement: max |diff| <= TOL * max |logits|, float32 both sides


@pytest.fixture(scope="module")
def demo():
    model = k25jax.load_model("tiny", RunConfig(compute_dtype="float32"), progress=False)
    return model, k25jax.Tokenizer.from_pretrained("tiny")


@pytest.fixture(scope="module")
def graded(demo):
    model, tokenizer = demo
    samples = tasks.generate(CI_SAMPLES, evaluate.HELD_OUT_SEED)
    samples += tasks.generate(MEDIA_SAMPLES, evaluate.HELD_OUT_SEED, mix={"image": 0.5, "video": 0.5})
    return evaluate.evaluate(model, tokenizer, samples, progress=False)


# (metrics pooled, modes, floor). Where the shipped model meets the target the floor is the target; where it
# does not yet, the floor guards what it does today (greedy held-out accuracy over 1,000 samples in the README),
# below the measured share by the noise of 50 samples, and the README says the target is unmet.
FLOORS = [
    (("tool_call:valid_json",), ("thinking", "instant"), 1.0),  # target 100%: met
    (("tool_call",), ("thinking", "instant"), 0.95),  # target 95%: met (100% on 1,000)
    (("add", "sub", "compare"), ("thinking",), 0.85),  # targets 95% / 98%: 100% / 98% / 96% on 1,000
    (("tool_answer",), ("thinking", "instant"), 0.9),  # target 95%: 99-100% on 1,000
    (("no_tool",), ("thinking", "instant"), 0.5),  # 100% on 1,000 (49 samples)
    (("add", "sub", "compare"), ("instant",), 0.6),  # targets 95% / 98%: unmet, 78% / 75% / 86% on 1,000
    (("image", "video"), ("thinking", "instant"), 0.35),  # targets 95% / 80%: unmet, 59% / 53% on 1,000 (graded
    # on MEDIA_SAMPLES more held-out media samples: the 50 above hold only 6)
]
MEDIA_SAMPLES = 24


@pytest.mark.parametrize("metrics, modes, floor", FLOORS)
def test_held_out_accuracy(graded, metrics, modes, floor):
    """Greedy replies to held-out prompts (seed 1; training used seeds 0 and 2), pooled over ``metrics`` and ``modes``;
    every failure is printed."""
    hits = sum(graded["correct"][m].get(k, 0) for m in modes for k in metrics)
    total = sum(graded["counts"][m].get(k, 0) for m in modes for k in metrics)
    assert total >= 2, (metrics, graded["counts"])
    wrong = [f for f in graded["failures"] if f["mode"] in modes and any(f["task"] in k for k in metrics)]
    print(f"{metrics} {modes}: {hits}/{total}")
    assert hits / total >= floor, f"{metrics} {modes}: {hits}/{total} correct; failures: {wrong}"


def test_the_modes_are_each_graded(graded):
    assert set(graded["counts"]) == {"thinking", "instant"}
    for mode in graded["counts"]:
        assert sum(graded["counts"][mode].values()) >= 20


def test_shipped_release_is_on_the_kimi_grid():
    from convert.describe import inspect_path

    report = inspect_path(demo_dir(), grid=True)
    assert report["problem"] is None
    assert report["grid"]["verdict"] == "kimi"
    assert report["file_bytes"] <= 30 * 2**20


@pytest.mark.reference
def test_shipped_logits_match_transformers(demo):
    """transformers' ``Kimi_K25ForConditionalGeneration`` holding the shipped files (experts decoded with
    compressed-tensors' unpacking) gives k25jax's logits on a held-out chat prompt within 1e-4 relative."""
    import jax.numpy as jnp

    from k25jax import chat

    import oracle

    model, tokenizer = demo
    s = tasks.generate(8, evaluate.HELD_OUT_SEED, mix={"tool_call": 1.0})[0]
    ids = chat.encode(s["messages"], tokenizer, tools=s.get("tools"), thinking=True)
    ids = np.asarray([ids[:300]])
    hf = oracle.hf_model_from_release(demo_dir())
    ours = np.asarray(model(jnp.asarray(ids)))
    theirs = oracle.torch_logits(hf, ids)
    err, scale = float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
    assert err <= TOL * scale, f"max |diff| {err:.3e} > {TOL} x max |logits| {scale:.3e}"


@pytest.mark.parametrize("thinking", [True, False])
def test_the_readme_command_answers(capsys, thinking):
    """``k25jax generate --model tiny`` (the README's first command) loads the shipped release and prints the
    correct answer with its digit-by-digit reasoning in thinking mode; instant mode answers in the same form."""
    from k25jax.cli import main

    argv = ["generate", "--model", "tiny", "--prompt", "What is 347+589?", "--temperature", "0"]
    assert main(argv + ([] if thinking else ["--no-thinking"])) == 0
    out = capsys.readouterr().out
    if thinking:
        assert "--- answer ---\n347+589=936\n" in out
        assert "7+9+0=16, digit 6, carry 1" in out and "digits 9 3 6" in out
    else:  # instant-mode arithmetic is the demo's weak spot (README): the form, not the sum
        assert "--- thinking ---" not in out
        assert re.search(r"--- answer ---\n347\+589=\d+\n", out), out
