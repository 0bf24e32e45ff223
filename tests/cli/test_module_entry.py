"""``python -m k25jax`` is the ``k25jax`` command line."""

import subprocess
import sys


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "k25jax", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("generate", "serve", "finetune", "plan"):
        assert command in out.stdout, command
    bad = subprocess.run([sys.executable, "-m", "k25jax", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no-such-command" in bad.stderr
