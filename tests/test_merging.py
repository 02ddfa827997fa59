"""The merging methods of ``plan(method=...)`` and Intra-Fusion's variants (``merge_threshold``, ``repair``):
exact where they must be (planted duplicates are merged without changing the function, nothing pruned changes
nothing), the repair's statistics, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import _merging

VARIANTS = {
    "default": dict(method="default"),
    "if": dict(),
    "if_bary_repair": dict(normalization="barycentric", repair="statistics"),
    "if_bary_threshold": dict(normalization="barycentric", merge_threshold=0.5),
    "neuron_merging": dict(method="neuron_merging"),
    "model_folding": dict(method="model_folding"),
}


def _mlp(scale):
  """A ReLU MLP whose hidden neurons 3, 4, 5 are ``scale`` times neurons 0, 1, 2 (weights and bias)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 6)).astype(np.float32)
  b = rng.normal(size=6).astype(np.float32)
  w[:, 3:], b[3:] = w[:, :3] * scale, b[:3] * scale
  v = {"params": {"h": {"kernel": w, "bias": b}, "o": {"kernel": rng.normal(size=(6, 2)).astype(np.float32)}}}
  spec = ifjax.Spec([ifjax.Group("h", [("params/h/kernel", 1), ("params/h/bias", 0)], [("params/o/kernel", 0)])])
  return v, spec, rng.normal(size=(64, 5)).astype(np.float32)


def _mlp_out(v, x):
  return np.maximum(x @ v["params"]["h"]["kernel"] + v["params"]["h"]["bias"], 0) @ v["params"]["o"]["kernel"]


KEEP_FIRST = {"h": np.array([6, 5, 4, 3, 2, 1], np.float32)}  # importance: neurons 0, 1, 2 are kept


def test_neuron_merging_absorbs_positive_multiples_exactly():
  v, spec, x = _mlp(np.array([0.5, 0.6, 0.7], np.float32))
  pl = ifjax.plan(v, spec, 0.5, method="neuron_merging", importance=KEEP_FIRST)
  np.testing.assert_array_equal(pl["h"].keep, [0, 1, 2])
  np.testing.assert_allclose(pl["h"].consumer_map[:, 3:], np.diag([0.5, 0.6, 0.7]), rtol=1e-6)
  np.testing.assert_allclose(_mlp_out(ifjax.apply_plan(v, spec, pl), x), _mlp_out(v, x), rtol=1e-5, atol=1e-5)
  default = ifjax.prune(v, spec, 0.5, importance=KEEP_FIRST)
  assert np.abs(_mlp_out(default, x) - _mlp_out(v, x)).max() > 0.1  # the planted neurons mattered


def test_neuron_merging_threshold_leaves_dissimilar_neurons_pruned():
  v, spec, _ = _mlp(np.array([0.5, 0.6, 0.7], np.float32))
  v["params"]["h"]["kernel"][:, 5] = -v["params"]["h"]["kernel"][:, 2]  # neuron 5 now points away from 2
  v["params"]["h"]["bias"][5] = -v["params"]["h"]["bias"][2]
  pl = ifjax.plan(v, spec, 0.5, method="neuron_merging", importance=KEEP_FIRST, merge_threshold=0.9)
  assert np.count_nonzero(pl["h"].consumer_map[:, 5]) == 0 and np.count_nonzero(pl["h"].consumer_map[:, 3:5]) == 2


@pytest.mark.parametrize("variant", ["if_bary", "if_bary_threshold", "model_folding"])
def test_exact_duplicates_are_merged_without_changing_the_function(variant):
  v, spec, x = _mlp(np.ones(3, np.float32))
  options = {"if_bary": dict(normalization="barycentric"), **VARIANTS}[variant]
  small = ifjax.apply_plan(v, spec, ifjax.plan(v, spec, 0.5, importance=KEEP_FIRST, **options))
  assert small["params"]["h"]["kernel"].shape == (5, 3)
  np.testing.assert_allclose(_mlp_out(small, x), _mlp_out(v, x), rtol=1e-5, atol=1e-5)


def _conv_bn(seed=0):
  """The zoo's DigitsCNN at random weights, conv1's channels 32..63 duplicates of 0..31 (kernel, bias, BN)."""
  module, spec = ifjax.models.get("digits_cnn")
  x = jax.random.normal(jax.random.key(seed), (16, 8, 8, 1))
  v = jax.tree.map(np.array, module.init(jax.random.key(seed), x))
  rng = np.random.default_rng(seed)
  for coll, name in (("params", "bn1"), ("batch_stats", "bn1")):
    for k, a in v[coll][name].items():
      a[:] = rng.uniform(0.5, 1.5, a.shape) if k in ("scale", "var") else rng.normal(size=a.shape) * 0.1
  for arr in (v["params"]["conv1"]["kernel"], v["params"]["conv1"]["bias"], *v["params"]["bn1"].values(),
              *v["batch_stats"]["bn1"].values()):
    arr[..., 32:] = arr[..., :32]
  importance = {"conv1": np.concatenate([np.arange(64, 32, -1), np.arange(32, 0, -1)]).astype(np.float32)}
  return module, spec, v, x, importance


