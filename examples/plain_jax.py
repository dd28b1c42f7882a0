"""OvSW on a plain-JAX binary CNN: a params dict, a custom mask, optax.adam."""
import jax
import jax.numpy as jnp
import optax

import ovsw_jax as ow


def init(key):
  shapes = {"stem": (3, 3, 1, 16), "bin1": (3, 3, 16, 16), "bin2": (3, 3, 16, 16), "head": (16, 2)}
  keys = jax.random.split(key, len(shapes))
  he = jax.nn.initializers.he_normal()  # std sqrt(2 / fan_in)
  return {name: he(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def forward(params, x):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, params["stem"], (1, 1), "SAME", dimension_numbers=dn)
  h = ow.xnor_conv(h, params["bin1"], padding=1)  # 1-bit weights and activations
  h = ow.xnor_conv(h, params["bin2"], padding=1)
  return h.mean(axis=(1, 2)) @ params["head"]


def main(steps=150):
  x = jax.random.normal(jax.random.key(1), (128, 8, 8, 1))
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)
  params = init(jax.random.key(0))
  # The binary kernels are not called `latent_kernel` here: say which they are.
  mask = lambda p: {k: k.startswith("bin") for k in p}
  tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4, mask=mask), optax.adam(1e-2))
  state = tx.init(params)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

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
