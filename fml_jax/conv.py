"""A 2-D convolution whose gradients XLA:CPU runs fast inside loops.

Local training scans over steps (`lax.scan`). On XLA:CPU the two convolutions that
JAX's autodiff emits for a convolution's gradients (dimension labels such as
`f01b_i01o->01bf`) are rewritten into the NHWC/HWIO form its fast (Eigen) kernels
take when the step is jitted alone, but not inside a loop body: there they run on
a naive emitter, and a CNN training step in a scan takes about twenty times as long
as alone (benchmarks/RESULTS.md, "What made the CPU path faster").

`conv_general_dilated` here computes the same convolution and spells its
gradients as NHWC/HWIO convolutions of transposed operands, so every convolution
in a training step is in the fast form wherever it runs. It takes the signature
of `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`) and
hands any case it does not cover (strides, dilation, groups, other layouts or
ranks) to `lax.conv_general_dilated` unchanged. The gradients equal autodiff's
(tests/test_conv.py).

On the CPU, `conv_form` also picks per layer shape how the convolution is computed
where XLA:CPU's kernel is measured slow: 3x3 kernels over RGB as matmuls over patches
(im2col), layers with few channels on a 2x2 space-to-depth grid; the same sums in
another order (float32 rounding). `cpu_forms` turns them off for A/B timings.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

# The weight gradient contracts over the batch, which its convolution takes as input
# channels. XLA:CPU's kernel slows down sharply when there are many: for the FedAvg
# CNN's second layer at batch 64, four convolutions over 16 examples each take well under
# half the time of one over all 64 (benchmarks/RESULTS.md, "Convnets on the CPU").
WEIGHT_GRAD_BATCH_CHUNK = 16


def _conv(x, w, padding, precision):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC,
                                  precision=precision)


# Layers that read few channels and write few (LeNet-5's 3 -> 6 and 6 -> 16, FedMR's
# CNNCifar) run XLA:CPU's convolution kernel far below its speed
# on wider layers, and far below PyTorch's; the same convolution on a 2x2 space-to-depth
# grid (4x the channels in and out, a ceil((k + 1) / 2)-wide kernel) runs several times
# faster there, while wider layers lose on the grid, hence the bounds. Measured on the
# CPU only, so other backends keep XLA's kernel (benchmarks/RESULTS.md, "Where a convnet
# step loses, layer by layer"; `benchmarks/conv_layers.py` times both forms per layer).
SPACE_TO_DEPTH_MAX_IN = 8
SPACE_TO_DEPTH_MAX_OUT = 16


def uses_space_to_depth(w_shape: tuple) -> bool:
  """Whether `forward_conv` computes this stride-1 NHWC x HWIO convolution on a 2x2
  space-to-depth grid (on the CPU; few channels in and out, a kernel of at least 2x2)."""
  kh, kw, cin, cout = w_shape
  return (jax.default_backend() == "cpu" and cin <= SPACE_TO_DEPTH_MAX_IN
          and cout <= SPACE_TO_DEPTH_MAX_OUT and min(kh, kw) >= 2)


def space_to_depth_kernel(w: jax.Array) -> jax.Array:
  """The kernel of the same convolution on a 2x2 space-to-depth grid: HWIO (kh, kw, ci,
  co) -> (mh, mw, 4 ci, 4 co), mh = ceil((kh + 1) / 2). Grid input channel (r, q, c) is
  pixel (2u + r, 2v + q) channel c; grid output channel (a, b, o) is output pixel
  (2u + a, 2v + b) channel o; tap (m, n) reads kernel entry (2m + r - a, 2n + q - b),
  zero where that falls outside the kernel."""
  kh, kw, ci, co = w.shape
  mh, mw = (kh + 2) // 2, (kw + 2) // 2
  m, n, r, q, a, b = np.ix_(*(np.arange(k) for k in (mh, mw, 2, 2, 2, 2)))
  i, j = 2 * m + r - a, 2 * n + q - b
  inside = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
  taps = jnp.where(inside[..., None, None], w[np.where(inside, i, 0), np.where(inside, j, 0)],
                   0.0)                                      # (mh, mw, r, q, a, b, ci, co)
  return taps.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(mh, mw, 4 * ci, 4 * co)


def space_to_depth_conv(x, w, padding, precision=None):
  """`_conv(x, w, padding)` computed on a 2x2 space-to-depth grid: the padded input's
  2x2 blocks as channels, one VALID convolution with `space_to_depth_kernel(w)`, the
  output's channels back to 2x2 blocks (cropped where the output size is odd)."""
  kh, kw, ci, co = w.shape
  batch = x.shape[0]
  (top, bottom), (left, right) = padding
  out_h, out_w = x.shape[1] + top + bottom - kh + 1, x.shape[2] + left + right - kw + 1
  grid_h, grid_w = (out_h + 1) // 2 + (kh + 2) // 2 - 1, (out_w + 1) // 2 + (kw + 2) // 2 - 1
  x = jnp.pad(x, ((0, 0), (top, 2 * grid_h - x.shape[1] - top),
                  (left, 2 * grid_w - x.shape[2] - left), (0, 0)))
  x = x.reshape(batch, grid_h, 2, grid_w, 2, ci).transpose(0, 1, 3, 2, 4, 5)
  y = _conv(x.reshape(batch, grid_h, grid_w, 4 * ci), space_to_depth_kernel(w),
            ((0, 0), (0, 0)), precision)
  y = y.reshape(batch, y.shape[1], y.shape[2], 2, 2, co).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(batch, 2 * y.shape[1], 2 * y.shape[3], co)[:, :out_h, :out_w]


