"""The client axis sharded over 4 devices (forced host devices, in a subprocess) and
the chunked strategy give the single-device vmap results."""

import json
import os
import subprocess
import sys

import pytest

from fml_jax.errors import ConfigError

from conftest import REPO, small_config
from test_rounds import assert_trees_close, run_rounds

SHARDED_RUN = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from conftest import small_config
from fml_jax.algorithms import build_algorithm
from fml_jax.data import load_federated_data
from fml_jax.rounds import Runner, client_mesh

assert len(jax.devices()) == 4, jax.devices()
from fml_jax.algorithms import ALGORITHMS, BUILTIN

out = {}
# Every registered algorithm with its own small config on 8 clients: the whole population
# each round when it has architecture groups (groups of 4), half of it otherwise; and
# "_host": two groups of 6 in host memory (CPU device 0; not a multiple of 4: it is not
# sharded), 4 of each per round moved to and sharded over the 4 devices and back.
cases = [(cls.name, cls.name) for cls in BUILTIN]
cases.append(("fml_groups_host", "fml"))
for case, name in cases:
  results = {}
  for devices in (1, 4):
    host = case.endswith("_host")
    c = small_config(algorithm=name, **{**ALGORITHMS[name].small_overrides(),
                                        "num_clients": 12 if host else 8})
    grouped = len(set(ALGORITHMS[name](c, 10, (60,)).client_groups(c.num_clients).tolist())) > 1
    c.clients_per_round = 8 if host or grouped else 4
    data = load_federated_data(c)
    runner = Runner(build_algorithm(c, data.num_classes, data.input_shape), data,
                    c.clients_per_round, strategy="vmap", mesh=client_mesh(devices),
                    placement="host" if host and devices > 1 else "device")
    state = runner.warm_start(runner.init(c.seed))
    runner.compile(runner.abstract_state(c.seed))
    for _ in range(2):
      state, report = runner.run_round(state)
    leaves = jax.tree.leaves(state.population)
    sharded = ([str(getattr(leaves[0].sharding, "spec", leaves[0].sharding))] if leaves
               else [])
    results[devices] = (jax.device_get(state), sharded)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))),
                       results[1][0], results[4][0])
  out[case] = {"max_abs_diff": max(jax.tree.leaves(diffs)), "spec": results[4][1]}
print("RESULT " + json.dumps(out))
"""


def test_sharded_over_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=4",
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", SHARDED_RUN], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [line] = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  result = json.loads(line[len("RESULT "):])
  for algorithm, r in result.items():
    assert r["max_abs_diff"] < 1e-4, (algorithm, r)
  assert {"fml", "fedavg", "fedprox", "local", "fedmr", "fedmd", "fedh2l"} <= set(result)
  assert "clients" in result["fml"]["spec"][0]   # the population is split by client
  assert "clients" in result["local"]["spec"][0]
  assert "TFRT_CPU_0" in result["fml_groups_host"]["spec"][0] or "id=0" in (
      result["fml_groups_host"]["spec"][0])   # the host store stays on CPU device 0


@pytest.mark.parametrize("algorithm", ["fml", "fedmr"])
def test_chunked_equals_vmap(algorithm):
  # 4 clients in chunks of 3: two chunks, the second padded with a copy and trimmed.
  config = small_config(algorithm=algorithm, clients_per_round=4, chunk_size=3)
  vmap_state, vmap_metrics = run_rounds(config, "vmap", 2)
  chunked_state, chunked_metrics = run_rounds(config, "chunked", 2)
  assert_trees_close(vmap_state.server, chunked_state.server)
  assert_trees_close(vmap_state.population, chunked_state.population)
  assert_trees_close(vmap_metrics, chunked_metrics)


def test_mesh_must_divide_every_groups_share():
  import types  # pylint: disable=g-import-not-at-top
  from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
  from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
  from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top
  c = small_config(local_models="mlp,mlp_small", clients_per_round=6)   # groups of 3
  data = load_federated_data(c)
  two_devices = types.SimpleNamespace(size=2)   # the check needs only the mesh's size
  with pytest.raises(ConfigError, match=r"per architecture group\) must be a multiple of 2"):
    Runner(build_algorithm(c, data.num_classes, data.input_shape), data, 6, mesh=two_devices)


def test_mesh_must_divide_the_client_axis():
  from fml_jax.rounds import client_mesh  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="mesh_shape"):
    client_mesh(64)   # more devices than this machine has