@pytest.mark.parametrize("variant", ["if_bary_repair", "model_folding"])
def test_repair_leaves_merged_duplicates_alone(variant):
  """Duplicates have correlation 1: the merged channel has its sources' deviation already, so the repair
  scales by 1 and shifts by 0, and the network computes what it did."""
  module, spec, v, x, importance = _conv_bn()
  pl = ifjax.plan(v, spec, {"conv1": 0.5}, importance=importance, **VARIANTS[variant])
  np.testing.assert_allclose(pl["conv1"].producer_shift, 0, atol=1e-5)
  small = ifjax.apply_plan(v, spec, pl)
  small_module, _ = ifjax.models.get("digits_cnn", widths=pl.widths())
  np.testing.assert_allclose(small_module.apply(small, x), module.apply(v, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nothing_pruned_changes_nothing(variant):
  module, spec, v, x, _ = _conv_bn(1)
  small = ifjax.intra_fuse(v, spec, 0.0, **VARIANTS[variant])
  np.testing.assert_allclose(module.apply(small, x), module.apply(v, x), rtol=1e-4, atol=1e-4)


def test_repair_statistics_restores_the_sources_deviation():
  """Independent channels of deviations sd averaged in pairs: the merged deviation is sqrt(sd1^2 + sd2^2) / 2;
  scaled by the repair it is (sd1 + sd2) / 2 again, about the same mean; single-source rows are left alone."""
  p = np.array([[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]], np.float32)
  mean, sd = np.array([1.0, -2.0, 0.5, 3.0]), np.array([1.0, 3.0, 2.0, 2.0])
  scale, shift = _merging.repair_statistics(p, mean, sd, np.eye(4))
  np.testing.assert_allclose(scale, [2.0 / (np.sqrt(10) / 2), 1.0, 2.0 / np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(shift, (1 - scale) * (p @ mean), rtol=1e-6)
  rng = np.random.default_rng(0)
  z = mean + sd * rng.normal(size=(200_000, 4))
  merged = (z @ p.T) * scale + shift
  np.testing.assert_allclose(merged.std(0), np.abs(p) @ sd, rtol=0.01)
  np.testing.assert_allclose(merged.mean(0), p @ mean, atol=0.02)


def test_repair_improves_the_weights_only_network_over_plain_averaging():
  """On a Conv-BN net with dissimilar neurons, averaging shrinks the merged channels' spread; the repair
  brings the fused network's output closer to the dense one (data-free, weights only)."""
  module, spec, v, x, _ = _conv_bn(2)
  dense = np.asarray(module.apply(v, x))
  errors = {}
  for repair in ("none", "statistics"):
    pl = ifjax.plan(v, spec, 0.5, normalization="barycentric", repair=repair)
    small_module, _ = ifjax.models.get("digits_cnn", widths=pl.widths())
    errors[repair] = np.linalg.norm(np.asarray(small_module.apply(ifjax.apply_plan(v, spec, pl), x)) - dense)
  assert errors["statistics"] < errors["none"]


def test_errors_name_the_option():
  v, spec, _ = _mlp(np.ones(3, np.float32))
  with pytest.raises(ValueError, match="method must be one of"):
    ifjax.plan(v, spec, 0.5, method="merge")
  with pytest.raises(ValueError, match="repair='statistics' needs a BatchNorm"):  # this MLP has none
    ifjax.plan(v, spec, 0.5, repair="statistics")
  with pytest.raises(ValueError, match=r"merge_threshold is a cosine: it must be in \[-1, 1\], got 1.5"):
    ifjax.plan(v, spec, 0.5, merge_threshold=1.5)
  with pytest.raises(TypeError, match="merge_threshold must be a number"):
    ifjax.plan(v, spec, 0.5, merge_threshold="high")
  with pytest.raises(ValueError, match="merge_threshold applies to method 'if' and 'neuron_merging'"):
    ifjax.plan(v, spec, 0.5, method="model_folding", merge_threshold=0.5)
  with pytest.raises(ValueError, match="method 'neuron_merging' keeps its producers"):
    ifjax.plan(v, spec, 0.5, method="neuron_merging", repair="statistics")
  with pytest.raises(ValueError, match="cannot be traced"):
    jax.jit(lambda v: ifjax.plan(v, spec, 0.5, method="neuron_merging", solver="sinkhorn"))(v)
  with pytest.warns(DeprecationWarning, match="fuse= is deprecated"):
    old = ifjax.plan(v, spec, 0.5, fuse=False)
  assert all(gp.producer_map is None for gp in old.values())
  assert ifjax.plan(v, spec, 0.5, method="model_folding")["h"].producer_shift is None  # no BN: no default repair
  assert jnp.asarray(0.5).ndim == 0  # a 0-d threshold is a number too
  assert ifjax.plan(v, spec, 0.5, merge_threshold=jnp.float32(0.5))["h"].transport is not None
