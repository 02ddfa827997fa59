"""Cost counting: ifjax.flops (XLA's cost analysis) and ifjax.param_count."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax


class TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
    return nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)


def _hand_count(batch, size, c_in, c1, c2):
  """2 FLOPs per multiply-add over the taps inside the image (SAME conv), + bias and relu per output, then
  the VALID conv (every tap inside)."""
  taps_1d = 3 * size - 2  # positions x taps inside the image along one axis: 2 + 3 * (size - 2) + 2
  conv1 = 2 * batch * c1 * c_in * taps_1d**2
  valid = size - 2
  conv2 = 2 * batch * valid * valid * c2 * 9 * c1
  return conv1 + 2 * batch * size * size * c1 + conv2


@pytest.mark.parametrize("batch,size", [(1, 10), (2, 7)])
def test_flops_equals_a_hand_count(batch, size):
  m = TwoConvs()
  x = jnp.ones((batch, size, size, 3))
  v = m.init(jax.random.key(0), x)
  assert ifjax.flops(m.apply, v, x) == _hand_count(batch, size, 3, 8, 4)
  assert ifjax.param_count(v) == 3 * 3 * 3 * 8 + 8 + 3 * 3 * 8 * 4


def test_flops_and_params_of_a_pruned_model():
  """Through a zoo rebuild at the fused widths: both drop, the FLOPs roughly with the square of the width."""
  module, spec = ifjax.models.get("vgg11_bn")
  x = jnp.ones((1, 32, 32, 3))
  v = module.init(jax.random.key(0), x)
  small = ifjax.intra_fuse(v, spec, 0.5)
  small_module, _ = ifjax.models.get("vgg11_bn", widths=ifjax.widths(small, spec))
  dense_flops = ifjax.flops(module.apply, v, x, train=False)
  small_flops = ifjax.flops(small_module.apply, small, x, train=False)
  assert 0.2 < small_flops / dense_flops < 0.3
  assert ifjax.param_count(v) == 9_231_114  # the released CIFAR VGG11-BN's count
  assert 0.2 < ifjax.param_count(small) / ifjax.param_count(v) < 0.3
  with pytest.raises(flax.errors.ScopeParamShapeError):
    ifjax.flops(module.apply, small, x, train=False)  # pruned variables need the rebuilt module


@pytest.fixture(scope="module")
def mlp():
  module, spec = ifjax.models.get("mlp")  # 20 -> 128 -> 64 -> 10
  return module, spec, module.init(jax.random.key(0), jnp.ones((1, 20)))


def _mlp_params(a, b):
  return 20 * a + a + a * b + b + b * 10 + 10


@pytest.mark.parametrize("method", ["uniform", "global", "sensitivity"])
@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.8])
def test_allocate_meets_a_parameter_budget_to_one_neuron_per_group(mlp, method, fraction):
  _, spec, v = mlp
  dense = _mlp_params(128, 64)
  alloc = ifjax.allocate(v, spec, target_params=fraction, method=method)
  a, b = alloc.kept["dense0"], alloc.kept["dense1"]
  assert alloc.dense_cost == dense and alloc.cost == _mlp_params(a, b)
  assert alloc.cost <= fraction * dense
  # within one neuron per group: the slack is less than what one more neuron in each group would cost
  assert fraction * dense - alloc.cost < (21 + b) + (a + 11)
  # the ratios give exactly these widths, and the pruned network has this many parameters
  small = ifjax.prune(v, spec, alloc.ratios)
  assert ifjax.widths(small, spec) == alloc.kept
  assert ifjax.param_count(small) == alloc.cost
  if method == "uniform":  # one ratio for both groups (up to the floor of n * (1 - r))
    assert abs(a / 128 - b / 64) <= 1 / 64


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_allocate_flops_protect_and_errors(mlp, method):
  module, spec, v = mlp
  x = jnp.ones((1, 20))
  rebuild = lambda w: ifjax.models.get("mlp", widths=w)[0].apply
  alloc = ifjax.allocate(v, spec, target_flops=0.5, rebuild=rebuild, example_args=(x,), protect=["dense1"],
                         method=method)
  assert set(alloc.ratios) == {"dense0"} and alloc.kept["dense0"] < 128
  small = ifjax.prune(v, spec, alloc.ratios)
  small_module, _ = ifjax.models.get("mlp", widths=ifjax.widths(small, spec))
  assert ifjax.flops(small_module.apply, small, x) == alloc.cost <= 0.5 * alloc.dense_cost
  one_more, _ = ifjax.models.get("mlp", widths={"dense0": alloc.kept["dense0"] + 1})
  grown = jax.eval_shape(one_more.init, jax.random.key(0), x)
  assert ifjax.flops(one_more.apply, grown, x) > 0.5 * alloc.dense_cost  # one more neuron would not fit
  with pytest.raises(ValueError, match="below what the network costs with one neuron per selected group"):
    ifjax.allocate(v, spec, target_params=0.01, protect=["dense1"], method=method)
  with pytest.raises(ValueError, match="method must be"):
    ifjax.allocate(v, spec, target_params=0.5, method="lamp")
  with pytest.raises(ValueError, match="exactly one of"):
    ifjax.allocate(v, spec)
  with pytest.raises(ValueError, match="needs rebuild"):
    ifjax.allocate(v, spec, target_flops=0.5)
  with pytest.raises(ValueError, match="every selected group is protected"):
    ifjax.allocate(v, spec, target_params=0.5, protect=["dense0", "dense1"])


def test_iterative_fuse_with_one_step_is_one_shot(mlp):
  _, spec, v = mlp
  for fuse in (True, False):
    one = ifjax.iterative_fuse(v, spec, 0.5, steps=1, fuse=fuse)
    shot = ifjax.intra_fuse(v, spec, 0.5) if fuse else ifjax.prune(v, spec, 0.5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), one, shot)


def test_iterative_fuse_in_four_steps_reaches_the_one_shot_widths():
  """ResNet20's option-A streams are segment groups with fixed sizes: the spec is rebuilt at every step."""
  module, spec = ifjax.models.get("resnet20")
  x = jnp.ones((2, 32, 32, 3))
  v = module.init(jax.random.key(0), x)
  build = lambda w: ifjax.models.get("resnet20", widths=w)[1]
  internal = [g.name for g in spec.groups if not g.name.startswith("stream")]
  it = ifjax.iterative_fuse(v, build, 0.5, steps=4, groups=internal)
  shot = ifjax.intra_fuse(v, spec, 0.5, groups=internal)
  w = ifjax.widths(shot, spec)
  small_spec = build(w)
  assert ifjax.widths(it, small_spec) == w
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(it), jax.tree.leaves(shot)))  # another path
  small, _ = ifjax.models.get("resnet20", widths=w)
  assert np.isfinite(np.asarray(small.apply(it, x, train=False))).all()


