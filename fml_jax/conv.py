"""A 2-D convolution whose gradients XLA:CPU runs fast inside loops.

Local training scans over steps (`lax.scan`). On XLA:CPU the two convolutions that
JAX's autodiff emits for a convolution's gradients (dimension labels such as
`f01b_i01o->01bf`) are rewritten into the NHWC/HWIO form its fast (Eigen) kernels
take when the step is jitted alone, but not inside a loop body: there they run on
a naive emitter. One CNN training step then takes ~0.7 s in a scan against
~0.035 s alone (benchmarks/RESULTS.md).

`conv_general_dilated` here computes the same convolution and spells its
gradients as NHWC/HWIO convolutions of transposed operands, so every convolution
in a training step is in the fast form wherever it runs. It takes the signature
of `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`) and
hands any case it does not cover (strides, dilation, groups, other layouts or
ranks) to `lax.conv_general_dilated` unchanged. The gradients equal autodiff's
(tests/test_conv.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

# The weight gradient contracts over the batch, which its convolution takes as input
# channels. XLA:CPU's kernel slows down sharply when there are many: for the FedAvg
# CNN's second layer at batch 64, 52 ms in one convolution against 19 ms as the sum
# of four over 16 examples each (benchmarks/RESULTS.md, "Convnets on the CPU").
WEIGHT_GRAD_BATCH_CHUNK = 16


def _conv(x, w, padding, precision):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, w: jax.Array, padding: tuple, precision=None) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution with explicit ((top, bottom), (left, right))
  padding, each pad below the kernel's size."""
  return _conv(x, w, padding, precision)


def _forward(x, w, padding, precision):
  return _conv(x, w, padding, precision), (x, w)


def _backward(padding, precision, residuals, dy):
  x, w = residuals
  kh, kw = w.shape[:2]
  (top, bottom), (left, right) = padding
  # d/dx: correlate dy with the flipped kernel, input and output channels swapped.
  w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, w_flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
             precision)
  # d/dw: the input's channels as the batch and its examples as the contraction,
  # summed over chunks of WEIGHT_GRAD_BATCH_CHUNK examples.
  dw = None
  for start in range(0, x.shape[0], WEIGHT_GRAD_BATCH_CHUNK):
    part = slice(start, start + WEIGHT_GRAD_BATCH_CHUNK)
    chunk = _conv(x[part].transpose(3, 1, 2, 0), dy[part].transpose(1, 2, 0, 3), padding,
                  precision)
    dw = chunk if dw is None else dw + chunk
  return dx, dw.transpose(1, 2, 0, 3)


conv_nhwc.defvjp(_forward, _backward)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, through `conv_nhwc` where it applies."""
  plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers)
           and all(s == 1 for s in window_strides)
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None)
  if plain:
    pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
            if isinstance(padding, str) else padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(pads, rhs.shape[:2])):
      return conv_nhwc(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)
