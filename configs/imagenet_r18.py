"""OvSW, ResNet-18, ImageNet (imagenet2012): the release's recipe (docs/method.md §7).

Launch (prepare the data first: README, "ImageNet"):
  python -m ovsw_jax.main --config=configs/imagenet_r18.py --workdir=runs/imagenet_r18 \
      --config.data_dir=$TFDS_DATA_DIR
Multi-host: launch/gpu_multinode.sh or launch/tpu_pod.sh.
Vanilla BNN baseline: --config=configs/imagenet_r18.py:vanilla
Hardware assumed: 8 GPUs (global batch 512, 64 per GPU) or a TPU v3-8; 200 epochs.
Expected top-1: 61.6% (the paper's abstract, best epoch, fp16 autocast in the release).
"""

from configs import common


def get_config(arg=None):
  return common.apply_arg(common.imagenet_recipe("resnet18", warmup_epochs=5), arg)
