"""FedKD against plain re-statements: HtFLlib's and the official SVD truncation (in
PyTorch's weight layouts), the energy schedules, the mentor/mentee losses and a
client's whole local training with per-model clipping, the server's average and
re-truncation in both readings, the bytes after truncation and what predicts."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import local_training, models
from fml_jax.algorithms.fedkd import energy_at, fedkd_losses, truncate, truncate_tree
from fml_jax.evaluation import evaluate_personalized
from fml_jax.rounds.types import RoundContext

from conftest import client_row, make_runner, small_config

PLAIN_SGD = dict(momentum=0.0, weight_decay=0.0, learning_rate=0.05, local_epochs=2)


def numpy_decomposition(weight, energy, zeros_when_unmet=True):
  """HtFLlib's clientkd.decomposition + recover on one PyTorch-layout tensor ((out, in)
  or (out, in, kh, kw)), restated: (reconstruction, floats sent)."""
  if weight.ndim < 2 or weight.shape[0] <= 1:
    return weight, weight.size
  u, sigma, v = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
  if weight.ndim == 4:   # rank index first, as HtFLlib transposes it
    u, sigma, v = (np.transpose(u, (2, 3, 0, 1)), np.transpose(sigma, (2, 0, 1)),
                   np.transpose(v, (2, 3, 0, 1)))
  total = np.sum(np.square(sigma))
  if total == 0:
    return weight, weight.size
  threshold = 0 if zeros_when_unmet else len(sigma)
  for n in range(len(sigma)):
    if np.sum(np.square(sigma[:n])) > energy * total:
      threshold = n
      break
  u, sigma, v = u[:, :threshold], sigma[:threshold], v[:threshold]
  if weight.ndim == 4:
    u, sigma, v = (np.transpose(u, (2, 3, 0, 1)), np.transpose(sigma, (1, 2, 0)),
                   np.transpose(v, (2, 3, 0, 1)))
  floats = u.size + sigma.size + v.size
  return np.matmul(u * sigma[..., None, :], v), floats


@pytest.mark.parametrize("shape,energy,zeros", [
    ((12, 5), 0.9, True), ((40, 10), 0.95, True), ((40, 10), 0.95, False),
    ((3, 3, 2, 4), 0.8, True), ((5, 5, 3, 6), 0.98, True), ((7,), 0.9, True), ((6, 1), 0.9, True)])
def test_truncation_equals_htfllibs_decomposition_in_pytorch_layout(shape, energy, zeros):
  rng = np.random.default_rng(len(shape) + shape[-1])
  x = rng.normal(size=shape).astype(np.float32)
  if len(shape) == 2 and shape[1] > 1:
    x[:, 0] *= 6   # a skewed spectrum, so a low rank can hold the energy
  got, floats = truncate(jnp.asarray(x), energy, zeros)
  to_torch = {2: (1, 0), 4: (3, 2, 0, 1)}.get(len(shape))
  if to_torch is None:
    want, want_floats = numpy_decomposition(x, energy, zeros)
  else:
    back = np.argsort(to_torch)
    want, want_floats = numpy_decomposition(np.transpose(x, to_torch), energy, zeros)
    want = np.transpose(want, back)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert int(floats) == want_floats


def test_a_flat_spectrum_head_goes_as_zeros_unless_told_otherwise():
  """Both codes' quirk: no rank below full holds 95% of a near-flat spectrum, k stays 0."""
  x = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(32, 10)))[0], jnp.float32)
  zeroed, floats = truncate(x, 0.95, True)
  np.testing.assert_array_equal(zeroed, 0.0)
  assert int(floats) == 0
  whole, floats = truncate(x, 0.95, False)
  np.testing.assert_allclose(whole, x, atol=1e-5)
  assert int(floats) == 10 * (32 + 10 + 1)


def test_energy_rises_as_each_code_schedules_it():
  assert energy_at(0, 10, 0.95, 0.98, "parameters") == pytest.approx(0.95)      # HtFLlib
  assert energy_at(9, 10, 0.95, 0.98, "parameters") == pytest.approx(0.977)
  assert energy_at(0, 10, 0.95, 0.98, "update") == pytest.approx(0.953)         # official
  assert energy_at(9, 10, 0.95, 0.98, "update") == pytest.approx(0.98)


