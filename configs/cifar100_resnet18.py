"""OvSW, ResNet-18 (11.2M params), CIFAR-100: the release's CIFAR recipe (docs/method.md §7).

Launch (one host, all its GPUs; data prepared with tfds, see README):
  python -m ovsw_jax.main --config=configs/cifar100_resnet18.py --workdir=runs/cifar100_resnet18 \
      --config.data_dir=$TFDS_DATA_DIR
Vanilla BNN baseline: --config=configs/cifar100_resnet18.py:vanilla
Hardware assumed: one GPU with >= 16 GB (the release: one GPU, batch 256, fp16).
Expected top-1: none is claimed here (neither the paper nor the release gives a CIFAR-100 figure);
fill in the README results table when run.

delta and dampen_weight are the release's CIFAR-10 ResNet-20 values (0.04 / 9e-4);
the release gives none for this setting, so using them here is an extrapolation.
"""

from configs import common


def get_config(arg=None):
  return common.apply_arg(common.cifar_recipe("cifar100", "resnet18_cifar"), arg)
