"""The pieces of multi-process runs that need no second process."""

import signal

import jax
import numpy as np
import pytest

from ovsw_jax import multihost, supervisor


@pytest.mark.parametrize("address,bind", [
    ("127.0.0.1:1234", "127.0.0.1:1234"),
    ("localhost:99", "localhost:99"),
    ("[::1]:5", "[::1]:5"),
    ("10.0.0.3:1234", None),       # a real network: jax's default (all interfaces)
    ("node0.cluster:1234", None),
])
def test_loopback_coordinators_bind_loopback_only(address, bind):
  assert multihost.bind_address_for(address) == bind


def test_bad_coordinator_address():
  with pytest.raises(ValueError, match="HOST:PORT"):
    multihost.bind_address_for("node0")


def test_device_ids():
  assert multihost.parse_device_ids("0,1,2,3") == [0, 1, 2, 3]
  assert multihost.parse_device_ids(None) is None
  for bad in ("0,x", "1,1", "-1"):
    with pytest.raises(ValueError, match="local_device_ids"):
      multihost.parse_device_ids(bad)


def test_partial_flags_name_what_is_missing():
  with pytest.raises(ValueError, match="missing: --num_processes, --process_id"):
    multihost.initialize(coordinator_address="127.0.0.1:1")
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    multihost.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)
  assert multihost.initialize() is False  # nothing asked: single process


def test_global_round_trip_is_exact_and_owns_its_buffers():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(3, np.int32)}
  glob = multihost.to_global(tree)
  assert glob["a"].sharding.is_fully_replicated
  assert len(glob["a"].addressable_shards) == jax.local_device_count()
  back = multihost.to_local(glob)
  for k in tree:
    np.testing.assert_array_equal(back[k], tree[k])
  abstract = multihost.abstract_global(tree)
  assert abstract["a"].shape == (2, 3) and abstract["a"].sharding == glob["a"].sharding


def test_abnormal_end_messages_name_the_cause_and_the_way_back():
  peer = supervisor.abnormal_end_message(-signal.SIGABRT, 0, "/runs/x")
  assert "Process 0" in peer and "SIGABRT" in peer and "another process died" in peer
  assert "resume from the last checkpoint in /runs/x" in peer
  killed = supervisor.abnormal_end_message(-signal.SIGKILL, 1, "/runs/x")
  assert "SIGKILL" in killed and "out of memory" in killed
