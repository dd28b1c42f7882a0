"""Training and evaluation: a pure data-parallel train step, orbax checkpoints, clu metrics.

The shape follows flax's `examples/imagenet`: `create_train_state`, a pure
`train_step(state, batch, ...)` that knows of parallelism only its
`axis_name`, `eval_step`, and `train_and_evaluate(config, workdir)`, which
resumes automatically from the newest checkpoint in `workdir`. The step runs
on every device under `jax.pmap` or `jax.jit` (`config.parallelism`, see
`ovsw_jax.trainer.parallel`).

Nothing here knows the task: batches, model, loss, metrics and the
evaluation's sums come from `config.task`'s `tasks.Task`; the step, the
loop, checkpoints, resume, the config record, preemption and logging are the
same for all tasks.
"""


import contextlib
import functools
import logging
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from clu import metrics as clu_metrics, parameter_overview, periodic_actions

from ovsw_jax import layers, metrics, quantizers
from ovsw_jax.trainer import checkpointing, config_checks, parallel, preemption, run_log, tasks
from ovsw_jax.trainer import workdir as workdir_lib
from ovsw_jax.optim import binary_weight_mask
from ovsw_jax.trainer.optimizer import create_learning_rate_fn, create_optimizer

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bitwise: all of it is checkpointed.

  `rng` is a raw uint32 key (`jax.random.key_data`), kept for stochastic parts
  of future models; data order and augmentation are keyed by (seed, step).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  flips: metrics.FlipState
  rng: jax.Array


def train_metric_names(task: tasks.Task, oscillation: bool = False) -> tuple[str, ...]:
  """The per-step metrics averaged between two train-log writes (`train_<name>`).

  `oscillation`: the run tracks oscillations (`config.track_oscillation`).
  """
  return ("loss", *task.metric_names, "step_flip_ratio",
          *(("step_oscillation_ratio",) if oscillation else ()))


def train_metrics_collection(task: tasks.Task,
                             oscillation: bool = False) -> type[clu_metrics.Collection]:
  """A clu `Collection` averaging `train_metric_names(task)` over the steps it is fed."""
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name)
         for name in train_metric_names(task, oscillation)})


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss becomes NaN or Inf."""


def model_levels(model: nn.Module, inputs: Any) -> dict[str, Any] | None:
  """The quantizer of each of `model`'s quantized kernels (`layers.kernel_quantizers`).

  None when every one is a sign (binary kernels): OvSW's and the metrics' own
  default, the release's arithmetic exactly. Otherwise the `levels=` the
  trainer gives SAD and the flip metrics, so a ternary or k-bit kernel is
  tracked by its level, never silently by its sign.
  """
  found = layers.kernel_quantizers(model, inputs, train=False)
  if all(isinstance(q, quantizers.Sign) for q in found.values()):
    return None
  return found


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       inputs: jax.Array, levels: Any = None,
                       oscillation: bool = False) -> TrainState:
  """Initialises params, batch stats, optimizer and flip history (pure).

  `inputs` is one batch as the model takes it (`Task.init_inputs`); `levels`
  the kernels' quantizers (`model_levels`; None: signs); `oscillation`: the
  flip history tracks level reversals too (`metrics.oscillation_step`).
  """
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, inputs, train=False)
  params = variables["params"]
  mask = binary_weight_mask(params)
  return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      flips=metrics.init_flip_state(params, mask, levels, oscillation),
      rng=jax.random.key_data(state_rng))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, task: tasks.Task,
               model: nn.Module, tx: optax.GradientTransformation,
               learning_rate_fn: optax.Schedule, axis_name: str | None = AXIS,
               levels: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step (pure). Gradients and metrics are averaged over `axis_name`.

  The model is applied to `task.inputs(batch)` and `task.train_loss` is
  differentiated (`tasks.Task`); BatchNorm statistics are averaged by the
  model itself (its `bn_axis_name`). Returns the new state and this step's
  metrics (means over the global batch): the loss, the task's metrics, the
  fraction of binary weights that flipped (changed level, with `levels`), the
  fraction that oscillated (where the flip history tracks it), and OvSW's
  measurements read from the optimizer state.
  """
  def loss_fn(params):
    outputs, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        task.inputs(batch), train=True, mutable=["batch_stats"])
    return task.train_loss(outputs, batch), (outputs, new_vars.get("batch_stats", {}))

  (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  mask = binary_weight_mask(params)
  # The flip metrics read the old parameters through a barrier (an identity): without
  # it XLA merges their level computations with SAD's identical ones, and the merged
  # program ran 17-25% slower on CPU (docs/performance.md section 4).
  old_params = jax.lax.optimization_barrier(state.params)
  step_metrics = {
      "loss": loss,
      **task.train_metrics(outputs, batch),
      "step_flip_ratio": metrics.step_flip_fraction(old_params, params, mask, levels),
  }
  flips = state.flips
  if flips.last_change is not None:
    flips, step_metrics["step_oscillation_ratio"] = metrics.oscillation_step(
        flips, old_params, params, mask, levels)
  if axis_name is not None:
    step_metrics = jax.lax.pmean(step_metrics, axis_name)
  step_metrics["learning_rate"] = learning_rate_fn(state.step)
  for key, value in metrics.ovsw_fractions(opt_state, params, mask).items():
    if "/" not in key:
      step_metrics[key] = value
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      flips=metrics.update_flip_state(flips, params, mask, levels))
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, task: tasks.Task,
              model: nn.Module, axis_name: str | None = AXIS) -> dict[str, jax.Array]:
  """`task.eval_sums` (loss, metrics and count over the real examples), summed over devices."""
  outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                        task.inputs(batch), train=False)
  sums = task.eval_sums(outputs, batch)
  return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


