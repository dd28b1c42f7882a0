"""ImageNet input pipeline: data worker processes against the in-process pipeline.

  python -m benchmarks.input_pipeline [--images=1000] [--batch=128] [--batches=48]
      [--repeats=3] [--latency_ms=20] [--data_dir=DIR]

Makes (once, in `--data_dir`, default a folder under /tmp) a synthetic data set
of ImageNet-sized JPEGs (about 500 x 375, quality 90, photo-like content) in
array_record through tfds, as a prepared ImageNet is, then runs the project's
own `train_iterator` and `eval_passes` in two arms, alternated:

* `workers`: the defaults (`data_workers`, `decode_threads`, `read_threads`
  None: one worker process a CPU, everything per image in the workers, the
  local-disk reads one by one);
* `today`: the pipeline before data workers: `data_workers=0` (everything in
  this process: one thread reading the records one by one, parsing, reading
  headers and drawing, then TensorFlow's decode threads, min(16, CPUs) of them).

For each: images/s; CPU-ms per image of all processes (this one from
getrusage, the workers from /proc); the GIL-held time per image of this
process, sampled by py-spy (`--gil`, so only samples where a thread of this
process holds the GIL count) when it can attach, else the CPU time of this
process's Python threads (an upper bound: it includes their time in C with
the GIL released); that CPU time is printed too. One process tops out at
`1 / GIL time per image` images/s (the single-process ceiling). The start-up
(first batch) is reported, not counted. Evaluation: the second and third
passes of `eval_passes` (its workers are kept between passes).

Latency: the same batch of records read through a source that sleeps
`--latency_ms` per record (as a remote store's round trip), with the
object-store default of `read_threads` (64) and with one thread (today's
reads, and the local-disk default); and how much longer a whole batch takes
with the latency than without.

Projection for a host of `--project_cpus` CPUs (96: a TPU v4 VM): the lesser
of `CPUs / CPU-s per image` (all of them decoding) and the single-process
ceiling. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import signal
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import ml_collections
import numpy as np

from benchmarks import synthetic_jpegs
from ovsw_jax.trainer import input_pipeline as ip
from ovsw_jax.trainer.data import imagenet, sources

# ---------------------------------------------------------------------------
# What is measured.


def _ticks(pid: int) -> int:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return int(fields[11]) + int(fields[12])  # utime + stime


def children() -> list[int]:
  """This process's child processes (the data workers, grain's resource tracker)."""
  me, out = os.getpid(), []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
            out.append(int(entry))
      except (OSError, ValueError, IndexError):
        pass
  return out


def worker_rss_mb() -> float:
  """Mean anonymous memory of the data workers (file-backed pages are shared)."""
  sizes = []
  for pid in children():
    try:
      status = pathlib.Path(f"/proc/{pid}/status").read_text()
      cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
      continue
    if b"multiprocessing.spawn" in cmdline:
      sizes += [int(line.split()[1]) / 1024 for line in status.splitlines()
                if line.startswith("RssAnon:")]
  return statistics.mean(sizes) if sizes else 0.0


def python_threads_cpu() -> dict[int, float]:
  """CPU seconds (user + system) of each Python thread of this process."""
  out = {}
  for t in threading.enumerate():
    try:
      out[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    except (OSError, TypeError):  # The thread ended meanwhile.
      pass
  return out


class Window:
  """Wall, CPU of this process and of its children, Python threads' CPU, GIL samples."""

  def __init__(self, gil_rate: int):
    self.gil_rate = gil_rate

  def __enter__(self):
    self.spy = GilSampler(self.gil_rate).start() if self.gil_rate else None
    self.kids = children()
    self.tick0 = {p: _ticks(p) for p in self.kids}
    self.py0 = python_threads_cpu()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    self.cpu0 = usage.ru_utime + usage.ru_stime
    self.wall0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    self.cpu_self = usage.ru_utime + usage.ru_stime - self.cpu0
    py1 = python_threads_cpu()
    self.python_threads = sum(v - self.py0.get(k, 0.0) for k, v in py1.items())
    hz = os.sysconf("SC_CLK_TCK")
    kids = 0
    for p in self.kids:
      try:
        kids += _ticks(p) - self.tick0[p]
      except OSError:
        pass
    self.cpu_children = kids / hz
    self.gil = self.spy.stop() if self.spy else None
    return False