def plain_losses(logits, rep, logits_g, rep_g, w_h, labels, mask):
  """HtFLlib's clientkd losses over the valid rows (`mask`), restated with explicit sums."""
  n, c = logits.shape[0], logits.shape[1]
  valid = mask.sum()
  logp, logp_g = jax.nn.log_softmax(logits), jax.nn.log_softmax(logits_g)
  ce = -jnp.sum(logp[jnp.arange(n), labels] * mask) / valid
  ce_g = -jnp.sum(logp_g[jnp.arange(n), labels] * mask) / valid
  kl = jnp.sum(jnp.exp(logp_g) * (logp_g - logp) * mask[:, None]) / (valid * c)   # KLDivLoss
  kl_g = jnp.sum(jnp.exp(logp) * (logp - logp_g) * mask[:, None]) / (valid * c)
  mse = jnp.sum(jnp.square(rep - rep_g @ w_h) * mask[:, None]) / (valid * rep.shape[1])
  s = ce + ce_g
  return ce + kl / s + mse / s, ce_g + kl_g / s + mse / s


def test_losses_equal_htfllibs_and_differentiate_through_everything():
  rng = np.random.default_rng(0)
  b, c, fd = 6, 4, 3
  args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in
          [(b, c), (b, fd), (b, c), (b, fd), (fd, fd)]]
  labels = jnp.asarray(rng.integers(0, c, b))
  mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
  got = fedkd_losses(*args, labels, mask)
  want = plain_losses(*args, labels, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  total = lambda *a: sum(fedkd_losses(*a, labels, mask))
  plain_total = lambda *a: sum(plain_losses(*a, labels, mask))
  for got_g, want_g in zip(jax.grad(total, argnums=(0, 1, 2, 3, 4))(*args),
                           jax.grad(plain_total, argnums=(0, 1, 2, 3, 4))(*args)):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(want_g)).sum() > 0   # nothing is detached


