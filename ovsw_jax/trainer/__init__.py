"""The trainer behind `python -m ovsw_jax.main`: what turns a config into a trained workdir.

Task-agnostic parts (one module each): `train` (the pure train step and the
loop), `parallel` (pmap or jit over a mesh), `checkpointing` (orbax),
`workdir` (the config record, lock and file layer), `run_log` (metrics.jsonl
and TensorBoard), `multihost`, `preemption` and `supervisor` (several
processes, stop signals), `config_checks`, `optimizer` (schedule and Optax
chain from a config). What differs between tasks (batches, model, loss,
metrics) is a `tasks` module; image classification reads its batches from
`input_pipeline` and `data/`.

Importing `ovsw_jax` never imports this package: it needs the trainer's stack
(TensorFlow datasets, clu, orbax), installed by the `train` extra.
"""
