"""The paper's binary networks (docs/method.md §6), a quantized language model, a registry.

Every image model takes NHWC images, is called as `model.apply(variables, x,
train=..., mutable=...)`, has `num_classes`, `dtype` (compute dtype; params
stay float32, logits come back float32) and `bn_axis_name` (the pmap axis
over which BatchNorm averages batch statistics in training) fields.
`transformer_lm` (`transformer.py`) takes int tokens and returns a logit per
token over `num_classes` (its vocabulary), with the same fields.

    >>> from ovsw_jax.models import get_model
    >>> model = get_model("resnet20", num_classes=10)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from ovsw_jax.models.common import (BatchNorm, PReLU, ProjectionShortcut,
                                    avgpool_zeropad_shortcut, hardtanh)
from ovsw_jax.models.resnet_cifar import (BasicBlockCifar, BasicBlockCifar18,
                                          ResNetCifar, ResNetCifar18,
                                          resnet18_cifar, resnet20, tiny)
from ovsw_jax.models.resnet_imagenet import (BasicBlockImageNet, ResNetImageNet,
                                             resnet18, resnet34, tiny_imagenet)
from ovsw_jax.models.transformer import TransformerLM, transformer_lm
from ovsw_jax.models.vgg import VGGSmall, vgg_small

# name -> constructor taking `num_classes=` and any model field as keywords.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18_cifar": resnet18_cifar,
    "vgg_small": vgg_small,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "tiny": tiny,
    "tiny_imagenet": tiny_imagenet,
    "transformer_lm": transformer_lm,  # tokens, not images (tasks/language_model.py)
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The model called `name` (a key of `MODELS`) with `num_classes` logits.

  Extra keywords set module fields, e.g. `dtype=jnp.bfloat16`,
  `bn_axis_name='batch'`, or `widths=...` to override a preset.

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.
  """
  try:
    factory = MODELS[name]
  except KeyError:
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}.") from None
  return factory(num_classes=num_classes, **kwargs)


__all__ = [
    "BasicBlockCifar", "BasicBlockCifar18", "BasicBlockImageNet", "BatchNorm",
    "MODELS", "PReLU", "ProjectionShortcut", "ResNetCifar", "ResNetCifar18",
    "ResNetImageNet", "TransformerLM", "VGGSmall", "avgpool_zeropad_shortcut",
    "get_model",
    "hardtanh", "resnet18", "resnet18_cifar", "resnet20", "resnet34", "tiny",
    "tiny_imagenet", "transformer_lm", "vgg_small",
]
