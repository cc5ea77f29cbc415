"""FedGen as HtFLlib runs it, against plain re-statements: the generator's forward pass,
HtFLlib's draws, a client's whole local training, the server's head average and
generator training (Adam written out), the bytes per round, and short runs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import config_checks, local_training, models, settings
from fml_jax.algorithms.fedgen import (GENERATOR_FOLD, FedGen, Generator, generator_inputs,
                                       train_generator)
from fml_jax.errors import ConfigError
from fml_jax.rounds.types import RoundContext

from conftest import client_row, make_runner, small_config

PLAIN_SGD = dict(momentum=0.0, weight_decay=0.0, learning_rate=0.05, local_epochs=2)
ND, HD, FD = 4, 8, 8   # noise_dim, hidden_dim, feature_dim of the tests


def fedgen_config(**overrides):
  """The tests' small config running FedGen at noise_dim 4, hidden_dim 8, feature_dim 8."""
  config = small_config(algorithm="fedgen")
  base = {"feature_dim": FD, "fedgen.noise_dim": ND, "fedgen.hidden_dim": HD,
          "fedgen.server_epochs": 2}
  return settings.apply_overrides(config, {**base, **overrides})


def restated_generator(xp, params, noise, labels, num_classes):
  """HtFLlib's Generator in train mode, from its definition: (features, batch mean,
  biased batch variance). `xp` is numpy or jax.numpy."""
  d0, bn, d1 = params["Dense_0"], params["BatchNorm_0"], params["Dense_1"]
  x = xp.concatenate([noise, xp.eye(num_classes)[labels]], axis=1)
  h = x @ d0["kernel"] + d0["bias"]
  mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
  h = (h - mean) / xp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
  return xp.maximum(h, 0) @ d1["kernel"] + d1["bias"], mean, var


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def random_generator(num_classes, seed):
  """Generator variables with every parameter and statistic random (scale near 1)."""
  gen = Generator(num_classes, HD, FD)
  variables = gen.init(jax.random.PRNGKey(0), jnp.zeros((1, ND)), jnp.zeros((1,), jnp.int32),
                       train=False)
  params = random_like(variables["params"], seed)
  params["BatchNorm_0"]["scale"] = 1 + 0.3 * params["BatchNorm_0"]["scale"]
  mean = random_like(variables["batch_stats"], seed + 1)["BatchNorm_0"]["mean"]
  stats = {"BatchNorm_0": {"mean": mean, "var": jnp.full((HD,), 2.0)}}
  return gen, {"params": params, "batch_stats": stats}


def ce(logits, labels, mask):
  logp = jax.nn.log_softmax(logits)
  return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], 1)[:, 0] * mask) / jnp.maximum(
      mask.sum(), 1)


# --- the generator and its draws ------------------------------------------------------


def test_generator_forward_is_linear_batchnorm_relu_linear():
  c = 3
  gen, variables = random_generator(c, 0)
  rng = np.random.default_rng(1)
  noise = rng.random((6, ND)).astype(np.float32)
  labels = np.array([0, 2, 2, 1, 0, 2])
  out, updates = gen.apply(variables, noise, labels, train=True, mutable=["batch_stats"])
  want, mean, var = restated_generator(np, jax.tree.map(np.asarray, variables["params"]), noise,
                                       labels, c)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # PyTorch's momentum 0.1 (flax folds in the biased variance; nothing reads them).
  old = variables["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"],
                             0.9 * np.asarray(old["mean"]) + 0.1 * mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["var"],
                             0.9 * np.asarray(old["var"]) + 0.1 * var, rtol=1e-5, atol=1e-5)
  # HtFLlib's size at its benchmark setting: 285,696 parameters (nd 32, C 10, hd = fd = 512).
  shapes = jax.eval_shape(lambda: Generator(10, 512, 512).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32)), jnp.zeros((1,), jnp.int32), train=False))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == 285_696


def test_draws_labels_by_the_histogram_and_uniform_noise():
  noise, labels = generator_inputs(jax.random.PRNGKey(0), jnp.asarray([1.0, 0.0, 3.0]), 20_000, 2)
  assert noise.shape == (20_000, 2) and float(noise.min()) >= 0 and float(noise.max()) < 1
  np.testing.assert_allclose(noise.mean(0), 0.5, atol=0.01)
  np.testing.assert_allclose(np.bincount(labels, minlength=3) / 20_000, [0.25, 0, 0.75], atol=0.01)


def test_fedgen_refuses_models_without_a_head_and_a_one_row_generator_batch():
  config = fedgen_config()
  config.algorithm = "fedgen"   # the checks concern the algorithm running under its name
  FedGen.check_config(config)
  with pytest.raises(ConfigError, match="feature_dim"):
    FedGen.check_config(settings.apply_overrides(fedgen_config(algorithm="fedgen"),
                                                 {"feature_dim": 0}))
  with pytest.raises(ConfigError, match="fedgen.generator_batch_size"):
    FedGen.check_config(fedgen_config(algorithm="fedgen", batch_size=1))
  with pytest.raises(ConfigError, match="fedgen.server_epochs"):
    FedGen.check_config(fedgen_config(**{"fedgen.server_epochs": 0}))


