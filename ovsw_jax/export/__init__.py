"""Export of a trained OvSW network to its deployable binary form.

    from ovsw_jax import export
    net = export.export_network("resnet20", 10, params, batch_stats, (32, 32, 3))
    export.save(net, "resnet20.ovsw")
    logits = export.predictor(export.load("resnet20.ovsw"))(images)

Command line: `python -m ovsw_jax.export --help`. File format: `format.py`.
"""

from ovsw_jax.export.build import fold_batch_norm, pack_kernel, unpack_kernel
from ovsw_jax.export.format import FORMAT_NAME, FORMAT_VERSION, ExportError
from ovsw_jax.export.infer import (BACKENDS, device_arrays, forward, int8_conv, predictor,
                                   simulate, xnor_popcount_conv)
from ovsw_jax.export.network import (ExportedNetwork, create_model, export_network,
                                     from_bytes, load, save, validate)

__all__ = [
    "BACKENDS", "ExportError", "ExportedNetwork", "FORMAT_NAME", "FORMAT_VERSION",
    "create_model", "device_arrays", "export_network", "fold_batch_norm", "forward",
    "from_bytes", "int8_conv", "load", "pack_kernel", "predictor", "save", "simulate",
    "unpack_kernel", "validate", "xnor_popcount_conv",
]