def clip_to_norm(tree, limit=10.0):
  """torch.nn.utils.clip_grad_norm_ restated."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  scale = jnp.minimum(1.0, limit / (norm + 1e-6))
  return jax.tree.map(lambda x: x * scale, tree)


@pytest.mark.parametrize("compress", ["update", "parameters"])
def test_client_trains_mentor_mentee_and_w_h_and_uploads_the_truncated_mentee(compress):
  config = small_config(algorithm="fedkd", local_models="mlp_small", feature_dim=8,
                        fedkd__compress=compress, **PLAIN_SGD)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  (cohort,), _ = runner.begin_round(state)
  client, own = client_row(cohort.clients, 1), client_row(cohort.client_state, 1)
  result = algorithm.client_update(state.server, own, client, data, 0)
  model, mentee_model = algorithm.groups[0].model, algorithm.mentee_model
  start = state.server["mentee"]

  def step(carry, xb, yb, mask, key):
    mentor, mentee = carry
    key, key_g = jax.random.split(key)

    def total(p, pg):
      rep, logits, _ = models.features(model, p["model"], {}, xb, True, key)
      rep_g, logits_g, _ = models.features(mentee_model, pg, {}, xb, True, key_g)
      return sum(plain_losses(logits, rep, logits_g, rep_g, p["w_h"], yb, mask))

    g, gg = jax.grad(total, argnums=(0, 1))(mentor, mentee)
    g = {"model": clip_to_norm(g["model"]), "w_h": clip_to_norm(g["w_h"])}
    sgd = lambda p, d: jax.tree.map(lambda w, dw: w - config.learning_rate * dw, p, d)
    return (sgd(mentor, g), sgd(mentee, clip_to_norm(gg))), {}

  (mentor, mentee), _ = local_training.run_local_steps(
      step, (own.params, start), data, client.train_idx, client.train_n, client.key,
      config.local_epochs, config.batch_size, min_examples=data.min_train)
  chex.assert_trees_all_close(result.client_state.params, mentor, rtol=2e-4, atol=2e-5)
  energy = energy_at(0, config.num_rounds, 0.95, 0.98, compress)
  sent = mentee if compress == "parameters" else jax.tree.map(jnp.subtract, mentee, start)
  want, floats = truncate_tree(sent, energy)
  chex.assert_trees_all_close(result.upload["mentee"], want, rtol=1e-3, atol=1e-4)
  assert int(result.upload["floats"]) == int(floats)


@pytest.mark.parametrize("compress", ["update", "parameters"])
def test_server_averages_uniformly_truncates_again_and_counts_the_bytes(compress):
  config = small_config(algorithm="fedkd", feature_dim=4, num_rounds=5, fedkd__compress=compress)
  runner = make_runner(config, "vmap")
  algorithm, state = runner.algorithm, runner.init(0)
  rng = np.random.default_rng(3)
  k = 3
  uploads = {"mentee": jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(k, *x.shape)),
                                                          jnp.float32), state.server["mentee"]),
             "floats": jnp.asarray([100.0, 50.0, 70.0])}
  weights = jnp.asarray([0.5, 0.0, 0.5])   # the second client did not report
  context = RoundContext(round=jnp.int32(2), clients=None, weights=weights,
                         key=jax.random.PRNGKey(0))
  server, metrics = algorithm.server_update(state.server, uploads, context)
  mean = jax.tree.map(lambda u: (u[0] + u[2]) / 2, uploads["mentee"])
  energy = energy_at(2, 5, 0.95, 0.98, compress)
  want, floats = truncate_tree(mean, energy)
  if compress == "update":
    want = jax.tree.map(jnp.add, state.server["mentee"], want)
  chex.assert_trees_all_close(server["mentee"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["energy"], energy, rtol=1e-6)
  assert float(metrics["bytes_up"]) == 4 * (100 + 70)
  assert float(metrics["bytes_down"]) == 4 * k * float(floats)
  assert float(metrics["bytes_up_total"]) == 4 * (100 + 70)   # the first round's traffic
  _, again = algorithm.server_update(server, uploads, context)
  assert float(again["bytes_up_total"]) == 2 * 4 * (100 + 70)


def test_mentors_predict_and_the_mentee_is_the_global_model():
  config = small_config(algorithm="fedkd", local_models="mlp_small,logreg", feature_dim=8)
  runner = make_runner(config, "vmap")
  algorithm, data, state = runner.algorithm, runner.data, runner.init(0)
  assert algorithm.global_model(state.server).params is state.server["mentee"]
  test_rows = np.asarray(data.test_rows())
  for g, evaluated in enumerate(algorithm.personalized_models(state.server, state.population)):
    acc, _ = evaluate_personalized(evaluated, data)
    j, client = 0, evaluated.client_ids[0]
    rows = test_rows[client][:int(data.test_n[client])]
    logits = models.forward(algorithm.groups[g].model,
                            client_row(state.population[g].params["model"], j), {},
                            data.normalize(data.x_test[rows]), False, jax.random.PRNGKey(0))[0]
    want = np.mean(np.asarray(logits).argmax(1) == np.asarray(data.y_test)[rows])
    np.testing.assert_allclose(acc[j], want, rtol=1e-6)


def test_mentee_is_client_zeros_architecture_and_a_round_reports_truncated_bytes(tmp_path):
  from fml_jax import train
  config = small_config(algorithm="fedkd", local_models="mlp,mlp_small", feature_dim=8,
                        num_rounds=2, eval_every=1, checkpoint_every=0)
  runner = make_runner(config, "vmap")
  state, algorithm = runner.init(0), runner.algorithm
  shapes = lambda tree: str(jax.tree.map(lambda x: x.shape, tree))
  one_client = lambda g: client_row(state.population[g].params["model"], 0)
  first = int(algorithm.group_of[0])   # client 0's architecture, "mlp"
  assert shapes(state.server["mentee"]) == shapes(one_client(first))
  assert shapes(state.server["mentee"]) != shapes(one_client(1 - first))
  train.run(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  records = [r for r in records if "bytes_up" in r]
  last = records[-1]
  mentee_floats = sum(x.size for x in jax.tree.leaves(state.server["mentee"]))
  assert 0 < last["bytes_up"] <= config.clients_per_round * 4 * mentee_floats
  assert last["round"] == 2 and len(records) == 2
  assert last["bytes_up_total"] == pytest.approx(sum(r["bytes_up"] for r in records), rel=1e-5)