class BnMLP(nn.Module):
  """x (d) -> fc1 -> bn1 -> relu (the group "h", 6 neurons) -> fc2 -> bn2 (5 outputs)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(nn.Dense(6, name="fc1")(x)))
    return nn.BatchNorm(use_running_average=True, name="bn2")(nn.Dense(5, use_bias=False, name="fc2")(h))


BN_SPEC = ifjax.Spec((ifjax.Group("h", [("params/fc1/kernel", 1), ("params/fc1/bias", 0)],
                                  [("params/fc2/kernel", 0)]),),
                     (("fc1", "bn1"), ("fc2", "bn2")))


def test_bn_sensitivity_is_the_expected_output_change_of_removing_a_neuron():
  """With Gaussian inputs and running statistics that are the true pre-BN moments, s_j equals the Monte-Carlo mean
  of ||bn2(fc2(h)) - bn2(fc2(h with neuron j zeroed))||^2: the BN statistics alone give it, no data."""
  d, n = 8, 100_000
  model = BnMLP()
  rng = np.random.default_rng(0)
  v = flax.core.unfreeze(model.init(jax.random.key(0), jnp.ones((1, d))))
  w1, b1 = np.asarray(v["params"]["fc1"]["kernel"]), rng.normal(size=6).astype(np.float32)
  v["params"]["fc1"]["bias"] = jnp.asarray(b1)
  v["batch_stats"]["bn1"] = {"mean": jnp.asarray(b1), "var": jnp.asarray((w1**2).sum(0))}  # x ~ N(0, I)
  v["params"]["bn1"] = {"scale": jnp.asarray(rng.normal(size=6), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
  v["batch_stats"]["bn2"] = {"mean": jnp.zeros(5), "var": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32)}
  sens = ifjax.bn_sensitivity(v, BN_SPEC)["h"]
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  full = model.apply(v, x)
  for j in range(6):
    cut = jax.tree.map(lambda a: a, v)
    cut["params"]["fc2"]["kernel"] = v["params"]["fc2"]["kernel"].at[j].set(0.0)
    change = np.asarray(jnp.sum((full - model.apply(cut, x)) ** 2, axis=1), np.float64)
    assert abs(sens[j] - change.mean()) < 4 * change.std() / np.sqrt(n) + 1e-9  # within 4 Monte-Carlo standard errors


def test_sensitivity_allocation_cuts_the_cheap_insensitive_group_first():
  """dense1's neurons barely reach the head: the sensitivity allocation takes the whole saving from them and
  leaves dense0 whole, where the uniform one cuts both."""
  module, spec = ifjax.models.get("mlp")
  v = flax.core.unfreeze(module.init(jax.random.key(0), jnp.ones((1, 20))))
  v["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 1e-3  # dense1's neurons hardly matter
  alloc = ifjax.allocate(v, spec, target_params=0.6, method="sensitivity")
  assert alloc.kept["dense0"] == 128 and alloc.kept["dense1"] < 64
  assert alloc.cost <= 0.6 * alloc.dense_cost < _mlp_params(128, alloc.kept["dense1"] + 1)
  uniform = ifjax.allocate(v, spec, target_params=0.6)
  assert uniform.kept["dense0"] < 128
