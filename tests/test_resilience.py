"""Runs that survive: kill -9 and resume, corrupted checkpoints, the divergence guard,
config changes in a workdir, and the memory/disk preflight."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fml_jax import outputs, preflight, train
from fml_jax.checkpoints import Checkpointer
from fml_jax.errors import UserError

from conftest import REPO, SHARED_TFDS, requires_mnist, small_config

# A small synthetic run, as command-line overrides.
RUN = {"num_clients": 8, "clients_per_round": 4, "local_epochs": 2, "batch_size": 16,
       "synthetic_max_client_examples": 150, "num_rounds": 30, "checkpoint_every": 3,
       "checkpoints_to_keep": 2}


def cli(workdir, **overrides):
  settings = {**RUN, **overrides}
  return [sys.executable, "-m", "fml_jax.main", "--config=fml_jax/configs/default.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()]


def run_cli(workdir, **overrides):
  proc = subprocess.run(cli(workdir, **overrides), cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def metrics_without_timing(workdir):
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def final_state(workdir, like_workdir=None):
  checkpointer = Checkpointer(workdir / "checkpoints", 1, 2)
  step = checkpointer.steps()[-1]
  state = checkpointer._manager.restore(step)   # pylint: disable=protected-access
  checkpointer.close()
  return step, state


def lines_in(path):
  try:
    return sum(1 for _ in open(path))
  except FileNotFoundError:
    return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_cli(workdir)
  return workdir


@pytest.mark.parametrize("checkpoint_every,seed", [(3, 1), (1, 2)])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, uninterrupted, checkpoint_every,
                                                 seed):
  """SIGKILL at a random round (with checkpoints every round, likely during a save),
  then the same command again: metrics and final parameters equal the uninterrupted run."""
  workdir = tmp_path / "run"
  kill_after = random.Random(seed).randint(4, 20)
  proc = subprocess.Popen(cli(workdir, checkpoint_every=checkpoint_every), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while lines_in(workdir / "metrics.jsonl") < kill_after and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert not (workdir / "summary.json").exists()
  # Resume with the same command (any checkpoint_every: it does not change the results).
  run_cli(workdir, checkpoint_every=checkpoint_every)
  assert metrics_without_timing(workdir) == metrics_without_timing(uninterrupted)
  summary = json.load(open(workdir / "summary.json"))
  assert summary["resumed_after_round"] < RUN["num_rounds"]
  step_a, a = final_state(workdir)
  step_b, b = final_state(uninterrupted)
  assert step_a == step_b == RUN["num_rounds"]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_partial_and_corrupted_checkpoints_are_skipped(tmp_path, uninterrupted, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  (workdir / "summary.json").unlink()
  ckpt = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps == [27, 30]
  # The newest checkpoint is damaged (its array files truncated) ...
  for f in (ckpt / "30").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(f.read_bytes()[:7])
  # ... and a save was killed before orbax finalized it.
  shutil.copytree(ckpt / "27", ckpt / "33.orbax-checkpoint-tmp-1234567")
  summary = train.run(small_config(**RUN, data_dir=""), str(workdir))
  assert summary["resumed_after_round"] == 27
  assert any("cannot be restored" in r.getMessage() for r in caplog.records)
  assert metrics_without_timing(workdir) == metrics_without_timing(uninterrupted)


def test_divergence_guard_names_round_algorithm_and_clients(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(cli(workdir, algorithm="fedavg", learning_rate=1.0, num_rounds=10,
                            checkpoint_every=1, num_clients=30, clients_per_round=10,
                            synthetic_max_client_examples=2000),
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 3
  assert "Traceback" not in proc.stderr
  [line] = [l for l in proc.stderr.splitlines() if l.startswith("fml_jax: error:")]
  assert "fedavg diverged" in line and "non-finite" in line and "clients [" in line
  diverged_round = int(line.split("round ")[1].split(":")[0])
  assert diverged_round >= 2
  assert f"last good checkpoint (round {diverged_round - 1})" in line
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == diverged_round - 1      # the bad round was not saved
  assert not (workdir / "summary.json").exists()
  rows = metrics_without_timing(workdir)
  assert [r["round"] for r in rows] == list(range(1, diverged_round))


def test_nonfinite_state_detected_inside_the_round():
  from test_rounds import make_runner  # pylint: disable=g-import-not-at-top
  config = small_config(algorithm="fml", learning_rate=1e30)
  runner = make_runner(config, "vmap")
  state, report = runner.run_round(runner.init(0))
  assert not bool(report.all_finite)
  assert not np.asarray(report.client_finite).all()


def test_workdir_with_other_config_lists_the_differences(tmp_path):
  train.run(small_config(num_rounds=1), str(tmp_path))
  with pytest.raises(UserError) as e:
    train.run(small_config(num_rounds=1, fml__alpha=0.3, batch_size=8), str(tmp_path))
  assert "fml.alpha: 0.5 -> 0.3" in str(e.value) and "batch_size: 16 -> 8" in str(e.value)
  # The resumable fields may change: raising num_rounds extends the run.
  summary = train.run(small_config(num_rounds=3), str(tmp_path))
  assert summary["resumed_after_round"] == 1
  assert [json.loads(l)["round"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_fewer_rounds_than_already_run_is_refused(tmp_path):
  train.run(small_config(num_rounds=3, checkpoint_every=1), str(tmp_path))
  with pytest.raises(UserError, match="already holds 3 rounds, more than num_rounds=2"):
    train.run(small_config(num_rounds=2, checkpoint_every=1), str(tmp_path))
  assert (tmp_path / "summary.json").exists()   # the finished run is left as it was


def test_a_complete_run_is_not_repeated(tmp_path):
  first = train.run(small_config(num_rounds=2), str(tmp_path))
  again = train.run(small_config(num_rounds=2), str(tmp_path))
  assert again == json.loads(json.dumps(first))


def test_torn_metrics_line_is_dropped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "glo')
  assert outputs.read_metrics(tmp_path, 2) == [{"round": 1}, {"round": 2}]
  assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n{"round": 2}\n'


@requires_mnist
def test_memory_preflight_refuses_with_numbers(tmp_path):
  # 50,000 FML clients with FedAvg's CNN as local model: ~13 MiB each, ~650 GiB in all.
  config = small_config(dataset="mnist", partition="iid", model="cnn", num_clients=50000,
                        clients_per_round=2, data_dir=SHARED_TFDS)
  with pytest.raises(preflight.ResourceError) as e:
    train.run(config, str(tmp_path))
  message = str(e.value)
  assert "not enough memory" in message and "50000 clients x 12.69 MiB" in message
  assert "GiB is free" in message
  assert not (tmp_path / "metrics.jsonl").exists()


def test_host_store_run_resumes_and_equals_the_device_store(tmp_path):
  """placement=host through train.run: evaluation reads the host store, checkpoints
  save and restore it (restored onto the host), and the metrics equal placement=device."""
  base = dict(num_clients=8, clients_per_round=3, num_rounds=4, checkpoint_every=2,
              local_models="mlp,mlp_small")
  train.run(small_config(**base, placement="host"), str(tmp_path / "host"))
  # Extend the run: round 4's checkpoint is restored into the host store.
  train.run(small_config(**dict(base, num_rounds=6), placement="host"), str(tmp_path / "host"))
  train.run(small_config(**dict(base, num_rounds=6)), str(tmp_path / "device"))
  host, device = metrics_without_timing(tmp_path / "host"), metrics_without_timing(
      tmp_path / "device")
  assert [r["round"] for r in host] == list(range(1, 7))
  for a, b in zip(host, device):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  assert json.load(open(tmp_path / "host" / "summary.json"))["resumed_after_round"] == 4


def test_memory_preflight_checks_the_host_store_against_host_memory(monkeypatch):
  """On a GPU/TPU the accelerator needs only the cohort's rows with placement=host, and
  the population is checked against the host's free memory (simulated backend)."""
  estimate = preflight.MemoryEstimate(
      state_bytes=100 * 2**30 + 2**20, population_bytes=100 * 2**30, per_client_bytes=2**20,
      round_bytes=2**30, num_clients=102400, on_host=True, cohort_bytes=2**30)
  assert estimate.device_bytes == 2 * 2**30 + 2**20 and estimate.host_bytes == 100 * 2**30
  monkeypatch.setattr(preflight.jax, "default_backend", lambda: "gpu")
  preflight.check_memory(estimate, available=10 * 2**30, host_available=200 * 2**30)
  with pytest.raises(preflight.ResourceError, match=r"not enough host memory .*placement=host"
                     r".*needs 100.00 GiB.*50.00 GiB is free"):
    preflight.check_memory(estimate, available=10 * 2**30, host_available=50 * 2**30)
  on_device = dataclasses.replace(estimate, on_host=False, cohort_bytes=0)
  with pytest.raises(preflight.ResourceError, match=r"not enough memory on gpu.*placement=host"):
    preflight.check_memory(on_device, available=10 * 2**30, host_available=200 * 2**30)
  # On a CPU backend host and device are one memory: everything counts against it.
  monkeypatch.setattr(preflight.jax, "default_backend", lambda: "cpu")
  with pytest.raises(preflight.ResourceError, match="not enough memory on cpu"):
    preflight.check_memory(estimate, available=60 * 2**30)


