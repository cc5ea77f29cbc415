"""The client axis sharded over 4 devices (forced host devices, in a subprocess) and
the chunked strategy give the single-device vmap results."""

import json
import os
import subprocess
import sys

import pytest

from fml_jax.errors import ConfigError

from conftest import REPO, small_config
from test_engine import assert_trees_close, run_rounds

SHARDED_RUN = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from conftest import small_config
from fml_jax.algorithms import build_algorithm
from fml_jax.data import load_federated_data
from fml_jax.engine import Engine, client_mesh

assert len(jax.devices()) == 4, jax.devices()
out = {}
for algorithm in ["fml", "fedavg", "local", "fedmr"]:
  results = {}
  for devices in (1, 4):
    c = small_config(algorithm=algorithm, num_clients=8, clients_per_round=4)
    data = load_federated_data(c)
    engine = Engine(build_algorithm(c, data.num_classes, data.input_shape), data, 4,
                    strategy="vmap", mesh=client_mesh(devices))
    state = engine.init(c.seed)
    engine.compile(engine.abstract_state(c.seed))
    for _ in range(2):
      state, report = engine.run_round(state)
    leaves = jax.tree.leaves(state.population)
    sharded = [str(getattr(leaves[0].sharding, "spec", None))] if leaves else []
    results[devices] = (jax.device_get(state), sharded)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[1][0], results[4][0])
  out[algorithm] = {"max_abs_diff": max(jax.tree.leaves(diffs)), "spec": results[4][1]}
print("RESULT " + json.dumps(out))
"""


def test_sharded_over_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", SHARDED_RUN], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [line] = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  result = json.loads(line[len("RESULT "):])
  for algorithm, r in result.items():
    assert r["max_abs_diff"] < 1e-4, (algorithm, r)
  assert "clients" in result["fml"]["spec"][0]   # the population is split by client


@pytest.mark.parametrize("algorithm", ["fml", "fedmr"])
def test_chunked_equals_vmap(algorithm):
  # 4 clients in chunks of 3: two chunks, the second padded with a copy and trimmed.
  config = small_config(algorithm=algorithm, clients_per_round=4, chunk_size=3)
  vmap_state, vmap_metrics = run_rounds(config, "vmap", 2)
  chunked_state, chunked_metrics = run_rounds(config, "chunked", 2)
  assert_trees_close(vmap_state.server, chunked_state.server)
  assert_trees_close(vmap_state.population, chunked_state.population)
  assert_trees_close(vmap_metrics, chunked_metrics)


def test_mesh_must_divide_the_client_axis():
  from fml_jax.engine import client_mesh  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="mesh_shape"):
    client_mesh(64)   # more devices than this machine has
