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


@pytest.mark.parametrize("method", ["uniform", "global"])
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


def test_allocate_flops_protect_and_errors(mlp):
  module, spec, v = mlp
  x = jnp.ones((1, 20))
  rebuild = lambda w: ifjax.models.get("mlp", widths=w)[0].apply
  alloc = ifjax.allocate(v, spec, target_flops=0.5, rebuild=rebuild, example_args=(x,), protect=["dense1"])
  assert set(alloc.ratios) == {"dense0"} and alloc.kept["dense0"] < 128
  small = ifjax.prune(v, spec, alloc.ratios)
  small_module, _ = ifjax.models.get("mlp", widths=ifjax.widths(small, spec))
  assert ifjax.flops(small_module.apply, small, x) == alloc.cost <= 0.5 * alloc.dense_cost
  with pytest.raises(ValueError, match="below what the network costs with one neuron per selected group"):
    ifjax.allocate(v, spec, target_params=0.01, protect=["dense1"])
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
