"""fml_jax.conv: the convolution with loop-friendly gradients equals lax's, values and
gradients, and falls back to lax for the cases it does not cover."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fml_jax import conv, models

DN = ("NHWC", "HWIO", "NHWC")


def loss_and_grads(conv_fn, x, w, strides=(1, 1), padding="SAME", **kw):
  def loss(x, w):
    y = conv_fn(x, w, strides, padding, dimension_numbers=DN, **kw)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
  return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 12, 10, 2), (5, 5, 2, 4), "SAME"),
    ((3, 12, 10, 2), (5, 5, 2, 4), "VALID"),
    ((2, 9, 9, 3), (3, 3, 3, 5), ((1, 0), (2, 1))),
    ((4, 8, 8, 1), (3, 2, 1, 6), "SAME"),       # even kernel width: asymmetric SAME pads
    # More examples than conv.WEIGHT_GRAD_BATCH_CHUNK: the weight gradient summed over
    # chunks of 16, 16 and 5 examples (45 numbers per patch: not the im2col path).
    ((37, 7, 7, 5), (3, 3, 5, 4), "SAME"),
    # A 3x3 kernel over 3 channels: forward pass and weight gradient as matmuls over
    # the patches (conv.uses_im2col), more examples than a weight-gradient chunk.
    ((19, 10, 9, 3), (3, 3, 3, 8), "VALID"),
    # Wider layers, asymmetric padding.
    ((3, 9, 9, 5), (3, 3, 5, 4), ((2, 0), (1, 1))),
    ((20, 6, 6, 8), (5, 5, 8, 3), "SAME"),
])
def test_values_and_gradients_equal_lax(shape, kernel, padding):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, shape), jax.random.normal(kw, kernel)
  (value, grads) = loss_and_grads(conv.conv_general_dilated, x, w, padding=padding)
  (ref_value, ref_grads) = loss_and_grads(lax.conv_general_dilated, x, w, padding=padding)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    assert g.shape == ref.shape
    # Layers with few channels compute the forward pass on a space-to-depth grid or as
    # a matmul over patches: the same sums in another order, so the gradients agree to
    # float32 rounding of the largest entry, not entry by entry.
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("shape,kernel,padding", [
    ((4, 32, 32, 3), (5, 5, 3, 6), ((2, 2), (2, 2))),    # LeNet-5's first layer
    ((4, 16, 16, 6), (5, 5, 6, 16), ((0, 0), (0, 0))),   # its second
    ((2, 13, 10, 1), (5, 5, 1, 6), ((2, 2), (2, 2))),    # odd output height
    ((2, 9, 11, 2), (3, 3, 2, 5), ((1, 0), (2, 1))),     # asymmetric pads, odd sizes
    ((3, 8, 8, 4), (4, 2, 4, 3), ((1, 2), (0, 1))),      # even kernel sizes
    ((1, 7, 7, 3), (7, 7, 3, 2), ((3, 3), (3, 3))),
    ((2, 6, 5, 2), (2, 2, 2, 2), ((0, 0), (0, 0))),
])
def test_space_to_depth_equals_the_plain_convolution(shape, kernel, padding):
  kx, kw = jax.random.split(jax.random.PRNGKey(3))
  x, w = jax.random.normal(kx, shape), jax.random.normal(kw, kernel)
  plain = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)
  grid = jax.jit(conv.space_to_depth_conv, static_argnums=2)(x, w, padding)
  assert grid.shape == plain.shape
  np.testing.assert_allclose(grid, plain, rtol=1e-5, atol=1e-5)
  # The grid kernel, entry by entry: tap (m, n), input (r, q, c), output (a, b, o) holds
  # w[2m + r - a, 2n + q - b, c, o] inside the kernel and 0 outside.
  big = np.asarray(conv.space_to_depth_kernel(w))
  kh, kw_, ci, co = kernel
  for m, n, r, q, a, b in np.ndindex(big.shape[0], big.shape[1], 2, 2, 2, 2):
    i, j = 2 * m + r - a, 2 * n + q - b
    expected = w[i, j] if 0 <= i < kh and 0 <= j < kw_ else np.zeros((ci, co))
    block = big[m, n].reshape(2, 2, ci, 2, 2, co)[r, q, :, a, b, :]
    np.testing.assert_array_equal(block, expected)


def test_which_layers_take_the_space_to_depth_grid():
  assert conv.uses_space_to_depth((5, 5, 3, 6))      # LeNet-5
  assert conv.uses_space_to_depth((5, 5, 6, 16))
  assert not conv.uses_space_to_depth((5, 5, 1, 32))  # the FedAvg CNN
  assert not conv.uses_space_to_depth((5, 5, 32, 64))
  assert not conv.uses_space_to_depth((5, 5, 16, 6))  # LeNet-5's dx
  assert not conv.uses_space_to_depth((1, 1, 3, 6))      # 1x1: nothing to gain
  # LeNet-5's first forward pass convolves the grid with a 3x3 kernel of 12 -> 24 channels.
  x, w = jnp.ones((2, 32, 32, 3)), jnp.ones((5, 5, 3, 6))
  forward = str(jax.make_jaxpr(lambda x, w: conv.conv_nhwc(x, w, ((2, 2), (2, 2))))(x, w))
  assert "f32[3,3,12,24]" in forward


@pytest.mark.parametrize("shape,kernel,padding", [
    ((4, 32, 32, 3), (3, 3, 3, 32), ((0, 0), (0, 0))),   # the official FML CNN on CIFAR-10
    ((2, 9, 11, 3), (3, 3, 3, 5), ((1, 0), (2, 1))),     # asymmetric pads, odd sizes
    ((3, 8, 7, 2), (2, 3, 2, 4), ((1, 0), (1, 1))),      # an even kernel height
    ((2, 8, 8, 1), (5, 5, 1, 3), ((2, 2), (2, 2))),      # wider than the rule takes
])
def test_im2col_equals_the_plain_convolution_and_its_weight_gradient(shape, kernel, padding):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(5), 3)
  x, w = jax.random.normal(kx, shape), jax.random.normal(kw, kernel)
  plain = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)
  ours = jax.jit(conv.im2col_conv, static_argnums=2)(x, w, padding)
  assert ours.shape == plain.shape
  np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(kd, plain.shape)
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), padding,
                                                       dimension_numbers=DN), w)
  (ref_dw,) = vjp(dy)
  dw = jax.jit(conv.im2col_weight_grad, static_argnums=(2, 3))(x, dy, kernel, padding)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max())
  # One row per output pixel, the kernel's HWI order along it.
  patches, out_shape = conv.im2col_patches(x, kernel[:2], padding)
  assert patches.shape == (int(np.prod(out_shape)), kernel[0] * kernel[1] * kernel[2])
  padded = np.pad(np.asarray(x), ((0, 0),) + padding + ((0, 0),))
  n, h, v = out_shape[0] - 1, out_shape[1] - 1, out_shape[2] // 2
  row = patches[(n * out_shape[1] + h) * out_shape[2] + v]
  np.testing.assert_array_equal(row, padded[n, h:h + kernel[0], v:v + kernel[1]].reshape(-1))


def test_which_layers_take_im2col():
  assert conv.uses_im2col((3, 3, 3, 32))          # fml_cnn's first layer on CIFAR-10
  assert not conv.uses_im2col((3, 3, 1, 32))      # one channel: XLA's kernel is fast
  assert not conv.uses_im2col((5, 5, 3, 6))       # LeNet-5: 75 numbers, the grid instead
  assert not conv.uses_im2col((3, 3, 32, 64))
  x, w = jnp.ones((2, 32, 32, 3)), jnp.ones((3, 3, 3, 32))
  step = str(jax.make_jaxpr(jax.grad(
      lambda w: jnp.sum(conv.conv_nhwc(x, w, ((0, 0), (0, 0))))))(w))
  # The forward pass and the weight gradient are matmuls; the input gradient, which a
  # first layer does not need, stays a convolution (XLA drops it there).
  assert step.count("dot_general") == 2 and step.count("conv_general_dilated") == 1


def test_cpu_forms_chooses_what_is_traced_and_restores_the_rules():
  x, w = jnp.ones((2, 32, 32, 3)), jnp.ones((3, 3, 3, 32))
  # A function of its own per trace (a traced function keeps its first trace's forms);
  # each takes the forms of its own block: the form is a static argument of the
  # custom-gradient function, so JAX's caches of its traces keep one per form.
  forward = lambda: (lambda x, w: conv.conv_nhwc(x, w, ((0, 0), (0, 0))))
  with conv.cpu_forms(im2col=False):
    assert conv.conv_form(w.shape) == "xla"
    assert "conv_general_dilated" in str(jax.make_jaxpr(forward())(x, w))
  with conv.cpu_forms(space_to_depth=False):
    assert conv.conv_form((5, 5, 3, 6)) == "xla" and conv.conv_form(w.shape) == "im2col"
  assert conv.conv_form(w.shape) == "im2col"
  assert conv.conv_form((5, 5, 3, 6)) == "space_to_depth"
  assert "conv_general_dilated" not in str(jax.make_jaxpr(forward())(x, w))


def test_cases_it_does_not_cover_fall_back_to_lax():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 4))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 2, 4))
  for kw in ({"strides": (2, 2)}, {"feature_group_count": 2}):
    strides = kw.pop("strides", (1, 1))
    ww = w if kw else jnp.concatenate([w, w], axis=2)
    ours = loss_and_grads(conv.conv_general_dilated, x, ww, strides, **kw)
    ref = loss_and_grads(lax.conv_general_dilated, x, ww, strides, **kw)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(
        x, w, strides, "SAME", dimension_numbers=DN, **kw))(x, ww))
    assert "custom_vjp" not in jaxpr


@pytest.mark.parametrize("name", ["cnn", "lenet5", "fedmd_small_p0"])
def test_models_train_through_it(name):
  """The models' convolutions use the custom gradient (so the training scan keeps
  XLA:CPU's fast kernels), and their parameter names are unchanged."""
  model = models.build_model(name, 10, (28, 28, 1))
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert "Conv_0" in variables["params"]
  x = jnp.ones((2, 28, 28, 1))

  def loss(params):
    logits, _ = models.forward(model, params, {k: v for k, v in variables.items()
                                               if k != "params"}, x, False, None)
    return jnp.sum(logits)
  assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(variables["params"]))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(loss)(variables["params"])))
