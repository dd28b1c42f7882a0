"""`python -m ovsw_jax.main`: the trainer's command line, kept at this name.

The trainer lives in `ovsw_jax.trainer` (its flags and docs in
`ovsw_jax.trainer.main`); this module only starts it.
"""

from ovsw_jax.trainer.main import run

if __name__ == "__main__":
  run()
