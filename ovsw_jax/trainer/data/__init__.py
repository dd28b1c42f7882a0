"""Internals of `ovsw_jax.trainer.input_pipeline`: data sources and image operations.

The public API (`get_info`, `train_iterator`, `eval_iterator`, `DatasetInfo`,
`DatasetNotPreparedError`) lives in `ovsw_jax.trainer.input_pipeline`; this package holds
the parts that are easier to read and test on their own:

* `augment`: pure NumPy/PIL image operations (pad-and-crop, flip, random
  resized crop, PCA lighting, resize and centre crop, normalisation). Every
  random choice is drawn from a `numpy.random.Generator` the caller passes in,
  so the pipeline can key it by (seed, step, position).
* `sources`: where the examples come from (scikit-learn's digits, CIFAR via
  tfds loaded into memory, ImageNet via a random-access tfds data source), and
  the error that says how to prepare a missing dataset.
"""
