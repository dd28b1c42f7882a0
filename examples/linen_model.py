"""OvSW on a flax.linen binary CNN: ovsw_jax.BinaryConv and the default mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import ovsw_jax as ow


class BinaryCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(16, (3, 3))(x)  # full precision
    h = ow.BinaryConv(16, (3, 3))(h)  # 1-bit weights and activations
    h = ow.BinaryConv(16, (3, 3))(h)
    return nn.Dense(2)(h.mean(axis=(1, 2)))


def main(steps=150):
  x = jax.random.normal(jax.random.key(1), (128, 8, 8, 1))
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)
  model = BinaryCNN()
  params = model.init(jax.random.key(0), x)["params"]
  # The default mask (ow.binary_weight_mask) picks the BinaryConv kernels.
  tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4), optax.adam(1e-2))
  state = tx.init(params)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  return params, state, losses


if __name__ == "__main__":
  main()
