"""FML's losses against a hand-written NumPy reference (ALGORITHMS.md's formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels):
  return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


def np_kl_batchmean(target_logits, logits, t):
  """PyTorch KLDivLoss(reduction='batchmean')(log_softmax(z/T), softmax(z_target/T))."""
  logp_t = np_log_softmax(target_logits / t)
  logp = np_log_softmax(logits / t)
  return np.sum(np.exp(logp_t) * (logp_t - logp)) / len(logits)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(32, 10)) * 3, rng.normal(size=(32, 10)) * 3,
          rng.integers(0, 10, 32))


@pytest.mark.parametrize("alpha,beta,temperature", [(0.5, 0.5, 1.0), (0.9, 0.1, 1.0),
                                                    (0.3, 0.7, 2.5)])
def test_fml_losses_match_numpy_reference(batch, alpha, beta, temperature):
  meme, local, y = batch
  mask = np.ones(len(y), bool)
  loss_meme, loss_local = losses.fml_losses(jnp.asarray(meme), jnp.asarray(local),
                                            jnp.asarray(y), mask, alpha, beta, temperature)
  want_local = (alpha * np_cross_entropy(local, y)
                + (1 - alpha) * np_kl_batchmean(meme, local, temperature))
  want_meme = (beta * np_cross_entropy(meme, y)
               + (1 - beta) * np_kl_batchmean(local, meme, temperature))
  np.testing.assert_allclose(loss_local, want_local, rtol=1e-5)
  np.testing.assert_allclose(loss_meme, want_meme, rtol=1e-5)


def test_mask_drops_padded_examples(batch):
  meme, local, y = batch
  mask = np.arange(len(y)) < 20
  got = losses.fml_losses(meme, local, y, mask, 0.5, 0.5)
  want = losses.fml_losses(meme[:20], local[:20], y[:20], np.ones(20, bool), 0.5, 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(local, y, mask),
                             np_cross_entropy(local[:20], y[:20]), rtol=1e-5)


def test_kl_targets_are_stop_gradient(batch):
  meme, local, y = batch
  mask = np.ones(len(y), bool)
  # d L_local / d meme must be zero: the meme's distribution is a constant target there.
  g_meme = jax.grad(lambda m: losses.fml_losses(m, local, y, mask, 0.5, 0.5)[1])(meme)
  g_local = jax.grad(lambda l: losses.fml_losses(meme, l, y, mask, 0.5, 0.5)[0])(local)
  assert np.all(np.asarray(g_meme) == 0) and np.all(np.asarray(g_local) == 0)
  # ... while each loss does move its own model.
  g_own = jax.grad(lambda l: losses.fml_losses(meme, l, y, mask, 0.5, 0.5)[1])(local)
  assert np.abs(np.asarray(g_own)).sum() > 0


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise(batch):
  meme, local, _ = batch
  mask = np.ones(len(meme), bool)
  assert abs(float(losses.kl_divergence(meme, meme, mask))) < 1e-6
  assert float(losses.kl_divergence(meme, local, mask)) > 0.1


def test_proximal_term():
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  b = {"w": jnp.zeros((2, 3)), "b": jnp.full(3, 2.0)}
  assert float(losses.proximal_term(a, b)) == pytest.approx(6 + 12)