# --- the client ----------------------------------------------------------------------


def test_client_trains_under_the_global_head_with_the_generated_term():
  config = fedgen_config(local_models="mlp_small", **{"fedgen.generator_batch_size": 5},
                         **PLAIN_SGD)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  c = algorithm.num_classes
  state = runner.init(0)
  (cohort,), context = runner.begin_round(state)
  server = algorithm.prepare_round(state.server, context, data)
  # The histogram: every client's training labels.
  want_counts = np.bincount(np.asarray(data.y_train)[np.asarray(data.train_flat)], minlength=c)
  np.testing.assert_array_equal(server["label_counts"], want_counts)
  _, generator = random_generator(c, 3)
  server = {**server, "head": random_like(server["head"], 4), "generator": generator}
  client, own = client_row(cohort.clients, 1), client_row(cohort.client_state, 1)
  result = algorithm.client_update(server, own, client, data, 0)

  model, gen_params, counts = algorithm.groups[0].model, generator["params"], server["label_counts"]

  def step(p, xb, yb, mask, key):
    noise, fake_y = generator_inputs(jax.random.fold_in(key, GENERATOR_FOLD), counts, 5, ND)
    fake_z = restated_generator(jnp, gen_params, noise, fake_y, c)[0]

    def loss(p):
      logits = models.forward(model, p, {}, xb, True, key)[0]
      fake_logits = fake_z @ p["head"]["kernel"] + p["head"]["bias"]
      return ce(logits, yb, mask) + ce(fake_logits, fake_y, jnp.ones(5))
    return jax.tree.map(lambda w, g: w - config.learning_rate * g, p, jax.grad(loss)(p)), {}

  want, _ = local_training.run_local_steps(
      step, {**own.params, "head": server["head"]}, data, client.train_idx, client.train_n,
      client.key, config.local_epochs, config.batch_size, min_examples=data.min_train)
  chex.assert_trees_all_close(result.client_state.params, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(result.upload, want["head"], rtol=1e-5, atol=1e-6)
  assert float(result.metrics["generated_ce"]) > 0


# --- the server ----------------------------------------------------------------------


def numpy_adam_training(params, stats, heads, weights, counts, key, steps, batch, lr, c):
  """HtFLlib's train_generator restated: PyTorch's Adam (betas 0.9, 0.999, eps 1e-8,
  bias-corrected) written out, on CE of the weighted sum of the heads' logits; step i
  draws from split(key, steps)[i]. Returns (params, batch statistics, step losses)."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = jax.tree.map(np.zeros_like, params)
  v = jax.tree.map(np.zeros_like, params)
  mean, var = (np.asarray(stats["BatchNorm_0"][k], np.float64) for k in ("mean", "var"))
  step_losses = []
  for t, step_key in enumerate(jax.random.split(key, steps), start=1):
    noise, y = generator_inputs(step_key, counts, batch, ND)

    def loss(p):
      z, bmean, bvar = restated_generator(jnp, p, noise, y, c)
      logits = sum(w * (z @ h_w + h_b) for w, h_w, h_b in zip(weights, heads["kernel"],
                                                            heads["bias"]))
      return ce(logits, y, jnp.ones(batch)), (bmean, bvar)

    p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    (value, (bmean, bvar)), grads = jax.value_and_grad(loss, has_aux=True)(p32)
    step_losses.append(float(value))
    mean, var = 0.9 * mean + 0.1 * np.asarray(bmean), 0.9 * var + 0.1 * np.asarray(bvar)
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
    # Batch norm cancels the first bias: its gradient is 0 but for rounding (FedGen holds it).
    scale = max(np.abs(grads["Dense_0"]["kernel"]).max(), 1.0)
    assert np.abs(grads["Dense_0"]["bias"]).max() < 1e-6 * scale
    grads["Dense_0"]["bias"] = np.zeros_like(grads["Dense_0"]["bias"])
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
    params = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - 0.9 ** t)) / (
        np.sqrt(v / (1 - 0.999 ** t)) + 1e-8), params, m, v)
  return params, {"BatchNorm_0": {"mean": mean, "var": var}}, np.array(step_losses)


@pytest.mark.parametrize("keep", [True, False])
def test_server_averages_heads_and_trains_the_generator_with_adam(keep):
  config = fedgen_config(local_models="mlp_small", **{"fedgen.server_epochs": 4,
                                                      "fedgen.generator_learning_rate": 0.05,
                                                      "fedgen.generator_batch_size": 6,
                                                      "fedgen.keep_generator": keep})
  c = 5
  algorithm = FedGen(config, c, (12,))
  rng = np.random.default_rng(0)
  k = 3
  heads = {"kernel": jnp.asarray(rng.normal(size=(k, FD, c)), jnp.float32),
           "bias": jnp.asarray(rng.normal(size=(k, c)), jnp.float32)}
  # Client 1 dropped: its (huge) head is neither averaged nor a teacher.
  heads = jax.tree.map(lambda x: x.at[1].set(1e3), heads)
  reports = jnp.asarray([True, False, True])
  weights = jnp.asarray([0.25, 0.0, 0.75])
  context = RoundContext(round=jnp.int32(0), clients=None, weights=weights,
                         key=jax.random.PRNGKey(9), reports=reports)
  _, generator = random_generator(c, 5)
  counts = jnp.asarray([3.0, 0.0, 1.0, 2.0, 4.0])
  old = {"head": jax.tree.map(lambda x: x[0], heads), "generator": generator,
         "label_counts": counts}
  server, metrics = jax.jit(algorithm.server_update)(old, heads, context)
  for leaf, up in zip(jax.tree.leaves(server["head"]), jax.tree.leaves(heads)):
    np.testing.assert_allclose(leaf, np.einsum("k,k...->...", np.asarray(weights), up),
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(server["label_counts"], counts)
  params, stats, step_losses = numpy_adam_training(
      generator["params"], generator["batch_stats"], jax.tree.map(np.asarray, heads),
      np.asarray(weights), counts, context.key, 4, 6, 0.05, c)
  np.testing.assert_allclose(metrics["generator_loss"], step_losses.mean(), rtol=1e-5)
  assert step_losses[-1] < step_losses[0]
  if not keep:   # HtFLlib: the trained generator is dropped, the initial one stays
    chex.assert_trees_all_equal(server["generator"], generator)
    return
  trained = {"params": params, "batch_stats": stats}
  chex.assert_trees_all_close(server["generator"], trained, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(server["generator"]["params"]["Dense_0"]["bias"],
                              generator["params"]["Dense_0"]["bias"])
  # train_generator is what the server runs (the scan over its steps).
  _, losses = train_generator(algorithm.generator, generator, heads, weights, counts,
                              context.key, 4, 6, 0.05, ND)
  np.testing.assert_allclose(losses, step_losses, rtol=1e-5)


def test_fedgen_sends_the_head_up_and_the_head_and_generator_down():
  runner = make_runner(fedgen_config(), "vmap")
  c = runner.algorithm.num_classes
  head = (FD * c + c) * 4
  generator = ((ND + c) * HD + HD + 2 * HD + HD * FD + FD) * 4   # Dense, BatchNorm, Dense
  assert runner.communication(runner.abstract_state(0)) == {
      "bytes_up": 4 * head, "bytes_down": 4 * (head + generator)}


# --- short runs ------------------------------------------------------------------------


def test_short_run_averages_the_trained_heads_and_trains_the_generator():
  config = settings.apply_overrides(fedgen_config(), FedGen.small_overrides())
  config_checks.validate(config)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  assert runner.num_groups == 2
  group_of = np.asarray(algorithm.group_of)
  state = runner.init(0)
  first = jax.tree.map(np.asarray, state.server["generator"])
  np.testing.assert_array_equal(state.server["head"]["kernel"],
                                state.population[group_of[0]].params["head"]["kernel"][0])
  for _ in range(2):
    state, report = runner.run_round(state)
    for name in ("train_loss", "train_ce", "generated_ce", "generator_loss"):
      assert np.isfinite(float(report.metrics[name])), (name, report.metrics)
    assert bool(report.all_finite)
    # The head: the cohort's trained heads (their new states), weighted by examples.
    ids = np.asarray(report.cohort)
    rows = [int(np.flatnonzero(np.flatnonzero(group_of == group_of[i]) == i)[0]) for i in ids]
    trained = [client_row(state.population[group_of[i]].params["head"], r)
               for i, r in zip(ids, rows)]
    n = np.asarray(data.train_n)[ids].astype(np.float64)
    for name in ("kernel", "bias"):
      want = sum(w * np.asarray(h[name]) for w, h in zip(n / n.sum(), trained))
      np.testing.assert_allclose(state.server["head"][name], want, rtol=1e-5, atol=1e-6)
  # keep_generator (small_overrides): the generator the server trained is kept.
  assert not np.allclose(state.server["generator"]["params"]["Dense_1"]["kernel"],
                         first["params"]["Dense_1"]["kernel"])
  np.testing.assert_array_equal(
      state.server["label_counts"],
      np.bincount(np.asarray(data.y_train)[np.asarray(data.train_flat)],
                  minlength=algorithm.num_classes))
  # Every client predicts with its own body and the global head.
  for group in algorithm.personalized_models(state.server, state.population):
    chex.assert_trees_all_equal(group.params["head"]["kernel"][0], state.server["head"]["kernel"])
