"""TensorBoard event files, the progress display, and `python -m fml_jax.plot`."""

import io
import json
import struct
import subprocess
import sys

import pytest

from fml_jax import plot, reporting, train

from conftest import REPO, small_config


def read_scalars(logdir) -> dict:
  """{tag: {step: value}} from tensorboardX event files (TFRecord framing, read by hand:
  no TensorFlow or tensorboard package needed)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for name, overrides in (("fml", {}), ("fedavg", {"algorithm": "fedavg"})):
    train.run(small_config(num_rounds=3, checkpoint_every=0, **overrides), str(root / name))
  return root


def test_tensorboard_scalars_match_metrics_jsonl(two_runs):
  metrics = [json.loads(l) for l in open(two_runs / "fml" / "metrics.jsonl")]
  scalars = read_scalars(two_runs / "fml" / reporting.TENSORBOARD_DIR)
  for key in ("global_test_acc", "local_test_acc_mean", "train_loss", "bytes_up"):
    assert sorted(scalars[key]) == [1, 2, 3]
    for record in metrics:
      assert scalars[key][record["round"]] == pytest.approx(record[key], rel=1e-6)


def test_progress_plain_lines_have_rate_and_eta(caplog):
  progress = reporting.Progress(0, 4, stream=io.StringIO())   # not a terminal
  record = {"global_test_acc": 0.5, "global_test_loss": 1.0, "local_test_acc_mean": 0.6,
            "local_test_acc_min": 0.1, "local_test_acc_max": 0.9, "train_loss": 0.3,
            "round_seconds": 0.01}
  with caplog.at_level("INFO"):
    progress.round_done(1, None)
    progress.round_done(2, record)
  [line] = [r.getMessage() for r in caplog.records if "round 2/4" in r.getMessage()]
  assert "rounds/s, ETA 0:00:" in line and "personalized acc 0.6000" in line


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_on_a_terminal_is_a_bar():
  stream = FakeTerminal()
  progress = reporting.Progress(1, 5, stream=stream)   # resumed after round 1
  progress.round_done(2, {"global_test_acc": 0.5, "local_test_acc_mean": 0.75})
  progress.close()
  text = stream.getvalue()
  assert "2/5" in text and "personalized 0.750" in text and "round/s" in text


def test_legend_names_the_fields_that_differ():
  labels = plot.legend_labels([
      {"algorithm": "fml", "alpha": 0.5, "seed": 0, "data_dir": "/a"},
      {"algorithm": "fml", "alpha": 0.3, "seed": 0, "data_dir": "/b"},
      {"algorithm": "local", "alpha": 0.5, "seed": 0, "data_dir": "/a"}])
  assert labels == ["fml, alpha=0.5", "fml, alpha=0.3", "local, alpha=0.5"]


def test_plot_command_writes_a_png(two_runs, tmp_path):
  out = tmp_path / "figs" / "cmp.png"
  proc = subprocess.run([sys.executable, "-m", "fml_jax.plot", str(two_runs / "fml"),
                         str(two_runs / "fedavg"), "--out", str(out), "--title", "t"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
  assert not list(out.parent.glob(".*tmp*"))


def test_plot_refuses_a_folder_that_is_not_a_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "fml_jax.plot", str(tmp_path), "--out",
                         str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert "is not a run folder" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "x.png").exists()