# A 3x3 kernel over an RGB image (the official FML CNN's first layer on CIFAR-10) reads
# 27 numbers per output pixel: as one matmul over the image's patches (im2col) its
# forward pass and weight gradient run several times faster than XLA:CPU's convolution,
# the patches being small; with more channels or a wider kernel the patches grow with
# them and the matmul loses (benchmarks/RESULTS.md, "im2col for small patches";
# `benchmarks/conv_layers.py` times both forms per layer). CPU only, as above.
IM2COL_MAX_PATCH = 27


def uses_im2col(w_shape: tuple) -> bool:
  """Whether `conv_nhwc` computes this layer's forward pass and weight gradient as one
  matmul over the input's patches (on the CPU; at most IM2COL_MAX_PATCH numbers per
  patch, read from more than one channel)."""
  kh, kw, cin, _ = w_shape
  return (jax.default_backend() == "cpu" and cin > 1
          and kh * kw * cin <= IM2COL_MAX_PATCH)


def im2col_patches(x, kernel_size, padding):
  """The padded input's (kh, kw) patches, one row per output pixel: (N * Ho * Wo,
  kh * kw * C), entries in the kernel's HWI order."""
  kh, kw = kernel_size
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  # Slices, not `lax.conv_general_dilated_patches`: that builds the patches with a
  # convolution, the kernel this form avoids (benchmarks/RESULTS.md, "im2col for small
  # patches"). The kernel's columns first, then its rows over those: XLA:CPU copies a
  # few wide slices faster than kh * kw slices of C channels each (same patches).
  columns = jnp.concatenate([x[:, :, j:j + out_w, :] for j in range(kw)], axis=-1)
  patches = jnp.concatenate([columns[:, i:i + out_h] for i in range(kh)], axis=-1)
  return patches.reshape(-1, patches.shape[-1]), (x.shape[0], out_h, out_w)


def im2col_conv(x, w, padding, precision=None):
  """`_conv(x, w, padding)` as one matmul: the input's patches times the kernel."""
  patches, out_shape = im2col_patches(x, w.shape[:2], padding)
  y = jnp.dot(patches, w.reshape(-1, w.shape[3]), precision=precision)
  return y.reshape(*out_shape, w.shape[3])