class GilSampler:
  """py-spy `record --gil` on this process: seconds a thread of it held the GIL."""

  def __init__(self, rate: int):
    self.rate = rate

  def start(self):
    exe = shutil.which("py-spy")
    if exe is None:
      return None
    self.out = tempfile.NamedTemporaryFile(suffix=".txt", delete=False).name
    self.proc = subprocess.Popen(
        [exe, "record", "--pid", str(os.getpid()), "--gil", "--nonblocking", "--rate",
         str(self.rate), "--format", "raw", "-o", self.out],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()  # "py-spy> Sampling process ..." once attached
    if "Sampling" not in line:
      self.proc.kill()
      why = (line + self.proc.stderr.read()).strip().splitlines()
      print(f"py-spy could not sample this process ({why[-1] if why else 'no output'}); "
            "the GIL figure is the Python threads' CPU")
      return None
    self.started = time.perf_counter()
    return self

  def stop(self) -> float:
    self.proc.send_signal(signal.SIGINT)
    self.proc.wait(timeout=60)
    samples = 0
    for line in pathlib.Path(self.out).read_text().splitlines():
      samples += int(line.rsplit(" ", 1)[1])
    os.unlink(self.out)
    return samples / self.rate


def run_train(config, batch: int, batches: int, gil_rate: int) -> dict:
  it = ip.train_iterator(config, global_batch_size=batch, seed=0)
  start = time.perf_counter()
  next(it)
  startup = time.perf_counter() - start
  for _ in range(2):  # Every worker has made a batch: the steady state.
    next(it)
  with Window(gil_rate) as w:
    for _ in range(batches):
      next(it)
  rss = worker_rss_mb()
  it.close()
  return figures(w, batch * batches, startup=startup, worker_rss_mb=rss)


def run_eval(config, batch: int) -> dict:
  passes = ip.eval_passes(config, global_batch_size=batch)
  start = time.perf_counter()
  for _ in passes():
    pass
  startup = time.perf_counter() - start
  with Window(0) as w:
    n = sum(int(b["mask"].sum()) for _ in range(2) for b in passes())
  passes.close()
  return figures(w, n, startup=startup)


def figures(w: Window, n: int, **extra) -> dict:
  gil = w.gil if w.gil is not None else w.python_threads
  return dict(img_s=n / w.wall, cpu_ms_per_img=1e3 * (w.cpu_self + w.cpu_children) / n,
              gil_ms_per_img=1e3 * gil / n, gil_method="py-spy" if w.gil is not None
              else "python_threads_cpu", python_threads_cpu_ms_per_img=1e3 * w.python_threads / n,
              **extra)


class SlowSource:
  """A source whose every read waits `delay_s` first, as a remote store's round trip."""

  def __init__(self, source, delay_s: float):
    self.source, self.delay_s = source, delay_s

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    time.sleep(self.delay_s)
    return self.source[i]


def latency(config, delay_s: float, batch: int) -> dict:
  """Milliseconds for the records of one batch, and a whole batch, with injected latency."""
  dataset = ip._build(config)  # pylint: disable=protected-access
  indices = np.arange(batch) % dataset.info.num_train
  source = dataset.batches.train_source
  out = {}
  for name, threads in (("read_threads_remote", ip.READ_THREADS_REMOTE), ("read_threads_1", 1)):
    slow = imagenet.ImageNetBatches(SlowSource(source, delay_s), None, 224, read_threads=threads,
                                    decode_threads=dataset.batches.decode_threads)
    fast = imagenet.ImageNetBatches(source, None, 224, read_threads=threads,
                                    decode_threads=dataset.batches.decode_threads)
    start = time.perf_counter()
    slow.records(slow.train_source, indices)
    out[f"records_ms_{name}"] = 1e3 * (time.perf_counter() - start)
    whole = {}
    for label, maker in (("with", slow), ("without", fast)):
      maker.train(indices, seed=0, step=0, positions=np.arange(batch))  # warm
      start = time.perf_counter()
      maker.train(indices, seed=0, step=1, positions=np.arange(batch))
      whole[label] = 1e3 * (time.perf_counter() - start)
    out[f"latency_added_ms_{name}"] = whole["with"] - whole["without"]
  out["latency_ms"] = 1e3 * delay_s
  out["read_threads"] = ip.READ_THREADS_REMOTE
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--latency_ms", type=float, default=20.0)
  parser.add_argument("--gil_rate", type=int, default=1000,
                      help="py-spy samples per second (0: Python threads' CPU instead)")
  parser.add_argument("--project_cpus", type=int, default=96)
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "ovsw_synthetic_jpegs"))
  args = parser.parse_args()
  builder = synthetic_jpegs.builder(args.data_dir, args.images)
  splits = builder.info.splits
  files = list(pathlib.Path(builder.data_dir).glob("*array_record*"))
  size = sum(f.stat().st_size for f in files) / max(
      splits["train"].num_examples + splits["validation"].num_examples, 1)
  cpus = ip.host_cpus()
  print(f"{splits['train'].num_examples} train and {splits['validation'].num_examples} "
        f"validation images, mean record {size / 1024:.0f} KiB; batch {args.batch}, "
        f"{cpus} CPUs", flush=True)

  def config(**kwargs):
    return ml_collections.ConfigDict(dict(
        dataset="imagenet2012", tfds_name="ovsw_synthetic_jpegs", data_dir=args.data_dir,
        image_size=224, prefetch=2, **kwargs))

  arms = {"workers": config(),
          "today": config(data_workers=0, read_threads=1, decode_threads=min(16, cpus))}
  for name, c in arms.items():
    print(f"{name}: data_workers, decode_threads, read_threads = {ip.data_threads(c)}")
  runs = {(arm, kind): [] for arm in arms for kind in ("train", "eval")}
  for r in range(args.repeats):
    for arm, c in arms.items():
      sources.clear_caches()
      runs[(arm, "train")].append(run_train(c, args.batch, args.batches, args.gil_rate))
      runs[(arm, "eval")].append(run_eval(c, args.batch))
      print(f"round {r + 1}, {arm}: train {runs[(arm, 'train')][-1]['img_s']:.0f} images/s, "
            f"eval {runs[(arm, 'eval')][-1]['img_s']:.0f}", flush=True)

  def median(arm, kind, key):
    return statistics.median(run[key] for run in runs[(arm, kind)])

  summary = {}
  print("\n| arm | train images/s | train CPU-ms/image | GIL-ms/image (this process) | "
        "Python threads' CPU-ms/image | one-process ceiling | eval images/s | "
        "eval CPU-ms/image | start-up s (train, eval) |\n|---|---|---|---|---|---|---|---|---|")
  for arm in arms:
    gil = median(arm, "train", "gil_ms_per_img")
    s = dict(
        train_img_s=median(arm, "train", "img_s"),
        train_cpu_ms_per_img=median(arm, "train", "cpu_ms_per_img"),
        gil_ms_per_img=gil, gil_method=runs[(arm, "train")][0]["gil_method"],
        python_threads_cpu_ms_per_img=median(arm, "train", "python_threads_cpu_ms_per_img"),
        single_process_ceiling_img_s=1e3 / max(gil, 1e-9),
        eval_img_s=median(arm, "eval", "img_s"),
        eval_cpu_ms_per_img=median(arm, "eval", "cpu_ms_per_img"),
        train_startup_s=median(arm, "train", "startup"),
        eval_startup_s=median(arm, "eval", "startup"),
        worker_rss_mb=median(arm, "train", "worker_rss_mb"),
        data_threads=list(ip.data_threads(arms[arm])))
    s["projected_img_s"] = min(args.project_cpus / (s["train_cpu_ms_per_img"] / 1e3),
                               s["single_process_ceiling_img_s"])
    summary[arm] = s
    print(f"| {arm} | {s['train_img_s']:.0f} | {s['train_cpu_ms_per_img']:.2f} | "
          f"{s['gil_ms_per_img']:.4f} ({s['gil_method']}) | "
          f"{s['python_threads_cpu_ms_per_img']:.4f} | {s['single_process_ceiling_img_s']:,.0f} | "
          f"{s['eval_img_s']:.0f} | {s['eval_cpu_ms_per_img']:.2f} | "
          f"{s['train_startup_s']:.1f}, {s['eval_startup_s']:.1f} |")
  new, old = summary["workers"], summary["today"]
  ratios = dict(
      train_img_s=new["train_img_s"] / old["train_img_s"],
      train_cpu_ms_per_img=new["train_cpu_ms_per_img"] / old["train_cpu_ms_per_img"],
      gil_ms_per_img=new["gil_ms_per_img"] / old["gil_ms_per_img"],
      single_process_ceiling_img_s=(new["single_process_ceiling_img_s"]
                                    / old["single_process_ceiling_img_s"]),
      eval_img_s=new["eval_img_s"] / old["eval_img_s"])
  print("workers / today: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
  print(f"projected for {args.project_cpus} CPUs, one process: workers "
        f"{new['projected_img_s']:,.0f} images/s, today {old['projected_img_s']:,.0f}")
  lat = latency(arms["workers"], args.latency_ms / 1e3, args.batch)
  print(f"{args.latency_ms:.0f} ms a read: the {args.batch} records of a batch arrive in "
        f"{lat['records_ms_read_threads_remote']:.0f} ms with {lat['read_threads']} read "
        f"threads ({lat['records_ms_read_threads_remote'] / args.latency_ms:.1f}x the latency), "
        f"{lat['records_ms_read_threads_1']:.0f} ms one by one; a whole batch takes "
        f"{lat['latency_added_ms_read_threads_remote']:.0f} ms longer "
        f"({lat['latency_added_ms_read_threads_1']:.0f} ms one by one)")
  print(json.dumps(dict(new, today=old, ratios=ratios, latency=lat, cpus=cpus,
                        batch=args.batch, project_cpus=args.project_cpus)))


if __name__ == "__main__":
  main()
