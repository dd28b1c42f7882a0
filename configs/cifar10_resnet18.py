"""OvSW, ResNet-18 (11.2M params), CIFAR-10: the release's CIFAR recipe (docs/method.md §7).

Launch (one host, all its GPUs; data prepared with tfds, see README):
  python -m ovsw_jax.main --config=configs/cifar10_resnet18.py --workdir=runs/cifar10_resnet18 \
      --config.data_dir=$TFDS_DATA_DIR
Vanilla BNN baseline: --config=configs/cifar10_resnet18.py:vanilla
Hardware assumed: one GPU with >= 16 GB (the release: one GPU, batch 256, fp16).
Expected top-1: the paper's CIFAR-10 table for OvSW ResNet-18 (ECCV 2024, Table on CIFAR-10);
not yet reproduced with this code (see README results table).

delta and dampen_weight are the release's CIFAR-10 ResNet-20 values (0.04 / 9e-4);
the release gives none for this setting, so using them here is an extrapolation.
"""

from configs import common


def get_config(arg=None):
  return common.apply_arg(common.cifar_recipe("cifar10", "resnet18_cifar"), arg)
