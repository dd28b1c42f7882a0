"""The trainer with one transient checkpoint read error: `python tests/flaky_restore.py ARGS`.

Runs `ovsw_jax.main` in this process (no supervising parent) with the first
`checkpointing.restore` call raising OSError, as a brief NFS or GCS failure
would (with `FLAKY_RESTORE_FAILURES=N`, the first N reads of that step); the
tests start one process of a run this way.

Everything happens under `__main__`: pytest imports this file when it collects
doctests, and the patch must never reach the test process.
"""

import os


def _patch_restore(checkpointing) -> None:
  original = checkpointing.restore
  failures = int(os.environ.get("FLAKY_RESTORE_FAILURES", "1"))
  failed = []

  def restore_failing(manager, step, target):
    if len(failed) < failures and (not failed or failed[0] == step):
      failed.append(step)
      raise OSError(f"injected transient read error at step {step}")
    return original(manager, step, target)
  checkpointing.restore = restore_failing


if __name__ == "__main__":
  from absl import app

  from ovsw_jax.trainer import checkpointing, supervisor
  os.environ[supervisor.CHILD_ENV] = "1"  # train here: the patch below lives in this process
  from ovsw_jax.trainer import main  # (defines the flags)
  _patch_restore(checkpointing)
  app.run(main.main)
