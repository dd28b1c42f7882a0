"""Test set-up: 4 CPU devices, so the pmap and jit paths split batches as on a multi-GPU host."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
