"""Fields every config shares, and the `arg` switches of `--config=FILE:ARG`.

ARG is a comma-separated list of:
  vanilla   AGS and SAD off (the paper's vanilla BNN baseline).
  ags       AGS only.   sad   SAD only.   ovsw   both (the default).
  runlocal  a seconds-long smoke run: tiny model, a few steps, small batches.
Any field can also be overridden on the command line: `--config.ovsw.delta=0.02`.
"""

from __future__ import annotations

import ml_collections

ARMS = ("vanilla", "ags", "sad", "ovsw")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all settings; each config file overrides what its recipe says."""
  c = ml_collections.ConfigDict()
  # What is trained (ovsw_jax/trainer/tasks): batches, model outputs, loss and metrics.
  c.task = "image_classification"
  # Data (see ovsw_jax/trainer/input_pipeline.py).
  c.dataset = "digits"
  c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir.
  c.tfds_name = ml_collections.config_dict.placeholder(str)  # default: per dataset.
  c.image_size = 224           # ImageNet crop size.
  c.imagenet_lighting = "alexnet"  # ImageNet PCA lighting: "alexnet", "release" or "none".
  c.imagenet_decoder = "tf"    # ImageNet: "tf" (crop-window decode) or "pil" (the release's).
  c.augment = True
  # ImageNet's data workers (processes; 0: this process) and TensorFlow decode threads per
  # worker (None: one worker a CPU, at most one per 2 GiB of free memory, the threads sharing
  # the CPUs), and records of a batch read at once (None: 64 from an object store such as
  # gs://, 1 from a local disk).
  c.data_workers = ml_collections.config_dict.placeholder(int)
  c.decode_threads = ml_collections.config_dict.placeholder(int)
  c.read_threads = ml_collections.config_dict.placeholder(int)
  c.prefetch = 2               # batches prepared ahead of the train step.
  # Model (see ovsw_jax/models).
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict()
  c.half_precision = False     # bfloat16 compute, float32 params.
  # Precision of float32 matmuls and convolutions (jax.default_matmul_precision),
  # applied around the whole run and logged: "highest" is float32; "high" and
  # "default" are faster passes (TF32 on Ampere-or-newer GPUs; bf16_3x / bf16 on
  # TPUs), which jax uses there unless told. bfloat16 compute (half_precision)
  # does not depend on it, and on CPUs float32 is exact whatever it says.
  c.matmul_precision = "highest"
  # Recipe (docs/method.md §7).
  c.seed = 0
  c.batch_size = 256           # global, over all devices and hosts: a multiple of their count.
  # Global; rounded up to a multiple of the device count where it is not one
  # (logged; the padding is masked, so each test example still counts once).
  c.eval_batch_size = 256
  c.num_epochs = 600           # > 0.
  c.num_train_steps = -1       # -1: num_epochs long; > 0: this many steps.
  c.warmup_epochs = 5
  c.learning_rate = 0.1
  c.lr_schedule = "epoch_cosine"
  c.end_learning_rate = 1e-5   # step_cosine's floor (epoch_cosine adds 1e-5, as the release).
  c.optimizer = "sgd"          # "sgd", "adam" or "adamw".
  c.momentum = 0.9
  c.nesterov = False
  c.adamw_decay = 1e-4         # adamw's decoupled decay (`weight_decay` is the L2 form).
  c.weight_decay = 5e-4
  c.wd_exclude_1d = False      # True: no weight decay on BatchNorm, biases, PReLU.
  c.label_smoothing = 0.0
  # OvSW (docs/method.md §2-4).
  c.ovsw = ml_collections.ConfigDict()
  c.ovsw.ags = True
  c.ovsw.sad = True
  c.ovsw.delta = 0.01
  c.ovsw.dampen_weight = 2e-5
  c.ovsw.track_momentum = 0.999
  c.ovsw.track_threshold = 1e-4
  c.ovsw.toward = "zero"       # SAD's pull: 'zero' (the release) or 'boundary' (method.md §10).
  # Instruments (ovsw_jax/metrics.py): also count level reversals, Nagel et al.'s
  # oscillations (`train_step_oscillation_ratio`); adds 0.25 bytes per binary weight.
  c.track_oscillation = False
  # Loop.
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.distributed_init = False   # call jax.distributed.initialize() (multi-host).
  # How the step runs on every device (ovsw_jax/trainer/parallel.py): "pmap", or "jit"
  # (jax.jit of shard_map over a mesh of all devices). Same state either way.
  c.parallelism = "pmap"
  return c


def split_kernel_word(arg: str | None, kernels) -> tuple[str | None, list[str]]:
  """A config's `:ARG` split into its kernel word (the last of `kernels` given; None if
  none) and the other words (the arms' and `runlocal`, for `apply_arg`).

  Raises:
    ValueError: a word that is neither, naming every word the config takes.
  """
  words = [w for w in (arg or "").split(",") if w]
  allowed = tuple(kernels) + ARMS + ("runlocal",)
  for word in words:
    if word not in allowed:
      raise ValueError(f"Unknown config arg {word!r}: use any of {allowed}, comma-separated.")
  chosen = [w for w in words if w in kernels]
  return (chosen[-1] if chosen else None), [w for w in words if w not in kernels]


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the `:ARG` switches (see module docstring)."""
  for word in filter(None, (arg or "").split(",")):
    if word == "vanilla":
      c.ovsw.ags, c.ovsw.sad = False, False
    elif word == "ags":
      c.ovsw.ags, c.ovsw.sad = True, False
    elif word == "sad":
      c.ovsw.ags, c.ovsw.sad = False, True
    elif word == "ovsw":
      c.ovsw.ags, c.ovsw.sad = True, True
    elif word == "runlocal":
      c.num_train_steps = 4
      c.batch_size = c.eval_batch_size = 8
      c.log_every_steps = 2
      c.checkpoint_every_steps = 2
      c.model = "tiny_imagenet" if c.dataset == "imagenet2012" else "tiny"
      c.model_kwargs = ml_collections.ConfigDict()
      if c.dataset == "imagenet2012":
        c.image_size = 64
    else:
      raise ValueError(f"Unknown config arg {word!r}: use any of "
                       f"{ARMS + ('runlocal',)}, comma-separated.")
  return c


def cifar_recipe(dataset: str, model: str) -> ml_collections.ConfigDict:
  """The release's CIFAR recipe: 600 epochs, batch 256, lr 0.1 cosine with 5
  warm-up epochs, weight decay 5e-4 on all parameters, delta 0.04, gamma 9e-4."""
  c = base_config()
  c.dataset = dataset
  c.model = model
  c.batch_size = 256
  c.eval_batch_size = 500
  c.num_epochs = 600
  c.warmup_epochs = 5
  c.learning_rate = 0.1
  c.lr_schedule = "epoch_cosine"
  c.weight_decay = 5e-4
  c.wd_exclude_1d = False
  c.matmul_precision = "highest"  # float32 matmuls and convolutions on every device.
  c.ovsw.delta = 0.04
  c.ovsw.dampen_weight = 9e-4
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  return c


def imagenet_recipe(model: str, warmup_epochs: int) -> ml_collections.ConfigDict:
  """The release's ImageNet recipe: 200 epochs, batch 512, lr 0.1 cosine, weight
  decay 1e-4 except on 1-D parameters, delta 0.01, gamma 2e-5."""
  c = base_config()
  c.dataset = "imagenet2012"
  c.model = model
  c.image_size = 224
  c.batch_size = 512
  c.eval_batch_size = 500
  c.num_epochs = 200
  c.warmup_epochs = warmup_epochs
  c.learning_rate = 0.1
  c.lr_schedule = "epoch_cosine"
  c.weight_decay = 1e-4
  c.wd_exclude_1d = True
  c.ovsw.delta = 0.01
  c.ovsw.dampen_weight = 2e-5
  c.half_precision = True  # the release trains under fp16 autocast; bf16 here.
  c.matmul_precision = "highest"  # what stays float32 (e.g. half_precision=False) is float32.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
