"""A converted checkpoint stands alone: ``k25jax generate --model CKPT`` (tokenizer copied along) replies exactly
as from the release directory."""

import dataclasses
import os
import shutil

from k25jax import preset
from k25jax.cli import main

import oracle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_generate_from_checkpoint_equals_release(tmp_path, capsys):
    full = preset("tiny")
    hf = oracle.make_hf_kimi_model(full, seed=3)
    text_only = dataclasses.replace(full, vision=None)
    release = oracle.write_release(oracle.text_param_tree(hf, full), text_only, tmp_path / "release", num_shards=2)
    shutil.copy(os.path.join(ROOT, "k25jax", "assets", "tiny_tiktoken.model"), os.path.join(release, "tiktoken.model"))
    ckpt = str(tmp_path / "ckpt")
    assert main(["convert", release, ckpt, "--quiet"]) == 0
    assert os.path.isfile(os.path.join(ckpt, "tiktoken.model"))
    capsys.readouterr()
    args = ["--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "0", "--dtype", "float32", "--no-thinking"]
    assert main(["generate", "--model", release, *args]) == 0
    from_release = capsys.readouterr().out
    assert main(["generate", "--model", ckpt, *args]) == 0
    assert capsys.readouterr().out == from_release and from_release
