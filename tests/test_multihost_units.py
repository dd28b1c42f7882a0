"""The pieces of multi-process runs that need no second process."""

import signal
import socket

import jax
import numpy as np
import pytest

from helpers import load_config
from ovsw_jax.trainer import multihost, supervisor, workdir


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


# --- Agreement on the config and package version -----------------------------

def record(**changes):
  config = load_config("default")
  with config.unlocked():
    for key, value in changes.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return multihost.run_record(workdir.config_record(config), "0.1.0")


def test_the_same_config_agrees():
  assert multihost.record_changes(record(), record()) == {}


@pytest.mark.parametrize("field,value", [
    ("seed", 1), ("batch_size", 32), ("ovsw.delta", 0.02)])
def test_a_differing_field_is_named_with_both_values(field, value):
  reference = record()
  changes = multihost.record_changes(reference, record(**{field: value}))
  assert list(changes) == [field]
  before = reference["config"]
  for part in field.split("."):
    before = before[part]
  assert changes[field] == (before, value)
  text = multihost.disagreement_message({1: changes}, 2)
  assert f"process 1 differs from process 0 in {field}: {before!r} on process 0, " \
         f"{value!r} on process 1" in text
  assert "Nothing was built or written" in text and "same --config" in text


def test_another_package_version_disagrees():
  other = dict(record(), version="0.0.9")
  changes = multihost.record_changes(record(), other)
  assert changes == {multihost.VERSION_FIELD: ("0.1.0", "0.0.9")}


def test_the_message_names_every_differing_process_up_to_a_few():
  changes = {pid: {"seed": (0, pid)} for pid in range(1, 8)}
  text = multihost.disagreement_message(changes, 8, shown=3)
  assert "process 3 differs" in text and "process 4 differs" not in text
  assert "and 4 more processes differ" in text and "The 8 processes" in text


# --- Joining: a missing or duplicate process is named --------------------------

def test_a_busy_coordinator_port_names_the_duplicate_process_id():
  port = free_port()
  with pytest.MonkeyPatch.context() as m:
    m.setattr(multihost, "_claimed", [])
    multihost.claim_port(f"127.0.0.1:{port}", process_id=0, num_processes=2)  # the first
    # A second process 0 on the same port, before or after jax's service listens there.
    with pytest.raises(ValueError, match=r"--process_id=0: port \d+ .* already in use"):
      multihost.claim_port(f"127.0.0.1:{port}", process_id=0, num_processes=2)
    (holder,) = multihost._claimed
    with socket.socket() as service:  # what gRPC does: SO_REUSEPORT, listening
      service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      service.bind(("127.0.0.1", port))
      service.listen()
      holder.close()
      with pytest.raises(ValueError, match="already in use"):
        multihost.claim_port(f"127.0.0.1:{port}", process_id=0, num_processes=2)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_join_timeout_must_be_positive():
  with pytest.raises(ValueError, match="--join_timeout_s=0"):
    multihost.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0,
                         join_timeout_s=0)


# What jax's coordination service prints when a process did not register in time.
SERVICE_LOG = """\
W1201 23:17:15.105341 coordination_service.cc:388] ConnectAfterBarrierPasses: DEADLINE_EXCEEDED: \
Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0.
# of tasks that reached the barrier: 1/3.
The first task at the barrier: 0. Some timed out task names:
1
/job:jax_worker/replica:0/task:2
 [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1201 23:17:15.107173 client.h:80] Terminating process
"""


def test_the_processes_that_did_not_join_are_read_from_the_service_log():
  assert supervisor.missing_processes(SERVICE_LOG) == [1, 2]
  assert supervisor.missing_processes("F1201 Deadline Exceeded\nRPC: RegisterTask") is None


def test_join_failure_messages_name_the_missing_process_or_the_coordinator():
  status = {"phase": "joining", "process_id": 0, "num_processes": 3,
            "coordinator": "10.0.0.1:1234", "join_timeout_s": 20}
  text = supervisor.join_failure_message(status, [1, 2])
  assert text.startswith("error: Process 0 stopped: processes 1, 2 of the 3-process run did "
                         "not join at 10.0.0.1:1234 within 20 s (--join_timeout_s)")
  assert "its own id in [0, 3)" in text and "Nothing was trained or written" in text
  alone = supervisor.join_failure_message(dict(status, process_id=2), None)
  assert alone.startswith("error: Process 2 could not join the 3-process run at 10.0.0.1:1234 "
                          "within 20 s")
  assert "process 0, which serves that address" in alone and "--process_id=2" in alone


def test_a_supervised_child_reports_its_phase(tmp_path, monkeypatch):
  supervisor.report(phase="ignored")  # no parent: nothing written, no error
  path = tmp_path / "status.json"
  monkeypatch.setenv(supervisor.STATUS_ENV, str(path))
  supervisor.report(phase="joining", process_id=1)
  assert supervisor._read_status(str(path)) == {"phase": "joining", "process_id": 1}
  assert supervisor._read_status(str(tmp_path / "absent.json")) == {}
