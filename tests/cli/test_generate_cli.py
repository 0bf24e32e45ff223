"""``k25jax generate`` and ``k25jax chat`` on the embedded tiny model: output equals the library's reply."""

import dataclasses
import io
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import build_model, cli_generate, preset
from k25jax.chat import parse_ids, prepare
from k25jax.cli import main
from k25jax.config import RunConfig
from k25jax.generation import generate
from k25jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_pair():
    # The same model `--model tiny-random` builds (seed 0, float32), built once for the module.
    return build_model(preset("tiny"), RunConfig(compute_dtype=jnp.float32)), Tokenizer.tiny()


@pytest.fixture
def cli_tiny(monkeypatch, tiny_pair):
    monkeypatch.setattr(cli_generate, "load_model_and_tokenizer", lambda model, run: tiny_pair)
    return tiny_pair


def expected_output(model, tok, messages, thinking, new_tokens):
    ids, media = prepare(messages, tok, thinking=thinking)
    out = generate(
        model, [ids], media=[media], max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=tok.stop_ids
    )[0]
    reply = parse_ids(out, tok, thinking=thinking)
    text = "--- thinking ---\n" + reply.reasoning_content if thinking else "--- answer ---\n"
    if not thinking or tok.token_id("</think>") in out:
        text += ("\n--- answer ---\n" if thinking else "") + reply.content
    text += "\n"
    if reply.tool_calls:
        text += "--- tool calls ---\n" + "".join(
            f"{c['function']['name']} {c['function']['arguments']}  [{c['id']}]\n" for c in reply.tool_calls
        )
    return text, reply


