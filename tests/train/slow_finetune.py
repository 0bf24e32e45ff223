"""``k25jax finetune`` with every train step slowed to ``SLOW_STEP_SECONDS`` (test helper: a run that can be killed
mid-way). Usage: ``python tests/train/slow_finetune.py finetune --data ... --out ...``."""

import functools
import os
import sys
import time

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from k25jax.train import trainer  # noqa: E402

DELAY = float(os.environ.get("SLOW_STEP_SECONDS", "0.3"))
make = trainer.make_train_step


@functools.wraps(make)
def slow_make(*args, **kwargs):
    step = make(*args, **kwargs)

    def slow(*a):
        out = step(*a)
        jax.block_until_ready(out)
        time.sleep(DELAY)
        return out

    return slow


trainer.make_train_step = slow_make

from k25jax.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
