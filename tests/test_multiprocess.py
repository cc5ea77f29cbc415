"""Runs across processes (fml_jax/distributed.py): two processes of two CPU devices each,
joined by JAX's multi-process runtime with gloo collectives, give the metrics of one
process on one device (and tests/test_sharding.py: of one process on four devices); a
killed process stops the other with a line naming it, and the run resumes; start-up
mistakes give one line each."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from fml_jax import train
from fml_jax.algorithms import ALGORITHMS

from conftest import REPO, small_config

WORKER = str(REPO / "tests" / "multiprocess_worker.py")
DEVICES_PER_PROCESS = 2
# Metrics that are times, not results.
TIMES = ("round_seconds", "elapsed_seconds", "warm_start_seconds")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env() -> dict:
  """Each process sees DEVICES_PER_PROCESS CPU devices (XLA's forced host devices)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")


def start(args: list, log_path) -> subprocess.Popen:
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=process_env(), stdout=log,
                          stderr=subprocess.STDOUT)


def wait_all(procs: list, timeout: float) -> list:
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def read_metrics(workdir) -> list:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: list, want: list, what: str, tol: float = 2e-4):
  assert [r["round"] for r in got] == [r["round"] for r in want], what
  for g, w in zip(got, want):
    assert set(g) == set(w), (what, set(g) ^ set(w))
    for key, value in w.items():
      if key in TIMES or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      assert g[key] == pytest.approx(value, rel=tol, abs=tol), (what, g["round"], key)


def case_overrides(name: str, placement: str) -> dict:
  """Small runs whose client axis divides over 4 devices: every group's cohort a multiple
  of 4 (FML's and FedMD's two architecture groups take part whole), checkpoints on."""
  overrides = {**ALGORITHMS[name].small_overrides(), "algorithm": name, "num_clients": 8,
               "clients_per_round": 4, "strategy": "vmap", "placement": placement,
               "eval_every": 1, "checkpoint_every": 1}
  if name in ("fml", "fedmd"):   # two architecture groups of 4
    overrides["clients_per_round"] = 8
  if name == "fedavg":   # with a server optimizer (FedAdam)
    overrides.update({"server.optimizer": "adam", "server.learning_rate": 0.03})
  return overrides


CASES = [(name, placement) for placement in ("device", "host")
         for name in ("fml", "fedavg", "fedmr", "fedmd")]


