"""Reading a prepared tfds image-classification dataset into numpy, without TensorFlow.

`tfds.data_source` gives random access to array_record files; we decode every
example once and keep uint8 images, so the whole dataset can then live on the
accelerator (MNIST: 47 MB, CIFAR-10: 150 MB).

Decoding takes seconds in every process (benchmarks/RESULTS.md, "The test suite's
time"), so the decoded arrays are kept on disk, in `$FML_JAX_DATA_CACHE` (default
`~/.cache/fml_jax/decoded`; `off` turns it off), keyed by the prepared files' names,
sizes and modification times: a re-prepared dataset is decoded again. Reading them
back takes well under a second. A cache that cannot be written is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from fml_jax.errors import DataError

_DECODE_CHUNK = 4096
# Bump when what is stored changes, so old entries are not read.
_CACHE_FORMAT = 1
_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "num_classes")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  x_train: np.ndarray  # (N, H, W, C) uint8
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def resolve_data_dir(data_dir: str) -> tuple[str, str]:
  """The tfds data_dir to read and where that choice came from (for error messages)."""
  if data_dir:
    return os.path.expanduser(data_dir), "config.data_dir"
  if os.environ.get("TFDS_DATA_DIR"):
    return os.path.expanduser(os.environ["TFDS_DATA_DIR"]), "the TFDS_DATA_DIR environment variable"
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return os.path.expanduser(constants.DATA_DIR), "tfds's default data_dir"


def _not_prepared(name: str, data_dir: str, source: str, detail: str) -> DataError:
  return DataError(
      f"dataset '{name}' is not prepared in {data_dir} ({source}): {detail}. "
      "Point fml_jax at a tfds data_dir that holds it in the array_record format with "
      "--config.data_dir=PATH or TFDS_DATA_DIR=PATH (this repository's tests use "
      "../shared/tfds); README.md, 'Preparing a dataset', shows how to make one.")


def _decode_split(source, label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for start in range(0, len(source), _DECODE_CHUNK):
    chunk = source.__getitems__(range(start, min(start + _DECODE_CHUNK, len(source))))
    images.append(np.stack([ex["image"] for ex in chunk]))
    labels.append(np.array([ex[label_key] for ex in chunk], dtype=np.int32))
  return np.concatenate(images), np.concatenate(labels)


def decoded_cache_dir() -> Path | None:
  """Where decoded datasets are kept, or None when `FML_JAX_DATA_CACHE=off`."""
  setting = os.environ.get("FML_JAX_DATA_CACHE", "")
  if setting.lower() == "off":
    return None
  if setting:
    return Path(setting).expanduser()
  base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  return base / "fml_jax" / "decoded"


def _cache_file(name: str, folder: Path) -> Path | None:
  """The cache entry of dataset `name` as prepared in `folder` (None: no cache)."""
  root = decoded_cache_dir()
  if root is None:
    return None
  digest = hashlib.sha256(f"{_CACHE_FORMAT} {folder.resolve()}".encode())
  for f in sorted(folder.rglob("*")):
    if f.is_file():
      st = f.stat()
      digest.update(f"{f.relative_to(folder)} {st.st_size} {st.st_mtime_ns}".encode())
  return root / f"{name}-{digest.hexdigest()[:20]}.npz"


def _read_cached(path: Path | None) -> ImageDataset | None:
  if path is None or not path.is_file():
    return None
  try:
    with np.load(path) as stored:
      arrays = {k: stored[k] for k in _ARRAYS}
  except (OSError, ValueError, KeyError) as e:   # damaged: decode again (and rewrite)
    logging.warning("fml_jax: ignoring the decoded-dataset cache %s (%s)", path, e)
    return None
  return ImageDataset(num_classes=int(arrays.pop("num_classes")), **arrays)


def _write_cached(path: Path | None, ds: ImageDataset) -> None:
  """Writes atomically (a temporary file renamed into place), so a reader never sees a
  half-written entry and concurrent writers do not collide."""
  if path is None:
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
      np.savez(f, **{k: getattr(ds, k) for k in _ARRAYS})
    os.replace(f.name, path)
  except OSError as e:
    logging.warning("fml_jax: could not keep the decoded dataset in %s (%s)", path.parent, e)
    try:
      os.unlink(f.name)
    except (OSError, NameError, UnboundLocalError):
      pass


@functools.lru_cache(maxsize=4)
def load_image_dataset(name: str, data_dir: str = "") -> ImageDataset:
  """Decodes the train and test splits of a prepared tfds dataset (cached per process)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  resolved, source = resolve_data_dir(data_dir)
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"config.dataset: unknown dataset '{name}': it is neither 'synthetic' "
                    "nor a tfds dataset name (e.g. mnist, cifar10)") from None
  folder = Path(resolved) / name
  if not folder.is_dir():
    raise _not_prepared(name, resolved, source, f"there is no folder {folder}")
  if not any(folder.glob("*/*.array_record*")):
    raise _not_prepared(name, resolved, source,
                        f"{folder} holds no array_record files (fml_jax reads tfds's array_record "
                        "format without TensorFlow; TFRecord-prepared datasets need re-preparing)")
  cache = _cache_file(name, folder)
  cached = _read_cached(cache)
  if cached is not None:
    return cached
  try:
    splits = tfds.data_source(name, data_dir=resolved, download=False)
  except Exception as e:  # tfds raises several types here; all mean "not readable".
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise _not_prepared(name, resolved, source, first_line) from None
  if "train" not in splits or "test" not in splits:
    raise DataError(f"dataset '{name}' in {resolved} needs 'train' and 'test' splits; "
                    f"it has {sorted(splits)}")
  features = splits["train"].dataset_info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"dataset '{name}' is not an image-classification dataset: fml_jax needs "
                    f"'image' and 'label' features, it has {sorted(features.keys())}")
  x_train, y_train = _decode_split(splits["train"])
  x_test, y_test = _decode_split(splits["test"])
  ds = ImageDataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                    num_classes=int(features["label"].num_classes))
  _write_cached(cache, ds)
  return ds