@pytest.mark.parametrize("thinking", [True, False])
def test_generate_streams_the_reply(cli_tiny, capsys, thinking):
    model, tok = cli_tiny
    argv = ["generate", "--model", "tiny-random", "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(argv + ([] if thinking else ["--no-thinking"])) == 0
    expected, reply = expected_output(model, tok, [{"role": "user", "content": "Hello"}], thinking, 12)
    assert capsys.readouterr().out == expected
    assert len(reply.reasoning_content if thinking else reply.content) > 0


SAMPLING_CASES = {
    "thinking": ([], (1.0, 0.95, 0), "<think>"),
    "no_thinking": (["--no-thinking"], (0.6, 0.95, 0), "<think></think>"),
    "no_thinking_overridden": (
        ["--no-thinking", "--temperature", "0.2", "--top-p", "0.5", "--top-k", "7"],
        (0.2, 0.5, 7),
        "<think></think>",
    ),
}


@pytest.mark.parametrize("case", sorted(SAMPLING_CASES))
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_settings_follow_the_thinking_mode(cli_tiny, monkeypatch, capsys, command, case):
    """``--no-thinking`` picks the model card's instant settings (temperature 0.6, top_p 0.95) for the generation
    the command starts; thinking mode 1.0 / 0.95; explicit flags win. The stream is intercepted (nothing runs)."""
    flags, expected, prompt_end = SAMPLING_CASES[case]
    seen = []

    def fake_stream(*args, **kw):
        ids = args[-2] if command == "chat" else args[1][0]  # Session.stream(self, ids, media) / stream(model, [ids])
        seen.append((ids, kw))
        return iter([])

    if command == "chat":
        from k25jax.session import Session

        monkeypatch.setattr(Session, "stream", fake_stream)
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
        argv = ["chat", "--model", "tiny-random"]
    else:
        monkeypatch.setattr(sys.modules["k25jax.generation"], "stream", fake_stream)  # the module, not the function
        argv = ["generate", "--model", "tiny-random", "--prompt", "Hello"]
    assert main(argv + flags) == 0
    capsys.readouterr()
    (ids, kw), tok = seen[0], cli_tiny[1]
    assert len(seen) == 1 and (kw["temperature"], kw["top_p"], kw["top_k"]) == expected
    assert tok.decode(ids).endswith("<|im_assistant|>assistant<|im_middle|>" + prompt_end)


def test_chat_keeps_history_and_resets(cli_tiny, capsys, monkeypatch):
    model, tok = cli_tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/reset\nWhat is 2+2?\n\nAnd 3+3?\n"))
    argv = ["chat", "--model", "tiny-random", "--max-new-tokens", "10", "--temperature", "0", "--no-thinking"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    first, _ = expected_output(model, tok, [{"role": "user", "content": "Hello there"}], False, 10)
    history = [{"role": "user", "content": "What is 2+2?"}]
    second, reply = expected_output(model, tok, history, False, 10)
    history += [reply.message(), {"role": "user", "content": "And 3+3?"}]
    third, _ = expected_output(model, tok, history, False, 10)
    assert out == f"=== turn 1 ===\n{first}(history cleared)\n=== turn 2 ===\n{second}=== turn 3 ===\n{third}"


def _write_image(path, width, height, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_generate_with_images(cli_tiny, capsys, tmp_path):
    """``--image`` (twice): the images come before the prompt text in one user message."""
    model, tok = cli_tiny
    first, second = _write_image(tmp_path / "a.png", 90, 60, 0), _write_image(tmp_path / "b.jpg", 30, 50, 1)
    argv = ["generate", "--prompt", "Compare them.", "--image", first, "--image", second, "--max-new-tokens", "10"]
    assert main(argv + ["--temperature", "0", "--no-thinking"]) == 0
    parts = [{"type": "image", "image": first}, {"type": "image", "image": second}]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare them."}]}]
    expected, _ = expected_output(model, tok, messages, False, 10)
    assert capsys.readouterr().out == expected
    without, _ = expected_output(model, tok, [{"role": "user", "content": "Compare them."}], False, 10)
    assert expected != without  # the images reached the model


def test_bad_images_are_named(cli_tiny, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match=f"k25jax generate: {broken}: not a recognised image format"):
        main(["generate", "--prompt", "x", "--image", str(broken)])
    with pytest.raises(SystemExit, match="k25jax generate: /no/such.png: no such image file"):
        main(["generate", "--prompt", "x", "--image", "/no/such.png"])


def test_image_needs_a_vision_tower(monkeypatch, tmp_path):
    text_only = build_model(dataclasses.replace(preset("tiny"), vision=None), RunConfig(compute_dtype=jnp.float32))
    monkeypatch.setattr(cli_generate, "load_model_and_tokenizer", lambda model, run: (text_only, Tokenizer.tiny()))
    image = _write_image(tmp_path / "a.png", 28, 28, 0)
    with pytest.raises(SystemExit, match="k25jax generate: this model has no vision tower"):
        main(["generate", "--prompt", "x", "--image", image])


def test_chat_attaches_images_to_the_next_message(cli_tiny, capsys, monkeypatch, tmp_path):
    model, tok = cli_tiny
    image = _write_image(tmp_path / "cat.png", 70, 40, 2)
    script = f"/image {image}\n/image /no/such.png\nWhat is this?\nAnd now?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--max-new-tokens", "8", "--temperature", "0", "--no-thinking"]) == 0
    captured = capsys.readouterr()
    history = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}
    ]
    first, reply = expected_output(model, tok, history, False, 8)
    history += [reply.message(), {"role": "user", "content": "And now?"}]
    second, _ = expected_output(model, tok, history, False, 8)
    attached = f"(image attached to the next message: {image})\n"
    assert captured.out == f"{attached}=== turn 1 ===\n{first}=== turn 2 ===\n{second}"
    assert "/no/such.png: no such image file" in captured.err


def _write_video(path, frames=7, fps=4):
    av = pytest.importorskip("av")
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            pixels = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def test_generate_with_image_and_video(cli_tiny, capsys, tmp_path):
    """``--video``: after the images, before the prompt text; the reply equals the library's for those parts."""
    model, tok = cli_tiny
    image, video = _write_image(tmp_path / "a.png", 40, 30, 0), _write_video(tmp_path / "clip.mp4")
    argv = ["generate", "--prompt", "What happens?", "--video", video, "--image", image, "--max-new-tokens", "10"]
    assert main(argv + ["--temperature", "0", "--no-thinking"]) == 0
    parts = [{"type": "image", "image": image}, {"type": "video", "video": video}]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}]
    ids, media = prepare(messages, tok, thinking=False)
    assert media.grid_thw.shape[0] >= 2 and media.grid_thw[1:, 0].sum() >= 2  # the image, then video chunk(s)
    expected, _ = expected_output(model, tok, messages, False, 10)
    assert capsys.readouterr().out == expected
    only_image, _ = expected_output(
        model, tok, [{"role": "user", "content": [*parts[:1], messages[0]["content"][2]]}], False, 10
    )
    assert expected != only_image  # the video reached the model


