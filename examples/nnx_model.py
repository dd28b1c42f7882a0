"""OvSW on a flax.nnx binary CNN: ovsw_jax.nnx.BinaryConv and nnx.Optimizer."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ovsw_jax as ow


class BinaryCNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, 16, (3, 3), rngs=rngs)  # full precision
    self.bin1 = ow.nnx.BinaryConv(16, 16, (3, 3), rngs=rngs)  # 1-bit
    self.bin2 = ow.nnx.BinaryConv(16, 16, (3, 3), rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    h = self.bin2(self.bin1(self.stem(x)))
    return self.head(h.mean(axis=(1, 2)))


def main(steps=150):
  x = jax.random.normal(jax.random.key(1), (128, 8, 8, 1))
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)
  model = BinaryCNN(nnx.Rngs(0))
  # The default mask finds the BinaryConv kernels (`latent_kernel`) in the nnx state.
  tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  return model, optimizer, losses


if __name__ == "__main__":
  main()
