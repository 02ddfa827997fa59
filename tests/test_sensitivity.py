"""Measured sensitivity (ifjax.measure_sensitivity) and the allocation on its curves (allocate(method="measured"))."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax._budget import hull_scores
from ifjax._sensitivity import pad_group
from ifjax._spec import flatten, unflatten


@pytest.fixture(scope="module")
def resnet():
  """A random ResNet20 whose BNs have non-trivial statistics and affine parameters, and 16 inputs."""
  module, spec = ifjax.models.get("resnet20")
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  flat = dict(flatten(module.init(jax.random.key(0), x[:1])))
  rng = np.random.default_rng(0)
  draws = {"mean": lambda n: rng.normal(0, 0.3, n), "var": lambda n: rng.uniform(0.5, 2.0, n),
           "scale": lambda n: rng.uniform(0.5, 1.5, n), "bias": lambda n: rng.normal(0, 0.2, n)}
  for p, a in flat.items():
    leaf = p.rsplit("/", 1)[1]
    if p.startswith("batch_stats/") or (leaf in ("scale", "bias") and a.ndim == 1 and "bn" in p):
      flat[p] = jnp.asarray(draws[leaf](a.shape), jnp.float32)
  v = unflatten(flat)
  return module, spec, v, x


def _kl(p_logits, q_logits):
  p, q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


@pytest.mark.parametrize("group", ["layer2_1/conv1", "stream1", "stream2b"])
def test_padded_network_computes_the_pruned_one(resnet, group):
  """Dead neurons inserted after the kept ones (at a segment's offset for stream2b) change nothing: the padded
  network at the dense shapes gives the pruned network's logits."""
  module, spec, v, x = resnet
  pl = ifjax.plan(v, spec, {group: 0.5})
  small = ifjax.apply_plan(v, spec, pl)
  small_module, _ = ifjax.models.get("resnet20", widths=ifjax.widths(v, spec, pl))
  n = pl[group].n
  padded = unflatten(pad_group(flatten(small), spec, group, n, n - n // 2))
  assert jax.tree.map(jnp.shape, padded) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(module.apply(padded, x, train=False), small_module.apply(small, x, train=False),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_measured_loss_is_the_kl_of_the_pruned_network(resnet, recalibrate):
  """Each probe's loss is the KL divergence of the actually pruned (and, with recalibrate, BN re-estimated)
  network, built at its own shapes the slow way, from the dense network given the same BN treatment."""
  module, spec, v, x = resnet
  group = "layer3_0/conv1"
  curves = ifjax.measure_sensitivity(module.apply, v, spec, x, ratios=(0.25, 0.5), groups=[group],
                                     recalibrate=recalibrate, batch_size=8, progress=False, normalization="paper")
  assert list(curves.kept[group]) == [48, 32] and curves.size == {group: 64}
  batches = [x[:8], x[8:]]
  dense = module.apply(v, x, train=False)
  if recalibrate:
    whole = ifjax.plan(v, spec, 0.0, fuse=False)
    reset = ifjax.recalibrate_batchnorm(module.apply, ifjax.apply_plan(v, spec, whole), v, spec, whole, batches)
    assert _kl(dense, module.apply(reset, x, train=False)) > 1e-4  # the reference differs from the dense net
    dense = module.apply(reset, x, train=False)
  for r, loss in zip(curves.ratios, curves.loss[group]):
    pl = ifjax.plan(v, spec, {group: float(r)}, normalization="paper")
    small = ifjax.apply_plan(v, spec, pl)
    small_module, _ = ifjax.models.get("resnet20", widths=ifjax.widths(v, spec, pl))
    if recalibrate:
      small = ifjax.recalibrate_batchnorm(small_module.apply, small, v, spec, pl, batches)
    assert loss == pytest.approx(_kl(dense, small_module.apply(small, x, train=False)), rel=1e-3, abs=1e-6)
  assert curves.loss[group][1] > curves.loss[group][0] > 0


def test_hull_scores_follow_the_lower_convex_hull():
  """Loss at 0, 2, 5, 8 neurons removed of 10: 0, 0.1, 0.5, 0.6. (5, 0.5) lies above the chord from (2, 0.1) to
  (8, 0.6), so the hull's slopes are 0.05 for two neurons, then 0.5 / 6 for the rest (also beyond the last probe)."""
  curves = ifjax.SensitivityCurves(np.array([0.2, 0.5, 0.8]), {"a": np.array([8, 5, 2])}, {"a": 10},
                                   {"a": np.array([0.1, 0.5, 0.6])})
  scores = hull_scores(curves, {"a": 10})["a"]
  np.testing.assert_allclose(scores, [0.05] * 2 + [0.5 / 6] * 8, rtol=1e-6)
  assert np.all(np.diff(scores) > 0)  # strictly increasing: a cut takes one neuron at a time
  with pytest.raises(ValueError, match="no measurement for groups"):
    hull_scores(curves, {"a": 10, "b": 4})
  with pytest.raises(ValueError, match="at width 10"):
    hull_scores(curves, {"a": 12})


@pytest.fixture(scope="module")
def mlp():
  module, spec = ifjax.models.get("mlp")  # 20 -> 128 -> 64 -> 10
  x = jax.random.normal(jax.random.key(2), (64, 20))
  return module, spec, module.init(jax.random.key(0), x[:1]), x


@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.8])
def test_measured_allocation_meets_the_budget_to_one_neuron_per_group(mlp, fraction):
  module, spec, v, x = mlp
  curves = ifjax.measure_sensitivity(module.apply, v, spec, x, recalibrate=False, progress=False)
  alloc = ifjax.allocate(v, spec, target_params=fraction, method="measured", curves=curves)
  a, b = alloc.kept["dense0"], alloc.kept["dense1"]
  params = lambda a, b: 20 * a + a + a * b + b + b * 10 + 10
  assert alloc.cost == params(a, b) <= fraction * alloc.dense_cost
  assert fraction * alloc.dense_cost - alloc.cost < (21 + b) + (a + 11)  # one more neuron per group would not fit
  assert ifjax.param_count(ifjax.prune(v, spec, alloc.ratios)) == alloc.cost


def test_measured_allocation_cuts_the_group_that_does_not_matter(mlp):
  """Half of dense1's neurons are dead (zero weights and bias): removing them (the l1 order takes them first)
  changes nothing, so the allocation takes a small saving from them alone and leaves dense0 whole."""
  module, spec, v, x = mlp
  v = flax.core.unfreeze(v)
  v["params"]["dense1"]["kernel"] = v["params"]["dense1"]["kernel"].at[:, 32:].set(0.0)
  v["params"]["dense1"]["bias"] = v["params"]["dense1"]["bias"].at[32:].set(0.0)
  curves = ifjax.measure_sensitivity(module.apply, v, spec, x, recalibrate=False, progress=False, fuse=False)
  assert np.all(curves.loss["dense1"][:2] < 1e-6) and np.all(curves.loss["dense0"] > 1e-4)
  alloc = ifjax.allocate(v, spec, target_params=0.9, method="measured", curves=curves)
  assert alloc.kept["dense0"] == 128 and 32 <= alloc.kept["dense1"] < 64


def test_bad_inputs(mlp, resnet):
  module, spec, v, x = mlp
  with pytest.raises(ValueError, match=r"ratios must be non-empty and in \(0, 1\)"):
    ifjax.measure_sensitivity(module.apply, v, spec, x, ratios=(0.5, 1.0), recalibrate=False)
  with pytest.raises(ValueError, match="inputs must be"):
    ifjax.measure_sensitivity(module.apply, v, spec, x[:1], recalibrate=False)
  with pytest.raises(ValueError, match="needs batch_stats"):
    ifjax.measure_sensitivity(module.apply, v, spec, x)
  with pytest.raises(ValueError, match="needs curves="):
    ifjax.allocate(v, spec, target_params=0.5, method="measured")
  with pytest.raises(ValueError, match="needs curves="):
    ifjax.allocate(v, spec, target_params=0.5, curves=object())
  rmodule, rspec, rv, rx = resnet
  with pytest.raises(ValueError, match="one input"):
    ifjax.measure_sensitivity(rmodule.apply, rv, rspec, rx[:9], batch_size=8)
