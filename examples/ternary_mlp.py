"""A ternary-weight MLP with OvSW on scikit-learn's breast-cancer data (flax.linen)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer

import ovsw_jax as ow


class TernaryMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(ow.QuantDense(64, kernel_quantizer="ternary")(x))  # BitNet b1.58 weights
    h = nn.relu(ow.QuantDense(64, kernel_quantizer="ternary")(h))
    return nn.Dense(2)(h)  # full-precision head


def main(steps=300):
  x, y = load_breast_cancer(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  test = np.arange(len(y)) % 5 == 0  # every fifth example held out
  xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
  model = TernaryMLP()
  params = model.init(jax.random.key(0), xtr[:1])["params"]
  # Tell OvSW each kernel's quantizer: a flip is a change of ternary level, not of sign.
  levels = ow.kernel_quantizers(model, xtr[:1])
  tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4, levels=levels), optax.adam(3e-3))
  state = tx.init(params)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, xtr), ytr).mean()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  accuracy = float(jnp.mean(model.apply({"params": params}, xte).argmax(-1) == yte))
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {accuracy:.3f}")
  return params, state, losses, accuracy


if __name__ == "__main__":
  main()
