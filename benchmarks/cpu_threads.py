"""CPU thread settings for the benchmarks, applied before jax is imported (XLA reads its flags at start-up).

``--threads N`` on the command line: 1 gives XLA one thread (``intra_op_parallelism_threads=1`` with Eigen threading
off; the benchmark gives torch the same with ``set_num_threads``); anything else leaves XLA's default (all cores).
"""

from __future__ import annotations

import os


def threads_from_argv(argv, default: int) -> int:
    """The ``--threads`` value in ``argv`` (``--threads N`` or ``--threads=N``), else ``default``; with 1, set XLA's
    flags for one thread (call before importing jax)."""
    threads = default
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif a.startswith("--threads="):
            threads = int(a.split("=", 1)[1])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    return threads


def run_environment(threads: int, load_before) -> dict:
    """What a result was measured under: the thread setting, torch's thread count, ``XLA_FLAGS`` and the load
    average before (``load_before``) and after the run."""
    import torch

    return {
        "threads": threads or "default",
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_before_after": [load_before, os.getloadavg()],
    }