def test_disk_preflight_refuses_with_numbers(tmp_path, monkeypatch):
  monkeypatch.setattr(preflight.shutil, "disk_usage",
                      lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
  with pytest.raises(preflight.ResourceError, match=r"not enough disk for checkpoints.*1000 B is free"):
    train.run(small_config(num_rounds=1), str(tmp_path))
  # Without checkpoints there is nothing to store.
  train.run(small_config(num_rounds=1, checkpoint_every=0), str(tmp_path / "b"))


def test_memory_preflight_counts_every_replica():
  """Replicas hold one state each; looped they share one round's working memory,
  vmapped every replica's round is live at once."""
  one = preflight.MemoryEstimate(state_bytes=3 * 2**20, population_bytes=2 * 2**20,
                                 per_client_bytes=2**10, round_bytes=5 * 2**20,
                                 num_clients=2048, data_bytes=2**20)
  looped = preflight.for_replicas(one, 4, vmapped=False)
  vmapped = preflight.for_replicas(one, 4, vmapped=True)
  assert looped.device_bytes == (4 * 3 + 5 + 1) * 2**20
  assert vmapped.device_bytes == (4 * 3 + 4 * 5 + 1) * 2**20
  assert "2048 clients x 1.00 KiB x 4 replicas" in looped.describe()
  assert preflight.for_replicas(one, 1, vmapped=True) == one


def test_a_run_written_before_fields_were_added_still_resumes(tmp_path):
  """An older run's config.json lacks fields fml_jax gained since (a new algorithm's
  section, the replicas' settings): they count as their defaults, so it resumes."""
  config = small_config(num_rounds=1, checkpoint_every=1)
  train.run(config, str(tmp_path))
  old = json.loads((tmp_path / "config.json").read_text())
  for field in ("ditto", "seeds", "dp_clip"):
    del old[field]
  (tmp_path / "config.json").write_text(json.dumps(old))
  config.num_rounds = 2
  assert train.run(config, str(tmp_path))["resumed_after_round"] == 1
  # A field that differs from its default is still a different run.
  changed = small_config(num_rounds=2, checkpoint_every=1, seeds=2)
  with pytest.raises(UserError, match=r"seeds: 1 -> 2"):
    train.run(changed, str(tmp_path))
