r"""Command line: run one federated experiment.

  python -m fml_jax.main --config=fml_jax/configs/default.py --workdir=/tmp/fml_default \
      [--config.FIELD=VALUE ...] [--overwrite]

Settings live in the config files (ml_collections); every field can be
overridden on the command line. Mistakes in settings or data end the run with one
line naming the problem (exit status 2), before any training.
"""

import logging as std_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fml_jax.errors import UserError


def _fail(message: str):
  print(f"fml_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _bad_config_flag(error: Exception):
  if isinstance(error, (KeyError, AttributeError)):
    text = str(error).encode().decode("unicode_escape")
    names = re.findall(r"[A-Za-z_][\w.]*", text)
    name = names[0] if names else text
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    from fml_jax.settings import RENAMED  # pylint: disable=g-import-not-at-top
    renamed = RENAMED.get(name.split(".")[-1])
    suggestion = (f"did you mean {renamed!r}? (settings of one algorithm now live in its "
                  "section) " if renamed else f"did you mean {hint.group(1)!r}? " if hint else "")
    _fail(f"config has no field {name!r} (from a --config.{name}=... override); {suggestion}"
          "the fields are listed in fml_jax/configs/default.py")
  detail = " ".join(str(error).split())
  _fail(f"--config: could not load the config or apply an override: {detail}")


# ml_collections applies --config.FIELD overrides while the flag is defined, so an
# unknown field fails here, at import, rather than during flag parsing.
try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "fml_jax/configs/default.py", "Experiment config file (see fml_jax/configs/).",
      lock_config=True)
except Exception as e:  # pylint: disable=broad-except  (any failure here is the user's input)
  _bad_config_flag(e)

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and "
                               "summary.json.", required=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Across hosts, on a cluster JAX "
                                  "detects (SLURM, a TPU pod, Open MPI): start JAX's "
                                  "multi-process runtime from the cluster's environment.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Across processes: HOST:PORT of "
                                   "process 0's coordinator (or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Across processes: how many "
                                      "(or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Across processes: this one's number, "
                                   "0 to num_processes - 1 (or JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 20, "Across processes: seconds without a "
                                  "heartbeat before the others stop, naming the lost process.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in "
                               "--workdir instead of refusing to start.")


class _OnlyWarningsFromLibraries(std_logging.Filter):
  """orbax logs every checkpoint step at INFO through absl; keep the console readable."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv):
  """absl's flag parsing, with config mistakes reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (see --helpfull)")
  except (AttributeError, KeyError, TypeError, OSError) as e:
    _bad_config_flag(e)
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("jax").setLevel(std_logging.WARNING)  # backend probing noise
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  from fml_jax import distributed  # pylint: disable=g-import-not-at-top  (after flags: faster --help)
  try:
    across = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto_detect=_DISTRIBUTED.value,
                                    heartbeat_timeout=_HEARTBEAT.value)
  except UserError as e:
    _fail(str(e))
  if across:
    logging.info("%s", distributed.describe())
    if not distributed.is_writer():   # one console: process 0's (the others warn and fail)
      logging.set_verbosity(logging.WARNING)
  from fml_jax import train  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value
    "algorithm" in config  # pylint: disable=pointless-statement  (raises if --config failed to load)
  except OSError as e:
    _bad_config_flag(e)
  try:
    summary = train.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except train.DivergenceError as e:
    print(f"fml_jax: error: {e}", file=sys.stderr)
    sys.exit(3)
  except UserError as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if across and distributed.is_collective_failure(e):
      distributed.stop_after_lost_process(e, _HEARTBEAT.value, _WORKDIR.value)
    raise
  if "points" in summary:   # replicas: mean +- std and a 95% interval per grid point
    from fml_jax import stats  # pylint: disable=g-import-not-at-top
    for point in summary["points"]:
      where = f" {point['sweep']}" if point["sweep"] else ""
      for key in ("global_test_acc", "local_test_acc_mean"):
        if point["final"].get(key, {}).get("n"):
          logging.info("done%s, final %s over seeds %s: %s", where, key, point["seeds"],
                       stats.describe(point["final"][key]))
    logging.info("results in %s", _WORKDIR.value)
    return
  final = summary["final"] or {}
  logging.info("done: final global acc %s, personalized acc %s; results in %s",
               final.get("global_test_acc"), final.get("local_test_acc_mean"), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
