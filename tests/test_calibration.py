"""Activation-aware importance (Wanda-sp, FLAP), FLAP's bias compensation and activation-space fusion costs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax.calibration import CalibrationError, compensate_bias, consumer_statistics, flap, wanda


class Net(nn.Module):
  """x (batch, tokens, 4) -> Dense 6 -> gelu -> Dense 3: the hidden group's consumer is ``out``."""

  bias: bool = True
  width: int = 6

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.width, name="hidden")(x))
    return nn.Dense(3, use_bias=self.bias, name="out")(h)


SPEC = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1), ("params/hidden/bias", 0)],
                               [("params/out/kernel", 0)])])


def _setup(bias=True):
  x = jax.random.normal(jax.random.key(1), (8, 5, 4)) + 0.5
  variables = Net(bias).init(jax.random.key(0), x)
  return Net(bias), variables, x


def _hidden(variables, x):
  p = variables["params"]["hidden"]
  return np.asarray(nn.gelu(x @ p["kernel"] + p["bias"])).reshape(-1, 6)


def test_statistics_are_the_consumer_inputs_moments():
  module, variables, x = _setup()
  stats = consumer_statistics(module.apply, variables, SPEC, [x[:4], x[4:]], samples=7)
  h = _hidden(variables, x)
  st = stats["params/out/kernel"]
  np.testing.assert_allclose(st.mean, h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st.square, (h ** 2).mean(0), rtol=1e-5, atol=1e-6)
  assert st.count == 40 and st.samples.shape == (6, 7) and st.axes == (0,)
  assert stats.features(variables)["hidden"].shape == (6, 7)


def test_wanda_and_flap_are_their_formulas():
  module, variables, x = _setup()
  stats = consumer_statistics(module.apply, variables, SPEC, [x])
  h, w = _hidden(variables, x), np.asarray(variables["params"]["out"]["kernel"])
  expect_wanda = np.abs(w).sum(1) * np.sqrt((h ** 2).mean(0))
  expect_flap = (w ** 2).sum(1) * h.var(0)
  np.testing.assert_allclose(wanda(stats)(variables, SPEC[0]), expect_wanda / expect_wanda.mean(), rtol=1e-4)
  np.testing.assert_allclose(flap(stats)(variables, SPEC[0]), expect_flap / expect_flap.mean(), rtol=1e-3)
  keep = ifjax.plan(variables, SPEC, 0.5, importance=wanda(stats), method="default")["hidden"].keep
  np.testing.assert_array_equal(keep, np.sort(np.argsort(-expect_wanda, kind="stable")[:3]))


@pytest.mark.parametrize("method,measured", [("default", None), ("if", "small"), ("if", "keep_shapes")])
def test_bias_compensation_keeps_the_mean_output(method, measured):
  module, variables, x = _setup()
  stats = consumer_statistics(module.apply, variables, SPEC, [x])
  pl = ifjax.plan(variables, SPEC, 0.5, importance=wanda(stats), method=method)
  small = ifjax.apply_plan(variables, SPEC, pl)
  small_stats = None
  if measured == "small":
    small_stats = consumer_statistics(Net(width=3).apply, small, pl.spec(), [x])
  elif measured == "keep_shapes":
    small_stats = consumer_statistics(module.apply, ifjax.apply_plan(variables, SPEC, pl, keep_shapes=True), SPEC,
                                      [x])
  fixed = compensate_bias(small, variables, SPEC, pl, stats, small_stats)
  dense_mean = np.asarray(module.apply(variables, x)).reshape(-1, 3).mean(0)
  before = np.asarray(Net(width=3).apply(small, x)).reshape(-1, 3).mean(0)
  after = np.asarray(Net(width=3).apply(fixed, x)).reshape(-1, 3).mean(0)
  assert np.abs(after - dense_mean).max() < np.abs(before - dense_mean).max()
  # default: the kept inputs are the dense ones; fusion: the small model's own input means: both exact
  np.testing.assert_allclose(after, dense_mean, rtol=1e-5, atol=1e-5)
  assert variables["params"]["out"]["bias"].shape == fixed["params"]["out"]["bias"].shape  # inputs untouched


