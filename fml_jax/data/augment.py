"""Data augmentation inside the jitted local step: random crop with zero padding and a
horizontal flip per example (torchvision's RandomCrop(size, padding) and
RandomHorizontalFlip, which the official FML code applies to CIFAR), drawn from the
client's key for the step, with DeepMind's dm-pix.

  augment          auto: the official default of the dataset (AUGMENTED_DATASETS:
                   crop_flip for CIFAR, none for MNIST and the synthetic data) |
                   none | crop_flip
  augment_padding  pixels of zeros around each image before the crop (4, as the
                   official code)

Pixels are padded before normalization, so padding is black, as torchvision pads the
PIL image before ToTensor and Normalize. Evaluation never augments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax.errors import ConfigError

AUGMENTATIONS = ("auto", "none", "crop_flip")
# The official default per dataset (anything else: none).
AUGMENTED_DATASETS = {"cifar10": "crop_flip", "cifar100": "crop_flip"}


def resolve(config, input_shape: tuple) -> str:
  """The augmentation a run uses ("none" or "crop_flip")."""
  choice = config.get("augment", "auto")
  if choice not in AUGMENTATIONS:
    raise ConfigError("augment", f"'{choice}' is not one of {', '.join(AUGMENTATIONS)}")
  if choice == "auto":
    return AUGMENTED_DATASETS.get(config.dataset, "none")
  if choice == "crop_flip" and len(input_shape) != 3:
    raise ConfigError("augment", f"crop_flip needs images (height, width, channels); "
                      f"{config.dataset}'s inputs have shape {input_shape}")
  return choice


def crop_flip(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, C): each image padded with `padding` zeros on every side,
  cropped back to H x W at a random offset and flipped left-right with probability 1/2,
  from its own key."""
  import dm_pix   # pylint: disable=g-import-not-at-top  (only runs that augment need it)
  shape = images.shape[1:]

  def one(image_key, image):
    crop_key, flip_key = jax.random.split(image_key)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return dm_pix.random_flip_left_right(flip_key, dm_pix.random_crop(crop_key, padded, shape))
  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)