def im2col_weight_grad(x, dy, kernel_shape, padding, precision=None):
  """The weight gradient of `_conv(x, w, padding)` for output gradient `dy`: the
  input's patches, transposed, times `dy`."""
  patches, _ = im2col_patches(x, kernel_shape[:2], padding)
  dw = jnp.dot(patches.T, dy.reshape(-1, dy.shape[3]), precision=precision)
  return dw.reshape(kernel_shape)


@contextlib.contextmanager
def cpu_forms(im2col: bool = True, space_to_depth: bool = True):
  """Within this block, convolutions traced take only the CPU forms allowed here (XLA's
  kernel where none is): for A/B timings of one job (benchmarks/round_time.py
  --conv_forms). A jitted function keeps the forms of its first trace."""
  global IM2COL_MAX_PATCH, SPACE_TO_DEPTH_MAX_IN
  saved = IM2COL_MAX_PATCH, SPACE_TO_DEPTH_MAX_IN
  IM2COL_MAX_PATCH = saved[0] if im2col else 0
  SPACE_TO_DEPTH_MAX_IN = saved[1] if space_to_depth else 0
  try:
    yield
  finally:
    IM2COL_MAX_PATCH, SPACE_TO_DEPTH_MAX_IN = saved


def conv_form(w_shape: tuple) -> str:
  """How `conv_nhwc` computes a layer with this kernel: "im2col" (forward pass and
  weight gradient as matmuls over patches), "space_to_depth" (the forward pass on the
  2x2 grid) or "xla" (XLA's kernel)."""
  if uses_im2col(w_shape):
    return "im2col"
  return "space_to_depth" if uses_space_to_depth(w_shape) else "xla"


def forward_conv(x, w, padding, precision=None, form="xla"):
  """The forward convolution of `conv_nhwc` in the given `conv_form`."""
  if form == "im2col":
    return im2col_conv(x, w, padding, precision)
  if form == "space_to_depth":
    return space_to_depth_conv(x, w, padding, precision)
  return _conv(x, w, padding, precision)


def conv_nhwc(x: jax.Array, w: jax.Array, padding: tuple, precision=None) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution with explicit ((top, bottom), (left, right))
  padding, each pad below the kernel's size, in the form `conv_form` picks for it.

  The form is chosen here and passed on as a static argument, so that JAX's caches of
  traced functions keep one trace per form."""
  return _conv_nhwc(x, w, padding, precision, conv_form(w.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, w, padding, precision, form):
  return forward_conv(x, w, padding, precision, form)


def _forward(x, w, padding, precision, form):
  return forward_conv(x, w, padding, precision, form), (x, w)


def _backward(padding, precision, form, residuals, dy):
  x, w = residuals
  kh, kw = w.shape[:2]
  (top, bottom), (left, right) = padding
  # d/dx: correlate dy with the flipped kernel, input and output channels swapped.
  w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, w_flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
             precision)
  if form == "im2col":
    return dx, im2col_weight_grad(x, dy, w.shape, padding, precision)
  return dx, chunked_weight_grad(x, dy, padding, precision)


def chunked_weight_grad(x, dy, padding, precision=None):
  """The weight gradient as XLA:CPU's convolution: the input's channels as the batch
  and its examples as the contraction, summed over chunks of WEIGHT_GRAD_BATCH_CHUNK
  examples."""
  dw = None
  for start in range(0, x.shape[0], WEIGHT_GRAD_BATCH_CHUNK):
    part = slice(start, start + WEIGHT_GRAD_BATCH_CHUNK)
    chunk = _conv(x[part].transpose(3, 1, 2, 0), dy[part].transpose(1, 2, 0, 3), padding,
                  precision)
    dw = chunk if dw is None else dw + chunk
  return dw.transpose(1, 2, 0, 3)


_conv_nhwc.defvjp(_forward, _backward)


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
