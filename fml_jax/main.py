r"""Command line: run one federated experiment.

  python -m fml_jax.main --config=fml_jax/configs/default.py --workdir=/tmp/fml_default \
      [--config.FIELD=VALUE ...] [--overwrite]

Settings live in the config files (ml_collections); every field can be
overridden on the command line. Mistakes in settings or data end the run with one
line naming the problem (exit status 2), before any training.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fml_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "fml_jax/configs/default.py", "Experiment config file (see fml_jax/configs/).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and "
                               "summary.json.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in "
                               "--workdir instead of refusing to start.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  from fml_jax import train  # pylint: disable=g-import-not-at-top  (after flags: faster --help)
  try:
    summary = train.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except UserError as e:
    print(f"fml_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  final = summary["final"] or {}
  logging.info("done: final global acc %s, personalized acc %s; results in %s",
               final.get("global_test_acc"), final.get("local_test_acc_mean"), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
