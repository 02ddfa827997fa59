"""synthesize_inputs / bn_statistics_gap: inputs made from the BN statistics alone reproduce those statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax


class DenseBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Dense(3)(x))


def _dense_bn(running_mean, running_var):
  module = DenseBN()
  v = module.init(jax.random.key(0), jnp.ones((1, 4)))
  v = jax.tree.map(lambda a: a, v)
  v["batch_stats"]["BatchNorm_0"] = {"mean": jnp.asarray(running_mean, jnp.float32),
                                     "var": jnp.asarray(running_var, jnp.float32)}
  return module, v


def _dense_out(v, x):
  p = v["params"]["Dense_0"]
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def test_synthetic_inputs_reproduce_the_running_statistics():
  module, v = _dense_bn(np.zeros(3), np.ones(3))
  w = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
  mu_x, sd_x = np.array([0.5, -1.0, 0.0, 2.0]), np.array([1.0, 0.5, 2.0, 1.5])
  # statistics that inputs with independent features of this mean / std would give: reachable together
  # with the input prior
  running_mean = _dense_out(v, mu_x[None])[0]
  running_var = (w**2 * sd_x[:, None] ** 2).sum(0)
  module, v = _dense_bn(running_mean, running_var)
  out = ifjax.synthesize_inputs(module.apply, v, (4,), count=96, batch_size=48, steps=400, learning_rate=0.05,
                                input_mean=mu_x, input_std=sd_x, progress=False)
  assert out.inputs.shape == (96, 4) and out.inputs.dtype == np.float32
  assert out.losses.shape == (2, 401)
  assert np.all(out.losses[:, -1] < out.losses[:, 0] / 10)
  for batch in (out.inputs[:48], out.inputs[48:]):
    y = _dense_out(v, batch)
    np.testing.assert_allclose(y.mean(0), running_mean, atol=0.03 * np.sqrt(running_var).max())
    np.testing.assert_allclose(y.std(0), np.sqrt(running_var), rtol=0.03)
  assert ifjax.bn_statistics_gap(module.apply, v, out.inputs[:48]) < 0.05 * out.losses[0, 0]


def test_gap_is_zero_on_the_data_the_statistics_came_from():
  x = np.random.default_rng(0).normal(1.0, 2.0, (64, 4)).astype(np.float32)
  module, v = _dense_bn(np.zeros(3), np.ones(3))
  y = _dense_out(v, x)
  module, v = _dense_bn(y.mean(0), y.var(0))
  assert ifjax.bn_statistics_gap(module.apply, v, x) < 1e-4
  assert ifjax.bn_statistics_gap(module.apply, v, x + 1.0) > 0.1


def test_same_seed_same_inputs_and_batches_of_one_are_avoided():
  module, v = _dense_bn(np.zeros(3), np.ones(3))
  a = ifjax.synthesize_inputs(module.apply, v, (4,), count=9, batch_size=8, steps=3, progress=False)
  b = ifjax.synthesize_inputs(module.apply, v, (4,), count=9, batch_size=8, steps=3, progress=False)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert a.inputs.shape == (9, 4) and a.losses.shape == (2, 4)


def test_bad_inputs():
  module, v = _dense_bn(np.zeros(3), np.ones(3))
  with pytest.raises(ValueError, match="no batch_stats"):
    ifjax.synthesize_inputs(lambda v, x, **kw: (x, {}), {"params": v["params"]}, (4,), progress=False)
  with pytest.raises(ValueError, match="count must be >= 1"):
    ifjax.synthesize_inputs(module.apply, v, (4,), count=0, progress=False)
  with pytest.raises(ValueError, match="steps must be >= 0"):
    ifjax.synthesize_inputs(module.apply, v, (4,), steps=-1, progress=False)
