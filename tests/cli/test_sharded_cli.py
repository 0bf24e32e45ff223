"""``k25jax generate --mesh`` on 8 fake CPU devices (one process, and two processes of 4 devices each as two
hosts), ``k25jax plan``, and multi-host launch detection."""

import io
import os
import socket
import subprocess
import sys

import pytest

from k25jax import cli_generate
from k25jax.cli import main
from k25jax.distributed import launch_settings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

ARGS = ["generate", "--model", "tiny-random", "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def expected():
    """The single-device reply of the width-64 tiny model, through the same CLI code."""
    import variant_cli

    original = cli_generate.load_model_and_tokenizer
    cli_generate.load_model_and_tokenizer = variant_cli.load_variant
    out = io.StringIO()
    try:
        stdout, sys.stdout = sys.stdout, out
        assert main(ARGS) == 0
    finally:
        sys.stdout = stdout
        cli_generate.load_model_and_tokenizer = original
    return out.getvalue()


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def _cli(extra: list[str]) -> list[str]:
    return [sys.executable, os.path.join(HERE, "variant_cli.py"), *ARGS, *extra]


@pytest.mark.slow  # CI time (18 s); notebook 03 and tests/test_sharding*.py run sharded generation in CI
def test_generate_on_a_mesh_in_a_subprocess(expected):
    run = subprocess.run(
        _cli(["--mesh", "expert=4,tensor=2"]), env=_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected
    assert len(expected.split("\n", 1)[1].strip()) > 0  # the reply is not empty


# The coordinator (process 0) could not bind its port: another program took it between our probe and its bind.
BIND_FAILED = "Failed to start RPC server"
PORT_ATTEMPTS = 3


def _free_port() -> int:
    """A port free right now (the coordinator binds it on all interfaces, so probe those: IPv6, else IPv4)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family) as s:
                s.bind((host, 0))
                return s.getsockname()[1]
        except OSError:
            continue
    raise OSError("no free port to probe on this host")


def _run_two_hosts(port: int) -> list[tuple[subprocess.Popen, str, str]]:
    """Both processes on coordinator port ``port``; process 1 is killed if the coordinator fails to start."""
    procs = [
        subprocess.Popen(
            _cli(["--mesh", "expert=4,tensor=2", "--coordinator", f"localhost:{port}", "--num-processes", "2"])
            + ["--process-id", str(i)],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:
        outs = [procs[0].communicate(timeout=600)]
        if procs[0].returncode != 0:  # no coordinator: process 1 would wait for it until its own timeout
            procs[1].kill()
        outs.append(procs[1].communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.slow  # ~45 s: two processes over gloo; CI keeps the one-host sharded CLI tests
def test_generate_on_two_hosts(expected):
    """Two processes of 4 CPU devices each, joined by jax.distributed: one 8-device mesh; process 0 prints.

    The coordinator port is probed free, then bound by process 0 a few seconds later; if something took it in
    between (the coordinator says so and exits), the run is retried on a new port, up to PORT_ATTEMPTS times."""
    for _ in range(PORT_ATTEMPTS):
        runs = _run_two_hosts(_free_port())
        if runs[0][0].returncode != 0 and BIND_FAILED in runs[0][2]:
            continue
        break
    for p, _, err in runs:
        assert p.returncode == 0, err[-3000:]
    assert runs[0][1] == expected
    assert runs[1][1] == ""


def test_mesh_that_cannot_split_the_model_says_why(monkeypatch):
    # The tiny preset's expert width 32 is a single INT4 group: tensor=2 cannot split its down projection.
    from k25jax import build_model, preset
    from k25jax.tokenizer import Tokenizer

    monkeypatch.setattr(
        cli_generate, "load_model_and_tokenizer", lambda m, d: (build_model(preset("tiny")), Tokenizer.tiny())
    )
    with pytest.raises(
        SystemExit, match=r"--mesh expert=4,tensor=2: .*down_proj/scales: dim 2 \('expert_mlp', size 1\)"
    ):
        main([*ARGS, "--mesh", "expert=4,tensor=2"])
    with pytest.raises(SystemExit, match="needs 24 devices, but 8 are available"):
        main([*ARGS, "--mesh", "expert=3,tensor=8"])


def test_plan_command_prints_the_plan(capsys):
    assert main(["plan", "--mesh", "expert=8", "--batch", "8", "--context", "32768", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "routed experts                               71.35 GB" in out
    assert "fits" in out and "NOT" not in out
    assert main(["plan", "--mesh", "expert=8", "--batch", "1", "--context", "4096", "--device", "v5e"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not divide over mesh axes"):
        main(["plan", "--mesh", "expert=5"])


def test_launch_detection():
    class Args:
        coordinator, num_processes, process_id, distributed = None, None, None, False

    assert launch_settings(Args(), {}) is None  # one host
    assert launch_settings(Args(), {"SLURM_NTASKS": "1"}) is None
    assert launch_settings(Args(), {"SLURM_NTASKS": "4"}) == {}  # JAX reads the SLURM job itself
    assert launch_settings(Args(), {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert launch_settings(Args(), {"TPU_WORKER_HOSTNAMES": "t0"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert launch_settings(Args(), env) == {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
    flags = Args()
    flags.coordinator, flags.num_processes, flags.process_id = "h1:99", 4, 3
    assert launch_settings(flags, env) == {"coordinator_address": "h1:99", "num_processes": 4, "process_id": 3}
    partial = Args()
    partial.coordinator = "h1:99"
    with pytest.raises(SystemExit, match="needs --num-processes, --process-id too"):
        launch_settings(partial, {})
    auto = Args()
    auto.distributed = True
    assert launch_settings(auto, {}) == {}