@contextlib.contextmanager
def _closed_after(iterator):
  """Closes a task's batch iterator however the block ends, so its data workers stop."""
  try:
    yield iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def evaluate(p_eval_step: Callable, state: TrainState, task: tasks.Task,
             global_batch_size: int, scheme: parallel.Pmap | parallel.Jit,
             stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
  """One exact pass over the task's evaluation split (no example dropped or counted twice).

  `p_eval_step` is `eval_step` compiled by `scheme`, `state` replicated by it.
  Returns `eval_<name>`: each sum over the count (or its own,
  `task.eval_denominators`), and `eval_count` (and those counts). `stop`
  (`Preemption.should_stop`) is asked before every batch; when it says stop,
  the pass ends there and None is returned instead of partial figures.
  """
  totals = None
  batches = task.eval_batches(global_batch_size=global_batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  with _closed_after(batches):
    for batch in batches:
      if stop is not None and stop():
        return None
      sums = scheme.unreplicate(p_eval_step(state, scheme.shard(batch)))
      sums = jax.tree.map(np.asarray, sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  denominators = {"loss": "count", **task.eval_denominators}
  counts = {"count", *denominators.values()}
  names = ["loss"] + [k for k in totals if k != "loss" and k not in counts]
  return {**{f"eval_{k}": float(totals[k]) / max(float(totals[denominators.get(k, "count")]),
                                                 1.0) for k in names},
          **{f"eval_{k}": float(totals[k]) for k in sorted(counts)}}


def instruments(state: TrainState, levels: Any = None) -> dict[str, float]:
  """The paper's instruments, overall and per binary layer, from the train state."""
  mask = binary_weight_mask(state.params)
  out = {}
  out.update(metrics.silent_ratio(state.flips, state.params, mask))
  out.update(metrics.flip_ratio(state.flips, state.params, mask, levels))
  out.update(metrics.ovsw_fractions(state.opt_state, state.params, mask))
  return {k: float(v) for k, v in out.items()}


def check_config(config: ml_collections.ConfigDict) -> config_checks.Layout:
  """Every value of `config` and its batch layout on this run's devices (`config_checks`).

  Logs, once, the evaluation batch where it was rounded up to fit the devices.
  """
  tasks.task_class(config.get("task", tasks.DEFAULT))  # a task that exists, before the rest
  layout = config_checks.check(config, jax.device_count(), jax.process_count())
  if layout.eval_rounded:
    logging.info(
        "Evaluation batch: config.eval_batch_size=%d rounded up to %d, a multiple of the "
        "%d devices; the padded rows are masked, so each example is counted once.",
        config.eval_batch_size, layout.eval_batch_size, layout.devices)
  return layout


class Setup(NamedTuple):
  """What a run of a config is built from, before any checkpoint is read."""
  task: tasks.Task
  steps_per_epoch: int
  learning_rate_fn: optax.Schedule
  model: nn.Module
  tx: optax.GradientTransformation
  initial_state: TrainState
  levels: Any = None  # the kernels' quantizers (`model_levels`); None: all signs


def setup(config: ml_collections.ConfigDict, task: tasks.Task | None = None) -> Setup:
  """The task, schedule, model, optimizer and initial state of `config`'s run.

  Tools that rebuild a run (the reproduction study's weight snapshots) call this
  too, so their initial state is the one training started from. `task`: the
  config's task, where the caller built it already.
  """
  task = task if task is not None else tasks.create(config)
  steps_per_epoch = max(task.num_train // config.batch_size, 1)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  model = task.create_model(AXIS)
  levels = model_levels(model, task.init_inputs())
  tx = create_optimizer(config, learning_rate_fn, levels=levels)
  state = create_train_state(jax.random.key(config.seed), model, tx, task.init_inputs(), levels,
                             oscillation=bool(config.get("track_oscillation", False)))
  return Setup(task, steps_per_epoch, learning_rate_fn, model, tx, state, levels)




class NonFiniteStateError(NonFiniteLossError):
  """Raised instead of checkpointing a state with NaN or Inf in it."""


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of a host tree that hold a NaN or an Inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
      bad.append(jax.tree_util.keystr(path))
  return bad


def _check_finite(host_state: TrainState, step: int, last_saved: int | None) -> None:
  bad = nonfinite_leaves(host_state)
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    last = (f"the last finite checkpoint is step {last_saved}; it resumes from there"
            if last_saved is not None else "no checkpoint was written yet")
    raise NonFiniteStateError(
        f"Training diverged: at step {step} the state holds NaN/Inf in {len(bad)} tensors "
        f"({shown}). Nothing was saved at step {step}; {last}. Lower --config.learning_rate "
        "(or check the data) and start the same command again.")


class _Loop(NamedTuple):
  """The compiled, per-device functions of a run and the scheme that runs them."""
  train: Callable
  eval: Callable
  start_interval: Callable
  scheme: parallel.Pmap | parallel.Jit


def _compile(run: Setup, config: ml_collections.ConfigDict, donate: bool) -> _Loop:
  """Train / eval / interval steps on every device, as `config.parallelism` says.

  The state is replicated on every device (under pmap with a leading device
  axis), so donating it lets every device reuse its own state buffers for
  the new state.
  """
  scheme = parallel.create(config.get("parallelism", "pmap"), AXIS)
  mask = binary_weight_mask(run.initial_state.params)
  step = functools.partial(train_step, task=run.task, model=run.model, tx=run.tx,
                           learning_rate_fn=run.learning_rate_fn, axis_name=AXIS,
                           levels=run.levels)
  evaluate_ = functools.partial(eval_step, task=run.task, model=run.model, axis_name=AXIS)

  def start(state):
    return state.replace(flips=metrics.start_interval(state.flips, state.params, mask,
                                                      run.levels))
  return _Loop(
      train=scheme.compile(step, donate=donate),
      eval=scheme.compile(evaluate_),
      start_interval=scheme.compile(start, batches=0),
      scheme=scheme)


def _num_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.get("num_train_steps", -1) > 0:
    return int(config.num_train_steps)
  steps = int(config.num_epochs * steps_per_epoch)
  if steps < 1:  # a fraction of an epoch shorter than one step would train nothing
    raise config_checks.ConfigError(
        f"config.num_epochs={config.num_epochs!r} is less than one step ({steps_per_epoch} "
        "steps per epoch): set a longer --config.num_epochs=E, or --config.num_train_steps=N.")
  return steps


@contextlib.contextmanager
def _run_lock(workdir: str):
  """The workdir lock, taken by process 0; every process learns whether it got it."""
  with contextlib.ExitStack() as stack:
    error = None
    try:
      stack.enter_context(workdir_lib.lock(workdir, take=jax.process_index() == 0))
    except workdir_lib.WorkdirLockedError as e:
      error = e
    if jax.process_count() > 1:
      got = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not got and error is None:
        error = workdir_lib.WorkdirLockedError(
            f"Process 0 found {workdir} in use by another run (its log says by whom).")
    if error is not None:
      raise error
    yield


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       donate: bool = True, allow_config_change: bool = False
                       ) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics.

  Every process of a multi-process run calls this with the same arguments.
  Raises `preemption.Preempted` after checkpointing when asked to stop
  (a stop signal to any process, see `preemption`); `NonFiniteLossError` instead of saving a
  diverged state; `workdir.WorkdirLockedError` when another run trains in
  `workdir`; `workdir.ConfigMismatchError` when `config` would change what the
  workdir's checkpoints mean (unless `allow_config_change`);
  `checkpointing.CheckpointMismatchError` for a checkpoint of another state;
  `config_checks.ConfigError` (a `ValueError`), before anything is built, for
  a value or a batch layout no run can use.
  `donate` lets each step reuse the previous state's device memory (what an
  accelerator needs for large models).
  """
  layout = check_config(config)
  # Float32 matmuls and convolutions at the config's precision (TPUs and recent GPUs
  # default to bf16 passes or TF32); it holds while every step is traced and run.
  precision = config.get("matmul_precision", "highest")
  logging.info("Matmul precision: %s (config.matmul_precision).", precision)
  with _run_lock(workdir), jax.default_matmul_precision(precision):
    return _train(config, workdir, donate=donate, allow_config_change=allow_config_change,
                  eval_batch_size=layout.eval_batch_size)


def _train(config: ml_collections.ConfigDict, workdir: str, *, donate: bool,
           allow_config_change: bool, eval_batch_size: int) -> dict[str, float]:
  task = tasks.create(config)
  try:
    return _train_task(task, config, workdir, donate=donate,
                       allow_config_change=allow_config_change, eval_batch_size=eval_batch_size)
  finally:
    task.close()  # what it keeps between evaluations (data workers), however the run ends


def _train_task(task: tasks.Task, config: ml_collections.ConfigDict, workdir: str, *,
                donate: bool, allow_config_change: bool,
                eval_batch_size: int) -> dict[str, float]:
  # The config is compared with the workdir's record before anything is built:
  # a mismatch stops at once (building the model and state took 15 s here).
  manager = checkpointing.create_manager(f"{workdir}/checkpoints",
                                         max_to_keep=config.keep_checkpoints)
  data = task.data_record()
  workdir_lib.check_config(workdir, config, has_checkpoint=bool(manager.all_steps()),
                           allow_change=allow_config_change, write=jax.process_index() == 0,
                           checkpoint_config=lambda: checkpointing.saved_config(manager),
                           data=data)
  record = workdir_lib.config_record(config, data)  # saved in every checkpoint
  run = setup(config, task)
  num_steps = _num_steps(config, run.steps_per_epoch)
  state = checkpointing.restore_latest(manager, run.initial_state)
  if state is not None:
    logging.info("Resumed from step %d.", int(state.step))
  else:
    state = run.initial_state
  start_step = int(state.step)
  last_saved = start_step if start_step > 0 else None

  writer = run_log.create_writer(workdir, num_steps=num_steps, start_step=start_step,
                                 is_main=jax.process_index() == 0)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
    if jax.process_index() == 0:
      parameter_overview.log_parameter_overview(state.params)

  loop = _compile(run, config, donate)
  scheme = loop.scheme
  rstate = scheme.replicate(state)
  del state

  def host_state():
    return jax.device_get(scheme.unreplicate(rstate))

  def save(step, force=False):
    nonlocal last_saved
    host = host_state()
    _check_finite(host, step, last_saved)
    checkpointing.save(manager, step, host, force=force, config=record)
    last_saved = step

  def evaluate_now(stop):
    summary = evaluate(loop.eval, rstate, run.task, eval_batch_size, scheme, stop)
    if summary is not None:  # None: stopped on request midway
      summary.update(instruments(host_state(), run.levels))
    return summary

  train_iter = run.task.train_batches(
      global_batch_size=config.batch_size, start_step=start_step, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  oscillation = run.initial_state.flips.last_change is not None
  train_metrics_type = train_metrics_collection(run.task, oscillation)
  metric_names = train_metric_names(run.task, oscillation)
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps,
                                                 writer=writer.tensorboard))

  log_every = max(int(config.log_every_steps), 1)
  eval_every = max(int(config.eval_every_epochs * run.steps_per_epoch), 1)
  ckpt_every = max(int(config.checkpoint_every_steps), 1)
  train_metrics = None
  final = {}
  previous = None  # (step, metrics) of the step dispatched before the current one
  in_flight = steps_in_flight()
  logging.info("Training %d steps (%d per epoch) from step %d.", num_steps,
               run.steps_per_epoch, start_step)
  with preemption.Preemption() as preempt, _closed_after(train_iter):
    for step in range(start_step, num_steps):
      batch = scheme.shard(next(train_iter))
      rstate, step_metrics = loop.train(rstate, batch)
      # Not kept past the step: on the CPU backend the batch's device arrays may share
      # the data workers' shared memory, which a stop would then hold until exit.
      del batch
      step_metrics = scheme.unreplicate(step_metrics)
      done = step + 1
      # Bounded steps in flight: reading a step's loss blocks until it is done,
      # and every loss is checked. See `steps_in_flight`.
      if in_flight == 1:
        _check_loss(done, step_metrics)
      elif previous is not None:
        _check_loss(*previous)
      previous = (done, step_metrics)
      update = train_metrics_type.single_from_model_output(
          **{k: step_metrics[k] for k in metric_names})
      train_metrics = update if train_metrics is None else train_metrics.merge(update)
      for hook in hooks:
        hook(done)
      stop = preempt.should_stop()
      last = done == num_steps
      if done % log_every == 0 or last:
        summary = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
        summary["learning_rate"] = float(step_metrics["learning_rate"])
        for key in ("silent_fraction", "scaled_fraction"):
          if key in step_metrics:
            summary[key] = float(step_metrics[key])
        writer.write_scalars(done, summary)
        train_metrics = None
      if (done % eval_every == 0 or last) and not stop:
        _check_loss(*previous)
        summary = evaluate_now(preempt.should_stop)
        stop = summary is None
        if not stop:
          summary["epoch"] = done / run.steps_per_epoch
          writer.write_scalars(done, summary)
          final = summary
          rstate = loop.start_interval(rstate)
      if done % ckpt_every == 0 or last or stop:
        _check_loss(*previous)
        save(done, force=stop)
      if stop:
        checkpointing.wait(manager)
        writer.flush()
        raise preemption.Preempted(done, preemption.requested_by())
    if start_step >= num_steps:  # already trained: report the final state again
      logging.info("The workdir's checkpoint is at step %d of %d: evaluating only.",
                   start_step, num_steps)
      final = evaluate_now(preempt.should_stop)
      if final is None:
        raise preemption.Preempted(start_step, preemption.requested_by())
  checkpointing.wait(manager)
  writer.close()
  return final


def steps_in_flight() -> int:
  """How many train steps may be dispatched before the loop waits for one.

  On CPU, 1: XLA's CPU devices run their collectives on host threads, and
  with a second step queued, two processes of 2 devices each deadlocked in
  about 1 of 15 runs here (with 16 queued, 1 of 2), in none of 10 with 1. Elsewhere
  2, so that the host prepares the next step while the accelerator computes.
  """
  return 1 if jax.default_backend() == "cpu" else 2


def _check_loss(step: int, step_metrics: dict[str, jax.Array]) -> None:
  loss = float(step_metrics["loss"])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"Loss became {loss} at step {step}; nothing of that step was saved. Lower "
        "--config.learning_rate (or check the data) and start the same command again: "
        "it resumes from the last checkpoint.")
