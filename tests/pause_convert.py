"""Run ``k25jax convert`` so that it stops at a known point, for the crash-safety test to kill it there.

``python tests/pause_convert.py N convert SRC DST --quiet``: the converter journals after every unit (instead of
every :data:`convert.to_orbax.COMMIT_BYTES`), and once ``N`` tensor groups are journaled the committer thread
prints ``paused after N tensor groups`` on stderr and sleeps, while the reader and writer threads go on. The
converter itself has no pause hook: this wrapper swaps in a committer before calling the CLI.
"""

import sys
import time

import convert.to_orbax as to_orbax
from k25jax.cli import main


class PausingCommitter(to_orbax.Committer):
    """The converter's committer; after ``pause_after`` journaled keys it reports and stops committing."""

    def __init__(self, commit, pause_after: int):
        def commit_then_pause(keys, files):
            commit(keys, files)
            self.journaled += len(keys)
            if self.journaled >= pause_after:
                print(f"paused after {self.journaled} tensor groups", file=sys.stderr, flush=True)
                time.sleep(3600)

        super().__init__(commit_then_pause)
        self.journaled = 0


if __name__ == "__main__":
    pause_after = int(sys.argv[1])
    to_orbax.COMMIT_BYTES = 1  # every retired unit is committed at once: each commit journals at most one key
    to_orbax.Committer = lambda commit: PausingCommitter(commit, pause_after)
    sys.exit(main(sys.argv[2:]))
