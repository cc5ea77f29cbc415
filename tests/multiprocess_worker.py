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


def write_the_compilation_cache_from_every_process():
  """JAX writes its persistent compilation cache from process 0 only (to spare shared
  filesystems concurrent writes), and the other processes' programs have cache keys of
  their own, so process 1 would compile its whole round again on every test run while
  process 0 waits for it in the first collective. Here every process writes its own
  entries (test processes share one local folder). A private JAX function: if JAX
  renames it, the tests only get slower."""
  from jax._src import compiler, distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  write = getattr(compiler, "_cache_write", None)
  if write is None or not hasattr(jax_distributed.global_state, "process_id"):
    return

  def write_as_process_0(*args, **kwargs):
    process_id = jax_distributed.global_state.process_id
    jax_distributed.global_state.process_id = 0
    try:
      return write(*args, **kwargs)
    finally:
      jax_distributed.global_state.process_id = process_id

  compiler._cache_write = write_as_process_0  # pylint: disable=protected-access


def main():
  spec = json.loads(sys.argv[1])
  write_the_compilation_cache_from_every_process()
  if spec.get("coordinator"):
    distributed.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"])
    print(distributed.describe(), flush=True)
  for workdir, overrides in spec["cases"]:
    train.run(small_config(**overrides), workdir)
  print("WORKER DONE", flush=True)


if __name__ == "__main__":
  main()
