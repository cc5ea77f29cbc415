"""Runs across processes: JAX's multi-controller runtime, one process per host.

Every process runs the same program on the same config and data; the client axis is
sharded over every process's devices (a global `Mesh`), and each process holds only
its own shards of the population. Process 0 writes the run's files; every process
writes and restores its shards of the checkpoints.

  initialize(...)    connects the processes (explicit coordinator, JAX's environment
                     variables, or a detected cluster), with gloo collectives on the CPU
  describe()         the start line: this process, its devices, the whole set
  is_writer()        whether this process writes the run's files (process 0)
  agree(value)       process 0's small integer, on every process
  check_same_config  every process started with the same settings, or one line naming them

When a process dies, JAX's coordination service notices its missing heartbeats and
stops every other process (non-zero exit, naming the lost task) within
`heartbeat_timeout` seconds; the run resumes from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np

from fml_jax.errors import UserError

# Seconds without a heartbeat before the others give a process up (JAX's default is
# 100; a lost process should not hold the rest of the run for long).
DEFAULT_HEARTBEAT_TIMEOUT = 20
# Seconds a finished (or failed) process waits at exit for the others to finish too:
# a process that failed alone (its dataset missing, say) leaves within this, and the
# others then stop when its heartbeats do (JAX's default is 300).
SHUTDOWN_TIMEOUT = 30
# Seconds every process waits for all of them to connect.
DEFAULT_INIT_TIMEOUT = 120
# The variables a launcher may set instead of the flags (JAX reads the first itself).
ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _check_port_free(address: str) -> None:
  """Process 0 runs the coordinator on `address`: a port already taken is reported here
  in one line instead of deep inside the runtime."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address={address!r} is not HOST:PORT")
  with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host.strip("[]"), int(port)))
    except OSError as e:
      raise UserError(f"process 0 runs the coordinator on {address}, but that port cannot be "
                      f"used ({e.strerror or e}); is another run (or another process 0) "
                      "using it? Pick a free --coordinator_address port") from None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto_detect: bool = False,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
               init_timeout: int = DEFAULT_INIT_TIMEOUT) -> bool:
  """Connects this process to the others. Settings not given are read from
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; with none at all,
  `auto_detect` leaves them to JAX's cluster detection (SLURM, TPU pods, Open MPI).
  Returns whether a multi-process runtime was started (False: a single process)."""
  coordinator_address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit) and not auto_detect:
    return False
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    missing = [name for name, v in zip(("--coordinator_address", "--num_processes",
                                        "--process_id"), explicit) if v is None]
    raise UserError(f"a run across processes needs all of --coordinator_address, "
                    f"--num_processes and --process_id (or {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, "
                    f"{ENV_PROCESS_ID}); missing: {', '.join(missing)}")
  if num_processes is not None:
    if num_processes < 1:
      raise UserError(f"--num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} is not between 0 and num_processes - 1 = "
                      f"{num_processes - 1} (processes are numbered from 0)")
    if process_id == 0:
      _check_port_free(coordinator_address)
  # CPU collectives between processes go through gloo (no effect on GPU/TPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
  except Exception as e:  # pylint: disable=broad-except  (the runtime's errors are long)
    detail = " ".join(str(e).split())[:400]
    if "DEADLINE_EXCEEDED" in detail or "timed out" in detail.lower():
      raise UserError(f"process {process_id}: not every one of the {num_processes} processes "
                      f"connected to the coordinator at {coordinator_address} within "
                      f"{init_timeout} s (start all of them, each with its own --process_id)"
                      ) from None
    if "already" in detail.lower() and "initialize" in detail.lower():
      raise
    raise UserError(f"could not join the run's processes at {coordinator_address} as process "
                    f"{process_id} of {num_processes}: {type(e).__name__}: {detail}") from None
  return True


def process_count() -> int:
  return jax.process_count()