def test_activation_features_fuse_planted_duplicates_exactly():
  module, variables, x = _setup()
  p = jax.tree_util.tree_map(np.array, variables)["params"]
  p["hidden"]["kernel"][:, 3:] = p["hidden"]["kernel"][:, :3]  # neurons 3..5 duplicate 0..2
  p["hidden"]["bias"][3:] = p["hidden"]["bias"][:3]
  variables = {"params": p}
  stats = consumer_statistics(module.apply, variables, SPEC, [x], samples=40)
  features = stats.features(variables)
  pl = ifjax.plan(variables, SPEC, 0.5, normalization="barycentric", features=features)
  assert sorted(np.asarray(pl["hidden"].transport).argmax(1) % 3) == [0, 0, 1, 1, 2, 2]
  small = ifjax.apply_plan(variables, SPEC, pl)
  np.testing.assert_allclose(Net(width=3).apply(small, x), module.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
  module, variables, x = _setup()
  with pytest.raises(CalibrationError, match="empty"):
    consumer_statistics(module.apply, variables, SPEC, [])
  stats = consumer_statistics(module.apply, variables, SPEC, [x])
  pl = ifjax.plan(variables, SPEC, 0.5, method="default")
  module_nb, variables_nb, _ = _setup(bias=False)
  stats_nb = consumer_statistics(module_nb.apply, variables_nb, SPEC, [x])
  small_nb = ifjax.apply_plan(variables_nb, SPEC, pl)
  with pytest.raises(CalibrationError, match="'out' has no bias"):
    compensate_bias(small_nb, variables_nb, SPEC, pl, stats_nb)
  with pytest.raises(ValueError, match=r"features\['hidden'\] has shape \(2, 3\)"):
    ifjax.plan(variables, SPEC, 0.5, features={"hidden": np.zeros((2, 3))})
  conv_spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])

  def apply_custom(v, x):  # not a linen Dense consumer: nothing is intercepted
    return jnp.tanh(x @ v["params"]["hidden"]["kernel"]) @ v["params"]["out"]["kernel"]

  with pytest.raises(CalibrationError, match="no call of the consumer layers"):
    consumer_statistics(apply_custom, variables, conv_spec, [x])
  assert stats  # the working statistics were built


def test_least_squares_merge_is_exact_for_linearly_dependent_neurons():
  """Neurons 3..5 are 2x neurons 0..2 after a ReLU-free linear layer: the regression puts them back exactly."""

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="out")(nn.Dense(6, name="hidden")(x))

  x = jax.random.normal(jax.random.key(1), (64, 4))
  variables = jax.tree_util.tree_map(np.array, Linear().init(jax.random.key(0), x))
  p = variables["params"]
  p["hidden"]["kernel"][:, 3:] = 2 * p["hidden"]["kernel"][:, :3]
  p["hidden"]["bias"][3:] = 2 * p["hidden"]["bias"][:3] + 0.5  # an offset: needs the intercept
  stats = consumer_statistics(Linear().apply, variables, SPEC, [x], gram=True)
  pl = ifjax.plan(variables, SPEC, 0.5, method="default", importance={"hidden": np.array([3, 2, 1, 0, 0, 0.])})
  merged = ifjax.calibration.least_squares_merge(pl, variables, SPEC, stats, ridge=0.0)
  small = compensate_bias(ifjax.apply_plan(variables, SPEC, merged), variables, SPEC, merged, stats)
  small_apply = ifjax.resize(Linear().apply, variables, small, x)
  np.testing.assert_allclose(small_apply(small, x), Linear().apply(variables, x), rtol=1e-4, atol=1e-4)
  with pytest.raises(CalibrationError, match="gram=True"):
    ifjax.calibration.least_squares_merge(pl, variables, SPEC, consumer_statistics(Linear().apply, variables,
                                                                                   SPEC, [x]))
  with pytest.raises(CalibrationError, match="plain-pruning plan"):
    ifjax.calibration.least_squares_merge(ifjax.plan(variables, SPEC, 0.5), variables, SPEC, stats)


def test_refit_consumers_matches_least_squares_merge_and_refits_heads():
  """On an MLP both least-squares paths give one model; on a head group the refit uses every dim of a head."""
  module, variables, x = _setup()
  stats = consumer_statistics(module.apply, variables, SPEC, [x], gram=True)
  pl = ifjax.plan(variables, SPEC, 0.5, importance=wanda(stats), method="default")
  merged = ifjax.calibration.least_squares_merge(pl, variables, SPEC, stats, ridge=0.0)
  a = compensate_bias(ifjax.apply_plan(variables, SPEC, merged), variables, SPEC, merged, stats)
  b = ifjax.calibration.refit_consumers(ifjax.apply_plan(variables, SPEC, pl), variables, SPEC, pl, stats,
                                       ridge=0.0)
  np.testing.assert_allclose(Net(width=3).apply(a, x), Net(width=3).apply(b, x), rtol=1e-4, atol=1e-4)

  class Heads(nn.Module):  # 4 heads of 3 dims, the consumer reads (heads, dims); head 3 duplicates head 0
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((4, 3), name="v")(x)
      return nn.DenseGeneral(2, axis=(-2, -1), name="o")(jnp.tanh(h))

  hv = jax.tree_util.tree_map(np.array, Heads().init(jax.random.key(0), x))
  hv["params"]["v"]["kernel"][:, 3] = hv["params"]["v"]["kernel"][:, 0]
  hv["params"]["v"]["bias"][3] = hv["params"]["v"]["bias"][0]
  hspec = ifjax.Spec([ifjax.Group("heads", [("params/v/kernel", 1), ("params/v/bias", 0)],
                                  [("params/o/kernel", 0)])])
  hstats = consumer_statistics(Heads().apply, hv, hspec, [x], gram=True)
  hpl = ifjax.plan(hv, hspec, 0.25, method="default", importance={"heads": np.array([3., 2, 1, 0])})
  refit = ifjax.calibration.refit_consumers(ifjax.apply_plan(hv, hspec, hpl), hv, hspec, hpl, hstats, ridge=0.0)
  small_apply = ifjax.resize(Heads().apply, hv, refit, x)
  np.testing.assert_allclose(small_apply(refit, x), Heads().apply(hv, x), rtol=1e-3, atol=1e-4)
