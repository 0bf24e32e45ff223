"""Run the ``k25jax`` command line with ``--model tiny`` meaning the tiny config with expert width 64.

The tiny preset's expert width (32) is one INT4 group, which tensor parallelism cannot split; width 64 can. Used
by the sharded CLI tests as ``python tests/cli/variant_cli.py generate --mesh expert=4,tensor=2 ...``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (configs.py)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from k25jax import cli_generate  # noqa: E402
from k25jax.cli import main  # noqa: E402
from k25jax.config import RunConfig, tiny  # noqa: E402

from configs import text_variant  # noqa: E402


def load_variant(model: str, run=None):
    """What ``load_model_and_tokenizer`` returns for ``tiny``, with expert width 64 (built after multi-host start)."""
    import jax.numpy as jnp

    from k25jax import build_model
    from k25jax.tokenizer import Tokenizer

    return build_model(
        text_variant(tiny(), moe_intermediate_size=64), RunConfig(compute_dtype=jnp.float32)
    ), Tokenizer.tiny()


if __name__ == "__main__":
    # Only when run as the command: importing this module (test_sharded_cli does, for load_variant) must not
    # replace the loader for the rest of the test session.
    cli_generate.load_model_and_tokenizer = load_variant
    # Gloo (the CPU collectives of a multi-process run) logs connections from C++ threads on file descriptor 1:
    # send those to stderr and keep Python's stdout, the reply, on the original stdout.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(reply_fd, "w", buffering=1)
    sys.exit(main(sys.argv[1:]))
