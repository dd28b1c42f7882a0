"""The trainer with one transient checkpoint read error: `python tests/flaky_restore.py ARGS`.

Runs `ovsw_jax.main` in this process (no supervising parent) with the first
`checkpointing.restore` call raising OSError, as a brief NFS or GCS failure
would (with `FLAKY_RESTORE_FAILURES=N`, the first N reads of that step); the
tests start one process of a run this way.
"""

import os

from absl import app

from ovsw_jax import checkpointing, supervisor

os.environ[supervisor.CHILD_ENV] = "1"  # train here: the patch below lives in this process
from ovsw_jax import main  # noqa: E402  (defines the flags)

_original = checkpointing.restore
_FAILURES = int(os.environ.get("FLAKY_RESTORE_FAILURES", "1"))
_failed = []


def _restore_failing(manager, step, target):
  if len(_failed) < _FAILURES and (not _failed or _failed[0] == step):
    _failed.append(step)
    raise OSError(f"injected transient read error at step {step}")
  return _original(manager, step, target)


checkpointing.restore = _restore_failing

if __name__ == "__main__":
  app.run(main.main)