def test_bad_videos_are_named(cli_tiny, tmp_path):
    pytest.importorskip("av")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(SystemExit, match=f"k25jax generate: {junk}: not a readable video"):
        main(["generate", "--prompt", "x", "--video", str(junk)])
    with pytest.raises(SystemExit, match="k25jax generate: /no/such.mp4: no such video file"):
        main(["generate", "--prompt", "x", "--video", "/no/such.mp4"])


def test_chat_attaches_a_video_to_the_next_message(cli_tiny, capsys, monkeypatch, tmp_path):
    model, tok = cli_tiny
    video = _write_video(tmp_path / "clip.mp4", frames=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {video}\n/video\nDescribe it.\n"))
    assert main(["chat", "--max-new-tokens", "6", "--temperature", "0", "--no-thinking"]) == 0
    content = [{"type": "video", "video": video}, {"type": "text", "text": "Describe it."}]
    expected, _ = expected_output(model, tok, [{"role": "user", "content": content}], False, 6)
    attached = f"(video attached to the next message: {video})\nusage: /video PATH\n"
    assert capsys.readouterr().out == f"{attached}=== turn 1 ===\n{expected}"


def test_bad_mesh_is_named(cli_tiny):
    with pytest.raises(SystemExit, match=r"k25jax chat: --mesh data:8: .*expected NAME=SIZE"):
        main(["chat", "--model", "tiny-random", "--mesh", "data:8"])


def test_release_dir_without_tokenizer_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}: no tiktoken.model"):
        cli_generate.load_model_and_tokenizer(str(tmp_path), cli_generate.run_config(str(tmp_path), None))


def test_generate_from_a_release_directory(tmp_path, capsys):
    """A release directory (weights + tiktoken.model): the command loads both and streams the reply."""
    import shutil

    from k25jax.tokenizer import write_tiktoken_ranks

    import oracle

    full = preset("tiny")
    hf = oracle.make_hf_kimi_model(full, seed=3)
    text_only = dataclasses.replace(full, vision=None)
    path = oracle.write_release(oracle.text_param_tree(hf, full), text_only, tmp_path / "release", num_shards=1)
    shutil.copy(os.path.join(ROOT, "k25jax", "assets", "tiny_tiktoken.model"), os.path.join(path, "tiktoken.model"))
    argv = ["generate", "--model", path, "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(argv + ["--dtype", "float32", "--no-thinking"]) == 0
    model, tok = cli_generate.load_model_and_tokenizer(path, cli_generate.run_config(path, "float32"))
    expected, _ = expected_output(model, tok, [{"role": "user", "content": "Hi"}], False, 8)
    assert capsys.readouterr().out == expected
    # --mesh with a model directory: the weights load straight onto the mesh (expert=8 on the 8 fake devices)
    assert main(argv + ["--dtype", "float32", "--no-thinking", "--mesh", "expert=8"]) == 0
    assert capsys.readouterr().out == expected
    write_tiktoken_ranks({bytes([i]): i for i in range(256)}, os.path.join(path, "tiktoken.model"))
    with pytest.raises(SystemExit, match="vocabulary of 512 ids but config.json's text_config.vocab_size is 1280"):
        cli_generate.load_model_and_tokenizer(path, cli_generate.run_config(path, "float32"))


def test_chat_reads_piped_stdin():
    """The real command, stdin piped: two turns, each reply under its own header."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "k25jax.cli",
            "chat",
            "--model",
            "tiny-random",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        input="Hello\nHow are you?\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "=== turn 1 ===" and lines[1] == "--- thinking ---"
    assert proc.stdout.count("=== turn") == 2 and "=== turn 2 ===" in lines


def test_attention_block_flag():
    """``--attention-block``: auto is blockwise 2048 above 32K of context (the planner's rule), plain below."""
    assert cli_generate.attention_block("auto", 262144) == 2048
    assert cli_generate.attention_block("auto", 4096) is None and cli_generate.attention_block("plain", 10**6) is None
    assert cli_generate.attention_block("512", None) == 512
    assert cli_generate.run_config("tiny", None, "xla", "auto", 65536).attention_block == 2048
    with pytest.raises(SystemExit, match="--attention-block must be a positive integer"):
        cli_generate.attention_block("big", None)
    with pytest.raises(SystemExit, match="--attention-block must be positive"):
        cli_generate.attention_block("0", None)
