"""Stop requests without a subprocess: signal names, handlers, sync points, the
supervisor's forwarding, and an evaluation that stops midway.

Signals are sent to this test process itself, inside `preemption.handling`,
which puts the previous handlers back.
"""

import os
import signal
import time
import types

import numpy as np
import pytest
from jax.experimental import multihost_utils

from helpers import load_config
from ovsw_jax.trainer import preemption, supervisor, tasks, train

TERM, INT, USR1 = signal.SIGTERM, signal.SIGINT, signal.SIGUSR1


def deliver(signum):
  """Sends `signum` to this process and waits until its Python handler ran."""
  os.kill(os.getpid(), signum)
  deadline = time.time() + 5
  while preemption.requested_by() is None and time.time() < deadline:
    time.sleep(0.01)  # a signal interrupts the sleep; its handler runs here


def test_parse_signals_always_has_term_and_int_and_names_bad_entries():
  assert preemption.parse_signals("") == (TERM, INT)
  assert preemption.parse_signals(None) == (TERM, INT)
  assert preemption.parse_signals("USR1") == (TERM, INT, USR1)
  assert preemption.parse_signals(" sigusr1, HUP,TERM,usr1") == (TERM, INT, USR1, signal.SIGHUP)
  for bad in ("KILL", "QUIT", "USR3", "15"):
    with pytest.raises(ValueError, match=f"'{bad}'.*USR1,USR2"):
      preemption.parse_signals(bad)


def test_a_configured_signal_requests_a_stop_and_an_unconfigured_one_keeps_its_handler():
  before = signal.getsignal(USR1)
  with preemption.handling(preemption.parse_signals("")):
    assert signal.getsignal(USR1) is before  # not asked for: the default behaviour stays
    assert not preemption.Preemption().__enter__().should_stop()
  with preemption.handling(preemption.parse_signals("USR1")):
    with preemption.Preemption() as preempt:
      assert not preempt.should_stop()
      deliver(USR1)
      assert preemption.requested_by() == USR1
      assert preempt.should_stop() and preempt.should_stop()
  assert signal.getsignal(USR1) is before and preemption.requested_by() is None
  stopped = preemption.Preempted(7, USR1)
  assert stopped.exit_status == preemption.EXIT_PREEMPTED == 75
  assert str(stopped).startswith("Preempted at step 7: ") and "SIGUSR1" in str(stopped)


def test_sigint_stops_with_130_and_a_second_one_would_end_the_process():
  with preemption.handling():
    deliver(INT)
    assert preemption.requested_by() == INT
    assert signal.getsignal(INT) == signal.SIG_DFL  # the next Ctrl-C: the system's default
    os.kill(os.getpid(), TERM)  # a later stop signal changes nothing
    time.sleep(0.05)
    assert preemption.requested_by() == INT
  assert preemption.Preempted(3, INT).exit_status == preemption.EXIT_INTERRUPTED == 130
  assert signal.getsignal(INT) is signal.default_int_handler


def test_library_use_handles_sigterm_only_while_training():
  before = signal.getsignal(TERM)
  with preemption.Preemption() as preempt:
    deliver(TERM)
    assert preempt.should_stop() and preemption.requested_by() == TERM
  assert signal.getsignal(TERM) is before and preemption.requested_by() is None


def test_several_processes_pass_one_counter_through_train_and_eval_checks(monkeypatch):
  # jax agrees on "one more than the largest counter any process passed": the
  # counter must grow by one per call, whatever the call site.
  passed = []

  def reached(counter):
    passed.append(counter)
    return counter == 5
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached)
  # Other stop signals reach jax's service as a SIGTERM to the process itself.
  sent, kill = [], os.kill
  monkeypatch.setattr(os, "kill", lambda pid, s: sent.append(s) if s == TERM else kill(pid, s))
  multi = [False]
  monkeypatch.setattr(preemption, "_multi_process", lambda: multi[0])
  with preemption.handling(preemption.parse_signals("USR1")):
    deliver(USR1)  # before jax.distributed is initialised: passed on when the loop starts
    assert sent == []
    multi[0] = True
    with preemption.Preemption() as preempt:
      assert sent == [TERM]
      answers = [preempt.should_stop() for _ in range(7)]
  assert answers == [False] * 4 + [True] * 3
  assert passed == [1, 2, 3, 4, 5]  # once stopped, no further sync point is entered
  with preemption.handling(preemption.parse_signals("USR1")):
    deliver(USR1)  # after: passed on at once, and only once
    with preemption.Preemption():
      assert sent == [TERM, TERM]


def test_supervisor_sends_sigterm_for_every_stop_signal_and_kills_on_a_second_sigint():
  f = supervisor.Forwarder()
  assert f.translate(signal.SIGQUIT) == signal.SIGQUIT and f.first is None
  assert f.translate(USR1) == TERM and f.first == USR1
  assert f.exit_status(75) == 75
  f = supervisor.Forwarder()
  assert [f.translate(s) for s in (INT, TERM, INT)] == [TERM, TERM, signal.SIGKILL]
  assert f.exit_status(75) == f.exit_status(-signal.SIGKILL) == f.exit_status(-INT) == 130
  f = supervisor.Forwarder()
  assert f.exit_status(0) == 0 and f.exit_status(1) == 1
  assert f.exit_status(-TERM) == 143  # before the child's handlers were installed
  assert f.exit_status(-signal.SIGKILL) is None and f.exit_status(-signal.SIGABRT) is None


def test_evaluate_stops_before_the_next_batch_and_returns_no_partial_figures():
  config = load_config("default")
  config.eval_batch_size = 120  # 360 test images: 3 batches
  calls = []

  def eval_step(state, batch):
    calls.append(state)
    n = np.sum(batch["mask"]).astype(np.float32)
    return {"loss": n, "accuracy": n, "top5": n, "count": n}
  scheme = types.SimpleNamespace(shard=lambda b: b, unreplicate=lambda t: t)
  task = tasks.create(config)
  full = train.evaluate(eval_step, "state", task, 120, scheme)
  assert len(calls) == 3 and full["eval_count"] == 360 and full["eval_accuracy"] == 1.0
  calls.clear()
  asked = []
  stop = lambda: asked.append(1) or len(asked) >= 2  # the request comes after one batch
  assert train.evaluate(eval_step, "state", task, 120, scheme, stop) is None
  assert len(calls) == 1 and len(asked) == 2


STUCK_IN_C = r'''
import ctypes, threading
from ovsw_jax.trainer import preemption
preemption.install_stack_dump()
def churn():  # threads that come and go while the stacks are printed
  while True:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
threading.Thread(target=churn, name="churn", daemon=True).start()
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(64)  # a zeroed pthread mutex (PTHREAD_MUTEX_INITIALIZER)
libc.pthread_mutex_lock(mutex)
print("ready", flush=True)
libc.pthread_mutex_lock(mutex)  # locked twice: the main thread waits in C for ever
'''


def test_sigquit_prints_every_threads_stack_while_the_main_thread_is_stuck_in_c():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import ROOT  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_C], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    assert proc.stdout.readline().strip() == "ready"
    for _ in range(10):  # stack dumps while threads start and exit
      proc.send_signal(signal.SIGQUIT)
      time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None  # neither crashed nor ended by SIGQUIT's default action
  finally:
    proc.kill()
    _, err = proc.communicate(timeout=60)
  assert err.count("most recent call first") >= 10 * 2, err[-2000:]  # main + printer, each time
  assert 'File "<string>", line 15 in <module>' in err  # the main thread, in the second lock
  assert "Fatal Python error" not in err and "Segmentation" not in err
