"""Multi-host start-up: ``jax.distributed.initialize`` when a command runs on several hosts.

Every host runs the same command; JAX then lists the devices of all hosts in ``jax.devices()`` and
``k25jax.sharding.make_mesh`` spans them. Several hosts are recognised by explicit flags (``--coordinator
HOST:PORT --num-processes N --process-id I``), by the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` variables, by ``--distributed`` (let JAX detect a Cloud TPU slice, SLURM or Open MPI job),
or by the launchers' own variables (SLURM, Open MPI, GKE TPU hosts, Multislice), checked before JAX starts.
"""

from __future__ import annotations

import argparse
import os

_ENV_HINTS = {  # variable -> how to read "more than one process" from it
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "TPU_PROCESS_ADDRESSES": lambda v: "," in v,
    "MEGASCALE_NUM_SLICES": lambda v: int(v) > 1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="number of hosts (default $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this host's index (default $JAX_PROCESS_ID)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="initialize multi-host JAX with auto-detection (Cloud TPU slices, SLURM, Open MPI)",
    )


def launch_settings(args: argparse.Namespace | None = None, environ=None) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments for this launch, or None for a single host.

    Explicit flags win over ``JAX_*`` variables; without either, a launcher's variables (or ``--distributed``)
    mean auto-detection (``{}``: JAX reads the cluster itself).
    """
    env = os.environ if environ is None else environ

    def pick(flag: str, var: str, kind=str):
        value = getattr(args, flag, None) if args is not None else None
        if value is None and env.get(var):
            value = kind(env[var])
        return value

    settings = {
        "coordinator_address": pick("coordinator", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": pick("num_processes", "JAX_NUM_PROCESSES", int),
        "process_id": pick("process_id", "JAX_PROCESS_ID", int),
    }
    given = {k: v for k, v in settings.items() if v is not None}
    if given:
        if settings["num_processes"] == 1:
            return None
        missing = [k for k, v in settings.items() if v is None]
        if missing and not _launcher(env):
            flags = {"coordinator_address": "--coordinator", "num_processes": "--num-processes"}
            names = ", ".join(flags.get(k, "--process-id") for k in missing)
            raise SystemExit(f"k25jax: multi-host launch needs {names} too (or the matching JAX_* variables)")
        return given
    if (args is not None and getattr(args, "distributed", False)) or _launcher(env):
        return {}
    return None


def _launcher(env) -> str | None:
    for var, several in _ENV_HINTS.items():
        try:
            if env.get(var) and several(env[var]):
                return var
        except ValueError:
            continue
    return None


def initialize(args: argparse.Namespace | None = None) -> bool:
    """Start multi-host JAX if this is a multi-host launch (must run before anything touches a JAX device).

    Returns whether it did. A CPU-only multi-process run (tests, laptops) uses gloo collectives.
    """
    settings = launch_settings(args)
    if settings is None:
        return False
    import jax

    # CPU devices of several processes (tests, laptops) talk through gloo; GPU and TPU use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


def is_main_process() -> bool:
    """Whether this is process 0 (the one that prints)."""
    import jax

    return jax.process_index() == 0
