"""The benchmarks' quick modes run (so they do not rot) and write what they promise."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_TFDS, requires_cifar10, requires_mnist


def test_round_time_quick(tmp_path):
  out = tmp_path / "round_time.json"
  proc = subprocess.run([sys.executable, "benchmarks/round_time.py", "--quick", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| default (synthetic" in proc.stdout
  result = json.loads(out.read_text())
  [workload] = result["workloads"].values()
  for strategy in ("sequential", "vmap"):
    assert workload[strategy]["median_round_s"] > 0
    assert workload[strategy]["first_round_s"] >= workload[strategy]["median_round_s"]
    assert workload[strategy]["rounds_timed"] == 3
  assert result["machine"]["backend"] == "cpu"


@requires_cifar10
def test_round_time_conv_forms_quick(tmp_path):
  out = tmp_path / "forms.json"
  proc = subprocess.run([sys.executable, "benchmarks/round_time.py", "--quick", "--conv_forms",
                         f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600,
                        env=dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS))
  assert proc.returncode == 0, proc.stderr[-2000:]
  [workload] = json.loads(out.read_text())["workloads"].values()
  assert workload.pop("client_steps_per_round_max") > 0
  assert set(workload) == {"as trained", "no im2col", "XLA's kernel only"}
  for variant in workload.values():
    assert variant["median_round_s"] > 0 and variant["rounds_timed"] == 3
  assert "| XLA's kernel only |" in proc.stdout and "1.00x" in proc.stdout


def test_client_scaling_quick(tmp_path):
  out = tmp_path / "scaling"
  proc = subprocess.run([sys.executable, "benchmarks/client_scaling.py", "--quick",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.with_suffix(".json").read_text())
  assert result["complete"] is True
  row = result["results"]["mlp"]["8"]
  for strategy in ("sequential", "vmap", "chunked"):
    assert row[strategy]["client_steps_per_s"] > 0
    assert row[strategy]["gflops"] > 0 and row[strategy]["memory_bytes"] > 0
  # auto is the runner's rule, reported as the strategy it picks (mlp on CPU: vmap).
  assert row["auto"]["resolves_to"] == "vmap"
  assert row["auto"]["round_s"] == row["vmap"]["round_s"]
  assert result["machine"]["matmul_peak_gflops"] > 0
  table = out.with_suffix(".md").read_text()
  assert "| mlp | 8 | vmap |" in table and "pytorch loop" in table


def test_replicas_quick(tmp_path):
  out = tmp_path / "replicas.json"
  proc = subprocess.run([sys.executable, "benchmarks/replicas.py", "--quick", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| 2 | vmap | vmap |" in proc.stdout and "| 2 | separate_vmap | vmap |" in proc.stdout
  result = json.loads(out.read_text())
  assert sorted(result["replicas"]) == ["1", "2"]
  for count, row in result["replicas"].items():
    assert row["separate"]["per_replica_s"] == row["separate"]["median_round_s"]
    for mode in ("loop", "vmap"):
      assert row[mode]["rounds_timed"] == 2
      assert row[mode]["per_replica_s"] * int(count) == pytest.approx(row[mode]["median_round_s"])
      assert row[mode]["speedup_vs_separate"] == pytest.approx(
          row["separate"]["per_replica_s"] / row[mode]["per_replica_s"])
    assert row["vmap"]["speedup_vs_separate_vmap"] == pytest.approx(
        row["separate_vmap"]["per_replica_s"] / row["vmap"]["per_replica_s"])


def test_evaluation_quick(tmp_path):
  out = tmp_path / "evaluation.json"
  proc = subprocess.run([sys.executable, "benchmarks/evaluation.py", "--quick", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  [row] = json.loads(out.read_text())["results"].values()
  assert row["vmap_s"] > 0 and row["one_at_a_time_s"] > 0
  assert row["max_accuracy_difference"] < 1e-6   # the same scores either way


@requires_mnist
def test_vs_pytorch_quick(tmp_path):
  out = tmp_path / "vs_pytorch.json"
  proc = subprocess.run([sys.executable, "benchmarks/vs_pytorch.py", "--quick", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["complete"] is True and sorted(result["jobs"]) == ["fedavg_mnist_cnn",
                                                                   "fml_mnist_mlp"]
  for name, job in result["jobs"].items():
    # 2 clients of 128 examples, batch 64: 2 steps each.
    assert job["job"]["client_steps_per_round"] == 4 and job["job"]["examples"] == 256
    assert job["fml_jax_strategy"] in ("sequential", "vmap")
    sides = ["fml_jax"] + (["pytorch_loop"] if result["machine"]["torch"] else [])
    for side in sides:
      assert len(job[side]["rounds_s"]) == 3
      assert job[side]["median_round_s"] == pytest.approx(sorted(job[side]["rounds_s"][1:])[0]
                                                          / 2 + sorted(job[side]["rounds_s"][1:])[1] / 2)
      assert 0.0 <= job[side]["global_test_acc"] <= 1.0
    if result["machine"]["torch"]:
      assert job["speedup"] == pytest.approx(job["pytorch_loop"]["median_round_s"]
                                             / job["fml_jax"]["median_round_s"])
      assert f"| {name} | 4 |" in proc.stdout
    else:
      assert "skipped: torch is not installed" in proc.stdout


def _conv_layers_module():
  sys.path.insert(0, str(REPO / "benchmarks"))
  import conv_layers  # pylint: disable=g-import-not-at-top
  return conv_layers


def test_conv_layers_finds_every_convolution_and_times_it(tmp_path):
  conv_layers = _conv_layers_module()
  # LeNet-5: SAME 5x5 (pads 2) on 32x32x3, pool, VALID 5x5 on 16x16x6; the FedAvg CNN: two
  # SAME 5x5; the official FML CNN: three VALID 3x3 (30 -> 15 -> 13 -> 6 -> 4).
  assert conv_layers.conv_layers("lenet5", (32, 32, 3), 4) == [
      {"input": (4, 32, 32, 3), "kernel": (5, 5, 3, 6), "padding": ((2, 2), (2, 2))},
      {"input": (4, 16, 16, 6), "kernel": (5, 5, 6, 16), "padding": ((0, 0), (0, 0))}]
  assert [(l["input"], l["kernel"]) for l in conv_layers.conv_layers("cnn", (28, 28, 1), 2)] == [
      ((2, 28, 28, 1), (5, 5, 1, 32)), ((2, 14, 14, 32), (5, 5, 32, 64))]
  assert [l["input"][1:] for l in conv_layers.conv_layers("fml_cnn", (32, 32, 3), 2)] == [
      (32, 32, 3), (15, 15, 32), (6, 6, 64)]
  out = tmp_path / "conv_layers.json"
  conv_layers.main(["--quick", "--no_torch", f"--out={out}"])
  result = json.loads(out.read_text())
  assert result["batch_size"] == 8 and len(result["layers"]) == 2
  assert result["matmul"]["size"] == 256 and result["matmul"]["gflops"] > 0
  assert 1 <= result["usable_cores"] <= result["machine"]["cores"]
  # LeNet-5's first layer at batch 8: 8 x 32 x 32 outputs x 6 channels x 75 multiply-adds.
  assert result["layers"][0]["gflop"] == pytest.approx(2 * 8 * 32 * 32 * 6 * 75 / 1e9)
  assert result["layers"][1]["gflop"] == pytest.approx(2 * 8 * 12 * 12 * 16 * 150 / 1e9)
  for layer in result["layers"]:
    assert set(layer["fml_jax_ms"]) == {"forward", "dx", "dw", "plain_forward", "grid_forward",
                                         "im2col_forward", "plain_dw", "im2col_dw"}
    assert all(ms > 0 for ms in layer["fml_jax_ms"].values())
    assert "torch_ms" not in layer


def test_conv_layers_times_pytorch_on_the_same_convolution():
  torch = pytest.importorskip("torch", reason="PyTorch is optional (benchmarks)")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fml_jax import conv  # pylint: disable=g-import-not-at-top
  conv_layers = _conv_layers_module()
  for layer in conv_layers.conv_layers("lenet5", (32, 32, 3), 2):
    x = np.random.default_rng(0).normal(size=layer["input"]).astype(np.float32)
    w = np.random.default_rng(1).normal(size=layer["kernel"]).astype(np.float32)
    ours = np.asarray(conv.conv_nhwc(x, w, layer["padding"]))
    theirs = conv_layers.torch_conv(torch, layer)(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(w.transpose(3, 2, 0, 1)))
    np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), ours, rtol=1e-4, atol=1e-4)
    timed = conv_layers.time_torch(torch, layer, calls=2)
    assert set(timed) == {"forward", "dx", "dw"} and all(t >= 0 for t in timed.values())
