"""A method from outside the package (examples/fedavg_clip.py), named on the command
line as module:Class, runs like a registered one; the debug executor names the client
and stage of an error."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, small_config
from fml_jax import algorithms, config_checks, settings
from fml_jax.algorithms.fedavg import FedAvg
from fml_jax.data import load_federated_data
from fml_jax.rounds import Runner
from fml_jax.rounds.executors import RoundStageError
from test_rounds import assert_trees_close, run_grouped_rounds

PLUGIN = "examples.fedavg_clip:FedAvgClip"


def plugin_config(**extra):
  config = small_config(algorithm=PLUGIN)
  config_checks.validate(config)   # imports, registers and adds the section's defaults
  cls = algorithms.resolve(PLUGIN)
  return settings.apply_overrides(config, {**cls.small_overrides(), **extra})


def test_module_class_is_imported_registered_and_runs_like_a_builtin():
  config = plugin_config()
  assert config.fedavg_clip.max_norm == 0.05
  assert algorithms.ALGORITHMS[PLUGIN].name == "fedavg_clip"
  _, sequential, seq_metrics = run_grouped_rounds(config, "sequential", 2)
  _, vmapped, vmap_metrics = run_grouped_rounds(config, "vmap", 2)
  assert_trees_close(vmapped.server, sequential.server)
  assert_trees_close(vmap_metrics, seq_metrics)
  assert seq_metrics[0]["clipped"] > 0   # the clip is active at this norm


def test_plugin_runs_from_the_command_line_with_its_own_section(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fml_jax.main", "--config=examples/fedavg_clip.py",
       f"--workdir={tmp_path}", "--config.fedavg_clip.max_norm=0.5", "--config.num_rounds=1",
       "--config.num_clients=6", "--config.clients_per_round=3",
       "--config.synthetic_max_client_examples=60", "--config.checkpoint_every=0"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "summary.json").exists()
  assert '"update_norm"' in (tmp_path / "metrics.jsonl").read_text()


class FailsOnClientThree(FedAvg):
  name = "fails_on_client_three"

  def client_update(self, server_state, client_state, client, data, group):
    if int(client.id) == 3:   # concrete: the debug executor runs without jit
      raise FloatingPointError("boom")
    return super().client_update(server_state, client_state, client, data, group)


def test_debug_executor_equals_sequential_and_names_the_failing_client():
  config = small_config(algorithm="fedavg", clients_per_round=3, local_epochs=1)
  _, debug, debug_metrics = run_grouped_rounds(config, "debug", 1)
  _, sequential, seq_metrics = run_grouped_rounds(config, "sequential", 1)
  assert_trees_close(debug.server, sequential.server, rtol=1e-5, atol=1e-6)
  assert_trees_close(debug_metrics, seq_metrics, rtol=1e-5, atol=1e-6)

  config = small_config(algorithm="fedavg", clients_per_round=6, local_epochs=1)
  data = load_federated_data(config)
  runner = Runner(FailsOnClientThree(config, data.num_classes, data.input_shape), data, 6,
                  strategy="debug")
  with pytest.raises(RoundStageError, match=r"client_update of client 3 .*FloatingPointError: boom"):
    runner.run_round(runner.init(0))
