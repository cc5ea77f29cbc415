"""Bad settings through the real command line: each exits non-zero, before training, with
one readable line naming the setting, and no traceback."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_TFDS, has_tfds_dataset, requires_mnist

MNIST = ["--config.dataset=mnist", "--config.partition=iid"]

BAD_INPUTS = [
    # (id, arguments, text the error line must contain)
    ("alpha_out_of_range", ["--config.fml.alpha=1.5"], "config.fml.alpha"),
    ("beta_negative", ["--config.fml.beta=-0.1"], "config.fml.beta"),
    ("alpha_not_a_number", ["--config.fml.alpha=abc"], "config.fml.alpha"),
    ("num_clients_not_an_int", ["--config.num_clients=2.5"], "config.num_clients"),
    ("num_clients_zero", ["--config.num_clients=0"], "config.num_clients"),
    ("cohort_larger_than_population", ["--config.clients_per_round=31"], "config.clients_per_round"),
    ("cohort_empty", ["--config.clients_per_round=0"], "config.clients_per_round"),
    ("no_rounds", ["--config.num_rounds=0"], "config.num_rounds"),
    ("negative_epochs", ["--config.local_epochs=-1"], "config.local_epochs"),
    ("batch_size_zero", ["--config.batch_size=0"], "config.batch_size"),
    ("learning_rate_zero", ["--config.learning_rate=0"], "config.learning_rate"),
    ("momentum_one", ["--config.momentum=1.0"], "config.momentum"),
    ("weight_decay_negative", ["--config.weight_decay=-1"], "config.weight_decay"),
    ("temperature_zero", ["--config.fml.temperature=0"], "config.fml.temperature"),
    ("prox_mu_negative", ["--config.fedprox.mu=-1"], "config.fedprox.mu"),
    ("eval_every_zero", ["--config.eval_every=0"], "config.eval_every"),
    ("seed_negative", ["--config.seed=-1"], "config.seed"),
    ("checkpoint_every_negative", ["--config.checkpoint_every=-1"], "config.checkpoint_every"),
    ("unknown_algorithm", ["--config.algorithm=fedsgd"], "config.algorithm"),
    ("unknown_model", ["--config.model=resnet"], "config.model"),
    ("unknown_local_model", ["--config.local_models=mlp,vgg"], "config.local_models"),
    ("flat_name_suggests_its_section", ["--config.prox_mu=0.1"], "did you mean 'fedprox.mu'"),
    ("unknown_server_optimizer", ["--config.server.optimizer=lamb"], "config.server.optimizer"),
    ("renamed_field_suggests", ["--config.local_model=mlp"], "did you mean 'local_models'"),
    ("unknown_task", ["--config.client_tasks=full,odd"], "config.client_tasks"),
    ("task_class_out_of_range", ["--config.client_tasks=subset_0-12"], "config.client_tasks"),
    ("bad_schedule", ["--config.fml.alpha_schedule=0:0.5,5"], "config.fml.alpha_schedule"),
    ("schedule_not_from_zero", ["--config.fml.beta_schedule=5:0.5"], "config.fml.beta_schedule"),
    ("catfish_out_of_range", ["--config.catfish_clients=99"], "config.catfish_clients"),
    ("batchnorm_global_model", ["--config.model=fedmd_small_p0"], "config.model"),
    ("fedmd_without_public_set", ["--config.algorithm=fedmd"], "config.public_size"),
    ("unknown_topology", ["--config.algorithm=fedh2l", "--config.public_size=50",
                          "--config.fedh2l.topology=star"], "config.fedh2l.topology"),
    ("too_few_cohort_for_groups", ["--config.local_models=mlp,mlp_small,mlp_wide",
                                   "--config.clients_per_round=2"], "config.clients_per_round"),
    ("unknown_optimizer", ["--config.optimizer=rmsprop"], "config.optimizer"),
    ("unknown_strategy", ["--config.strategy=pmap"], "config.strategy"),
    ("unknown_placement", ["--config.placement=disk"], "config.placement"),
    ("unknown_aggregation", ["--config.aggregation=median"], "config.aggregation"),
    ("unknown_fedmr_granularity", ["--config.fedmr.granularity=row"], "config.fedmr.granularity"),
    ("unknown_field", ["--config.nosuchfield=1"], "nosuchfield"),
    ("missing_config_file", ["--config=fml_jax/configs/nosuch.py"], "--config"),
    ("synthetic_with_iid", ["--config.partition=iid"], "config.partition"),
    ("mnist_with_natural", ["--config.dataset=mnist"], "config.partition"),
    ("dirichlet_alpha_zero", MNIST[:1] + ["--config.partition=dirichlet",
                                          "--config.dirichlet_alpha=0"], "config.dirichlet_alpha"),
    ("model_does_not_fit_input", ["--config.model=cnn"], "config.model"),
    ("unknown_dataset", ["--config.dataset=no_such_dataset_xyz", "--config.partition=iid"],
     "config.dataset"),
    ("missing_data_dir", MNIST + ["--config.data_dir=/nonexistent/tfds"], "config.data_dir"),
    ("too_many_shards", MNIST[:1] + ["--config.partition=shards", "--config.num_clients=40000",
                                     "--config.shards_per_client=2"], "config.shards_per_client"),
    ("impossible_dirichlet", MNIST[:1] + ["--config.partition=dirichlet",
                                          "--config.num_clients=6000",
                                          "--config.dirichlet_min_examples=20"],
     "config.dirichlet_min_examples"),
    ("iid_more_clients_than_examples", MNIST + ["--config.num_clients=70000"],
     "config.num_clients"),
    ("unwritable_workdir", ["--workdir=/proc/fml_jax_cannot_write_here"], "--workdir"),
]

# Cases whose setting is checked against the loaded dataset (its size, its labels), so
# they reach that check only where mnist is prepared; elsewhere they would stop at
# "dataset 'mnist' is not prepared" instead, so they are skipped (and not run). The
# other mnist cases fail before any data is read: mnist_with_natural and
# dirichlet_alpha_zero in the config checks, missing_data_dir at the data_dir lookup.
NEEDS_MNIST = {"too_many_shards", "impossible_dirichlet", "iid_more_clients_than_examples"}
assert NEEDS_MNIST <= {name for name, _, _ in BAD_INPUTS}


def _runnable(name):
  return name not in NEEDS_MNIST or has_tfds_dataset("mnist")


# Each case is `python -m fml_jax.main ARGS`, exactly: its own process, its own argv, the
# module run as __main__ (runpy, as -m does). Starting 53 Pythons that each import jax,
# flax and tfds took minutes of the suite's CPU, so one driver process imports them once
# and forks a child per case. The parent never starts a JAX backend (checked), so each
# child starts its own as a fresh process would.
_DRIVER = r"""
import json, os, runpy, sys
import fml_jax.train, fml_jax.algorithms, tensorflow_datasets   # the slow imports, once
from jax._src import xla_bridge
assert not xla_bridge._backends, "the driver must not start a JAX backend before forking"
cases = json.loads(sys.argv[1])
for case in cases:
  pid = os.fork()
  if pid == 0:   # the child: `python -m fml_jax.main *args` with stdout/stderr to files
    code = 1
    try:
      for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
      sys.argv = ["fml_jax.main", *case["args"]]
      runpy.run_module("fml_jax.main", run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:   # an uncaught exception: its traceback, as Python would print it
      import traceback
      traceback.print_exc()
    finally:
      sys.stdout.flush(); sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  with open(case["returncode"], "w") as f:
    f.write(str(os.waitstatus_to_exitcode(status)))
"""


def _run_cases(cases, root):
  """{name: CompletedProcess-like} of `python -m fml_jax.main` for each (name, args)."""
  spec = []
  for name, args in cases:
    workdir = root / name / "run"
    workdir.parent.mkdir(parents=True)
    if not any(a.startswith("--workdir") for a in args):
      args = [f"--workdir={workdir}"] + args
    spec.append({"args": args, **{k: str(root / name / k) for k in
                                  ("stdout", "stderr", "returncode")}})
  driver = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS))
  assert driver.returncode == 0, driver.stderr[-3000:]
  return {name: subprocess.CompletedProcess(
      case["args"], int(open(case["returncode"]).read()), open(case["stdout"]).read(),
      open(case["stderr"]).read()) for (name, _), case in zip(cases, spec)}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  cases = [(name, args) for name, args, _ in BAD_INPUTS if _runnable(name)]
  procs = _run_cases(cases, root)
  return {name: (procs[name], root / name / "run") for name, _ in cases}


def test_the_driver_is_the_real_command_line(tmp_path):
  # One case through a plain `python -m fml_jax.main`, the way a user types it: the same
  # exit status and error line as the forked child gives.
  args = ["--config.fml.alpha=1.5"]
  real = subprocess.run([sys.executable, "-m", "fml_jax.main", f"--workdir={tmp_path / 'a'}",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TFDS_DATA_DIR=SHARED_TFDS))
  forked = _run_cases([("alpha", args)], tmp_path / "forked")["alpha"]
  assert real.returncode == forked.returncode == 2
  line = lambda p: [l for l in p.stderr.splitlines() if l.startswith("fml_jax: error:")]
  assert line(real) == line(forked) and len(line(real)) == 1


@pytest.mark.parametrize("name,expected", [
    pytest.param(i, e, id=i, marks=[requires_mnist] if i in NEEDS_MNIST else [])
    for i, _, e in BAD_INPUTS])
def test_bad_input_exits_with_one_line(outcomes, name, expected):
  proc, workdir = outcomes[name]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fml_jax: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert expected in errors[0]
  assert not (workdir / "metrics.jsonl").exists()


def test_the_table_is_large_enough():
  assert len(BAD_INPUTS) >= 25
