"""Cost counting: ifjax.flops (XLA's cost analysis) and ifjax.param_count."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
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
