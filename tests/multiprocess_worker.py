"""One process of a run across processes, for tests/test_multiprocess.py.

  python tests/multiprocess_worker.py '{"coordinator": "127.0.0.1:PORT", "num_processes": 2,
      "process_id": 0, "cases": [[WORKDIR, {OVERRIDES}], ...]}'

Joins the other processes (none without "coordinator"), then runs each case's small
experiment (`small_config(**overrides)`) with `train.run`, as `python -m fml_jax.main`
would, one after another in this one program (joining once, importing once).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import small_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from fml_jax import distributed, train  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  spec = json.loads(sys.argv[1])
  if spec.get("coordinator"):
    distributed.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"])
    print(distributed.describe(), flush=True)
  for workdir, overrides in spec["cases"]:
    train.run(small_config(**overrides), workdir)
  print("WORKER DONE", flush=True)


if __name__ == "__main__":
  main()
