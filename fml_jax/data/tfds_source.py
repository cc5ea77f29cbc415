"""Reading a prepared tfds image-classification dataset into numpy, without TensorFlow.

`tfds.data_source` gives random access to array_record files; we decode every
example once per process and keep uint8 images, so the whole dataset can then
live on the accelerator (MNIST: 47 MB, CIFAR-10: 150 MB).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from fml_jax.errors import DataError

_DECODE_CHUNK = 4096


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
  return ImageDataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      num_classes=int(features["label"].num_classes))
