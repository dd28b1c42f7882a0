"""A BitNet-style byte-level language model on the running Python's standard library, with OvSW.

Runs anywhere with no download (the corpus is this interpreter's own `Lib/*.py`):
  python -m ovsw_jax.main --config=configs/lm_stdlib.py --workdir=runs/lm
Arguments (`--config=configs/lm_stdlib.py:ARG`, comma-separated):
  ternary (default), binary, float   the linears' weights: b1.58 ternary, 1-bit
                                     (sign * mean|w|) or the float twin; binary
                                     and ternary linears take int8 per-token inputs.
  vanilla, ags, sad, ovsw (default)  as for every config (configs/common.py).
  runlocal                           a seconds-long smoke run.
Data (ovsw_jax/trainer/data/stdlib_text.py): bytes of the top-level `.py` files
(tests excluded), 1 file in 10 to validation and 1 in 10 to test by a hash of the
name; the corpus's SHA-256 and the Python version go into the run's config.json
and a resume on other data is refused.
Model (ovsw_jax/models/transformer.py): 2 pre-norm blocks, width 128, 4 heads,
context 64; embeddings and head in float.
Recipe: Adam, lr 2e-3 cosine to 1e-5 over 1,500 steps of 16 windows (no
warm-up), no weight decay (BitNet's small models train with large rates and
little decay). Evaluated once, at the end: exact validation and test bits per
byte. Hardware assumed: 2 CPU cores, about two and a half minutes.
OvSW: delta 0.04; SAD's gamma 9e-4 with tracker momentum 0.99 and threshold 1e-3,
the short-run setting of the digits default (a run here has 1,500 steps).
Expected (Python 3.11.7's corpus, docs/results.md section 7, 3 seeds): test bits
per byte about 2.445 ternary with OvSW (41.8% silent) and 2.452 vanilla (53.2%), a
difference within a run's noise (about 0.005 from the summation order alone); 1-bit
(`:binary`) 2.504 with OvSW (61.4%) and 2.529 vanilla (71.2%), better on every seed;
the float twin 2.365. In every arm about 80% of the level changes reverse the
previous one (oscillations).
"""

import ml_collections

from configs import common

KERNELS = {"ternary": "ternary", "binary": "scaled_sign", "float": None}


def get_config(arg=None):
  c = common.base_config()
  c.task = "language_model"
  c.dataset = "python_stdlib"
  c.corpus_dir = ml_collections.config_dict.placeholder(str)  # None: this Python's Lib.
  c.model = "transformer_lm"
  c.model_kwargs.width = 128
  c.model_kwargs.depth = 2
  c.model_kwargs.num_heads = 4
  c.model_kwargs.mlp_ratio = 4
  c.model_kwargs.context = 64
  c.model_kwargs.kernel_quantizer = "ternary"
  c.model_kwargs.input_quantizer = "int8"
  c.batch_size = 16
  c.eval_batch_size = 256
  c.num_epochs = 1
  c.num_train_steps = 1500
  c.warmup_epochs = 0
  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.lr_schedule = "step_cosine"
  c.end_learning_rate = 1e-5
  c.weight_decay = 0.0
  c.ovsw.delta = 0.04
  c.ovsw.dampen_weight = 9e-4
  c.ovsw.track_momentum = 0.99
  c.ovsw.track_threshold = 1e-3
  c.track_oscillation = True  # do silent weights turn into oscillating ones?
  c.log_every_steps = 100
  c.eval_every_epochs = 1000   # once, at the end (an exact pass reads ~0.9M tokens)
  c.checkpoint_every_steps = 500
  kernel, rest = common.split_kernel_word(arg, KERNELS)
  if kernel is not None:
    c.model_kwargs.kernel_quantizer = KERNELS[kernel]
    c.model_kwargs.input_quantizer = None if kernel == "float" else "int8"
  c = common.apply_arg(c, ",".join(w for w in rest if w != "runlocal"))
  if "runlocal" in rest:
    c.num_train_steps = 4
    c.batch_size = c.eval_batch_size = 8
    c.log_every_steps = c.checkpoint_every_steps = 2
    c.model_kwargs.width, c.model_kwargs.depth, c.model_kwargs.context = 32, 1, 16
  return c
