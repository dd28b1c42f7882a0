"""Initial latent weights and never-flipped masks of a finished run (for Fig. 1a/b).

The logged metrics hold only ratios; the histogram of the paper's Fig. 1 needs,
per binary weight, its latent value at initialisation and whether its sign
ever changed. Both come from the train state: the initial one is rebuilt
exactly as `train.train_and_evaluate` builds it (same config, same seed), the
flip history (`FlipState.ever_flipped`) is restored from the last checkpoint.
They are saved once, after training, to `weights.npz` in the workdir.
"""

from __future__ import annotations

import io
import json

import ml_collections
import numpy as np
from etils import epath

from ovsw_jax import bitpack, metrics
from ovsw_jax.trainer import checkpointing, train
from ovsw_jax.optim import binary_weight_mask
from ovsw_jax.trainer.workdir import CONFIG_FILE

WEIGHTS_FILE = "weights.npz"


def _initial_and_final(config: ml_collections.ConfigDict, workdir: str):
  """(initial state, restored final state) of the run of `config` in `workdir`."""
  initial = train.setup(config).initial_state
  manager = checkpointing.create_manager(f"{workdir}/checkpoints")
  final = checkpointing.restore_latest(manager, initial)
  manager.close()
  if final is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  return initial, final


def export_weights(config: ml_collections.ConfigDict, workdir) -> epath.Path:
  """Writes `weights.npz`: per binary layer `init/<layer>`, `final/<layer>`
  (latent weights, float32) and `never_flipped/<layer>` (bool), and `step`."""
  workdir = epath.Path(workdir)
  initial, final = _initial_and_final(config, str(workdir))
  mask = binary_weight_mask(initial.params)
  arrays = {"step": np.asarray(int(final.step))}
  # metrics._layers names layers exactly as the logged `silent_ratio/<layer>` tags.
  for name, w0, w1, ever in metrics._layers(  # pylint: disable=protected-access
      mask, initial.params, final.params, final.flips.ever_flipped):
    w0 = np.asarray(w0, np.float32)
    arrays[f"init/{name}"] = w0
    arrays[f"final/{name}"] = np.asarray(w1, np.float32)
    arrays[f"never_flipped/{name}"] = ~np.asarray(bitpack.unpack_bits(ever, w0.shape))
  path = workdir / WEIGHTS_FILE
  buf = io.BytesIO()  # through epath: the workdir may be on an object store
  np.savez_compressed(buf, **arrays)
  path.write_bytes(buf.getvalue())
  return path


def load_config(workdir) -> ml_collections.ConfigDict | None:
  """The config the trainer recorded in `workdir` (`workdir.CONFIG_FILE`), or None."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_weights(workdir) -> dict[str, dict[str, np.ndarray]] | None:
  """`{layer: {'init', 'final', 'never_flipped'}}` from `weights.npz`, or None.

  If the file is missing but the workdir has its `config.json` and a
  checkpoint, the snapshot is made first.
  """
  path = epath.Path(workdir) / WEIGHTS_FILE
  if not path.exists():
    config = load_config(workdir)
    if config is None or not (epath.Path(workdir) / "checkpoints").exists():
      return None
    export_weights(config, workdir)
  out: dict[str, dict[str, np.ndarray]] = {}
  with np.load(io.BytesIO(path.read_bytes())) as data:
    for key in data.files:
      if "/" in key:
        kind, layer = key.split("/", 1)
        out.setdefault(layer, {})[kind] = data[key]
  return out