def is_writer() -> bool:
  """Whether this process writes the run's files (config, metrics, TensorBoard, summary)."""
  return jax.process_index() == 0


def describe() -> str:
  local = ", ".join(str(d) for d in jax.local_devices())
  return (f"process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}: "
          f"local devices [{local}]; {jax.device_count()} devices in all "
          f"({jax.default_backend()})")


def agree(value: int) -> int:
  """Process 0's `value` (a small integer) on every process; `value` itself when alone."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_processes(flag: bool) -> list[bool]:
  """Every process's `flag`, in process order."""
  if jax.process_count() == 1:
    return [bool(flag)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [bool(f) for f in np.asarray(multihost_utils.process_allgather(np.int32(flag)))]


def _digest_words(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.int32).copy()


def check_same_config(config: dict) -> None:
  """Stops every process with one line when any was started with other settings than
  process 0 (their runs would silently differ, or hang in a collective)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = json.dumps(config, sort_keys=True)
  digests = np.asarray(multihost_utils.process_allgather(_digest_words(text)))
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise UserError(f"the processes were started with different settings: process(es) "
                    f"{differ} differ from process 0 (this is process {jax.process_index()}); "
                    "start every process with the same --config and --config.* flags")


def check_shared_workdir(path) -> None:
  """Every process must see the workdir process 0 prepared (checkpoints are written by all
  of them into one folder): a token written by process 0 is read back by each."""
  if jax.process_count() == 1:
    return
  token = agree(int(time.time_ns() % (2**31 - 1)) if is_writer() else 0)
  marker = path / ".processes"
  if is_writer():
    marker.write_text(str(token))
  agree(0)   # a barrier: process 0 has written it
  seen = marker.exists() and marker.read_text().strip() == str(token)
  if not seen:   # a slow network filesystem: give it a moment
    time.sleep(2)
    seen = marker.exists() and marker.read_text().strip() == str(token)
  everyone = all_processes(seen)
  if not all(everyone):
    blind = [p for p, ok in enumerate(everyone) if not ok]
    raise UserError(f"process(es) {blind} do not see the workdir {path} as process 0 wrote it; "
                    "a run across processes needs its --workdir on a filesystem every process "
                    "shares (checkpoints are written by all of them into one folder)")


def is_collective_failure(error: BaseException) -> bool:
  """Whether `error` is the runtime's report of a failed collective between processes
  (a peer's connection reset: the peer died)."""
  return jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)


def _lost_processes(wait_seconds: float) -> Optional[list[int]]:
  """The processes the coordination service no longer counts as alive, asked once a
  collective failed. It answers when the lost ones' heartbeats have timed out; None if
  it cannot tell within `wait_seconds`."""
  answer = []

  def ask():
    try:
      client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
      answer.append(set(client.get_live_nodes(list(range(jax.process_count())))))
    except Exception:  # pylint: disable=broad-except  (the runtime may be going down)
      pass
  asking = threading.Thread(target=ask, daemon=True)
  asking.start()
  asking.join(wait_seconds)
  return sorted(set(range(jax.process_count())) - answer[0]) if answer else None


def stop_after_lost_process(error: BaseException, heartbeat_timeout: int, workdir: str) -> None:
  """One line naming the lost process(es) when a collective failed because a process
  died, then exit status 4. The name comes from JAX's coordination service once the
  lost process's heartbeats time out (if the service ends this process first, its own
  line names the lost task)."""
  detail = " ".join(str(error).split())[:200]
  lost = _lost_processes(heartbeat_timeout + 10)
  who = (f"process(es) {lost} of {jax.process_count()} were lost" if lost
         else "another process was lost")
  print(f"fml_jax: error: {who} (process {jax.process_index()}: a collective failed: {detail}). "
        f"Start every process again with the same command: the run resumes from its last "
        f"complete checkpoint in {workdir}", file=sys.stderr, flush=True)
  os._exit(4)   # skip the shutdown barrier, which the lost process can never reach