def test_two_processes_of_two_devices_equal_one_device(tmp_path):
  port = free_port()
  cases = [[str(tmp_path / f"{n}_{p}_2x2"), {**case_overrides(n, p), "mesh_shape": 0}]
           for n, p in CASES]
  procs = [start([WORKER, json.dumps({"coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                      "process_id": i, "cases": cases})],
                 tmp_path / f"worker{i}.log") for i in range(2)]
  codes = wait_all(procs, timeout=900)
  logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], [log[-3000:] for log in logs]
  assert "process 1 of 2" in logs[1] and "4 devices in all" in logs[1]
  # One reference per algorithm, on the device store: in one process the host store
  # equals it (tests/test_rounds.py, every store against the sequential reference).
  references = {}
  for (name, placement), (workdir, _) in zip(CASES, cases):
    one = tmp_path / f"{name}_1x1"
    if name not in references:
      references[name] = train.run(small_config(**case_overrides(name, "device")), str(one))
    summary = references[name]
    assert summary["processes"] == 1
    two = tmp_path / f"{name}_{placement}_2x2"
    assert_same_metrics(read_metrics(two), read_metrics(one), f"{name} {placement}")
    written = json.loads((two / "summary.json").read_text())
    assert written["processes"] == 2 and written["mesh_devices"] == 4
    assert written["final"]["global_test_acc"] == summary["final"]["global_test_acc"] or (
        written["final"]["global_test_acc"] == pytest.approx(summary["final"]["global_test_acc"],
                                                             abs=2e-4))


def cli(workdir, port, process_id, *extra):
  return ["-m", "fml_jax.main", "--config=fml_jax/configs/default.py", f"--workdir={workdir}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={process_id}", *extra]


KILL_RUN = ("--config.num_clients=8", "--config.clients_per_round=4", "--config.num_rounds=10",
            "--config.eval_every=1", "--config.checkpoint_every=1", "--config.mesh_shape=0",
            "--config.synthetic_max_client_examples=120", "--config.local_epochs=2",
            "--config.batch_size=16", "--config.strategy=vmap")


def test_a_killed_process_stops_the_other_and_the_run_resumes(tmp_path):
  workdir = tmp_path / "run"
  port = free_port()
  procs = [start(cli(workdir, port, i, *KILL_RUN, "--heartbeat_timeout=5"),
                 tmp_path / f"first{i}.log") for i in range(2)]
  deadline = time.monotonic() + 600
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert procs[0].poll() is None and time.monotonic() < deadline, (
        (tmp_path / "first0.log").read_text()[-3000:])
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  code = wait_all(procs[:1], timeout=60)[0]   # within 60 s of the kill
  assert code != 0
  assert time.monotonic() - killed_at < 60
  survivor = (tmp_path / "first0.log").read_text()
  # JAX's coordination service names the lost process; ours says what to do, when the
  # survivor noticed first through a failed collective.
  named = (re.search(r"stopped sending heartbeats\)?:?\s*\n?\s*1\b", survivor)
           or re.search(r"fml_jax: error: process\(es\) \[1\] of 2 were lost", survivor))
  assert named, survivor[-3000:]
  if "fml_jax: error:" in survivor:   # our line, and no traceback through the command line
    # (orbax may log its own background save's failure, with its traceback, just before)
    assert 'fml_jax/main.py", line' not in survivor, survivor[-3000:]
  rounds_done = len(read_metrics(workdir))
  assert rounds_done < 10
  # Both again, as they were started: the run resumes from its last complete checkpoint.
  port = free_port()
  procs = [start(cli(workdir, port, i, *KILL_RUN), tmp_path / f"again{i}.log") for i in range(2)]
  assert wait_all(procs, timeout=600) == [0, 0], (tmp_path / "again0.log").read_text()[-3000:]
  again = (tmp_path / "again0.log").read_text()
  assert re.search(r"resuming after round \d+", again), again[-3000:]
  resumed = read_metrics(workdir)
  assert [r["round"] for r in resumed] == list(range(1, 11))
  # The uninterrupted run, in this process on one device.
  reference = tmp_path / "uninterrupted"
  overrides = {f.split("=")[0][len("--config."):]: f.split("=")[1] for f in KILL_RUN}
  config = small_config()
  from fml_jax import settings  # pylint: disable=g-import-not-at-top
  config = settings.apply_overrides(config, {**{k: type(config[k])(v) if k in config else v
                                                for k, v in overrides.items()},
                                             "mesh_shape": 1})
  train.run(config, str(reference))
  assert_same_metrics(resumed, read_metrics(reference), "resumed after a kill")


@pytest.mark.parametrize("case,expected", [
    ("id_too_big", r"--process_id=2 is not between 0 and num_processes - 1 = 1"),
    ("missing", r"needs all of --coordinator_address, --num_processes and --process_id.*"
                r"missing: --process_id"),
    ("port_in_use", r"that port cannot be used"),
])
def test_start_up_mistakes_give_one_line(tmp_path, case, expected):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    args = {"id_too_big": cli(tmp_path, free_port(), 2),
            "missing": cli(tmp_path, free_port(), 0)[:-1],
            "port_in_use": cli(tmp_path, port, 0)}[case]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=process_env(),
                          capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fml_jax: error:")]
  assert len(errors) == 1 and re.search(expected, errors[0]), proc.stderr[-2000:]


@pytest.mark.parametrize("mistake,expected", [
    ("settings", r"the processes were started with different settings: process\(es\) \[1\] "
                 r"differ from process 0"),
    ("workdir", r"process\(es\) \[1\] do not see the workdir .*run[01] as process 0 wrote it"),
])
def test_processes_that_do_not_match_stop_with_one_line(tmp_path, mistake, expected):
  """Different settings, or a workdir only process 0 sees (here: one per process)."""
  port = free_port()
  procs = [start(cli(tmp_path / ("run0" if mistake == "settings" else f"run{i}"), port, i,
                     "--config.num_rounds=1", "--config.mesh_shape=0",
                     f"--config.seed={i if mistake == 'settings' else 0}"), tmp_path / f"p{i}.log")
           for i in range(2)]
  assert wait_all(procs, timeout=300) == [2, 2]
  for i in range(2):
    log = (tmp_path / f"p{i}.log").read_text()
    errors = [l for l in log.splitlines() if l.startswith("fml_jax: error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), log[-2000:]
  assert not (tmp_path / "run0" / "config.json").exists()
