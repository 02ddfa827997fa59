"""trace_spec / check_spec on models nobody wrote a spec for."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax


def _randomized(variables, seed=0):
  """Random weights and non-trivial BN statistics, so permutation checks have teeth."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, a.dtype), variables)
  if "batch_stats" in out:
    out["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(0.5 + rng.uniform(size=a.shape), a.dtype) if "var" in jax.tree_util.keystr(p)
        else a * 0.1, out["batch_stats"])
  return out


def _members(g):
  return sorted((m.path, m.axis, m.offset) for m in g.members)


class UNetLike(nn.Module):
  """Encoder / decoder with a skip concatenation and a transposed upsampling."""

  @nn.compact
  def __call__(self, x):
    e1 = nn.relu(nn.Conv(4, (3, 3), name="enc1")(x))
    e2 = nn.relu(nn.Conv(6, (3, 3), strides=2, name="enc2")(e1))
    b, h, w, c = e2.shape  # nearest-neighbour 2x upsampling by broadcast + reshape
    up = jnp.broadcast_to(e2[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    d = nn.relu(nn.Conv(5, (3, 3), name="dec")(jnp.concatenate([e1, up], axis=-1)))
    return nn.Conv(2, (1, 1), name="head")(d)


class GroupedNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x))
    x = nn.relu(nn.Conv(6, (1, 1), name="mix")(x))
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


class FlattenNet(nn.Module):
  channels: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(self.channels, (3, 3), name="conv")(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(7, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="fc")(x)


class ResidualNet(nn.Module):
  """Residual add, BN after a bias-free conv, depthwise conv, dropout in eval mode."""

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn0")(nn.Conv(4, (3, 3), name="c0")(x)))
    y = y + nn.BatchNorm(use_running_average=True, name="sc_bn")(nn.Conv(4, (1, 1), use_bias=False, name="sc")(x))
    y = nn.relu(nn.Conv(6, (3, 3), name="c1")(y))
    y = nn.Dropout(0.5, deterministic=True)(y)
    d = nn.BatchNorm(use_running_average=True, name="dw_bn")(nn.Conv(6, (3, 3), feature_group_count=6, name="dw")(y))
    y = nn.relu(nn.Conv(5, (1, 1), name="c2")(nn.relu(d)))
    return nn.Dense(3, name="fc")(y.mean((1, 2)))


def _traced(module, shape):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  v = _randomized(module.init(jax.random.key(0), x))
  return v, ifjax.trace_spec(module.apply, v, x), x


def test_unet_concat_offsets():
  v, spec, x = _traced(UNetLike(), (2, 8, 8, 3))
  assert spec.names == ["enc1", "enc2", "dec"]
  assert _members(spec["enc1"]) == sorted([("params/enc1/kernel", 3, 0), ("params/enc1/bias", 0, 0),
                                           ("params/enc2/kernel", 2, 0), ("params/dec/kernel", 2, 0)])
  assert ("params/dec/kernel", 2, 4) in _members(spec["enc2"])  # after enc1's 4 channels
  ifjax.check_spec(UNetLike().apply, v, spec, x, scaling=True)
  small = ifjax.intra_fuse(v, spec, 0.5)
  assert small["params"]["dec"]["kernel"].shape == (3, 3, 2 + 3, 2)


def test_grouped_conv_groups_are_left_out_and_named():
  v, spec, x = _traced(GroupedNet(), (2, 6, 6, 3))
  # stem's channels are read by the grouped conv, grouped's are written by it: neither can be a Group
  assert spec.names == ["mix"]
  ifjax.check_spec(GroupedNet().apply, v, spec, x, scaling=True)


def test_dense_after_flatten_is_a_flat_member():
  v, spec, x = _traced(FlattenNet(), (2, 6, 6, 1))
  g = spec["conv"]
  flat = [m for m in g.consumers if isinstance(m, ifjax.FlatMember)]
  assert flat == [ifjax.FlatMember("params/hidden/kernel", 0, 0, 9, 1)]  # 3x3 positions, NHWC
  assert spec.batchnorms == (ifjax.BatchNormPair("conv", "bn"),)
  ifjax.check_spec(FlattenNet().apply, v, spec, x, scaling=True)
  small = ifjax.intra_fuse(v, spec, 0.4, groups="conv")
  assert small["params"]["hidden"]["kernel"].shape == (9 * 3, 7)


def test_flat_member_duplicate_channels_fuse_exactly():
  """Duplicate conv channels, fused through the flatten, keep the function (barycentric)."""
  v, spec, x = _traced(FlattenNet(), (2, 6, 6, 1))
  v = ifjax.fold_batchnorm(v, spec)
  p = v["params"]
  k = np.array(p["conv"]["kernel"])
  b = np.array(p["conv"]["bias"])
  k[..., 1], b[1] = k[..., 0], b[0]  # channel 1 duplicates channel 0
  p["conv"]["kernel"], p["conv"]["bias"] = jnp.asarray(k), jnp.asarray(b)
  view = spec["conv"].consumers[0]  # hidden kernel seen as (channel, position, out)
  cols = np.array(view.neurons_first(p["hidden"]["kernel"]))
  cols[1] = cols[0]  # so the OT cost pairs channel 1 with channel 0 exactly
  p["hidden"]["kernel"] = view.restore(jnp.asarray(cols))
  # 5 -> 4 neurons: uniform target masses would split channel 1 over all targets; with the cluster
  # target and importance masses the duplicate pair forms one cluster of mass 2/5
  small = ifjax.intra_fuse(v, spec, 0.2, groups="conv", importance={"conv": jnp.ones(5)}, target="cluster_centroid",
                           target_mass="importance", normalization="barycentric")
  out = FlattenNet(channels=4).apply(small, x)
  np.testing.assert_allclose(out, FlattenNet().apply(v, x), rtol=1e-5, atol=1e-5)


def test_residual_bn_depthwise():
  v, spec, x = _traced(ResidualNet(), (2, 6, 6, 3))
  assert spec.names == ["c0", "c1", "c2"]
  assert {m.path for m in spec["c0"].producers} == {"params/c0/kernel", "params/c0/bias", "params/sc/kernel"}
  assert ("params/dw/kernel", 3, 0) in _members(spec["c1"])  # depthwise kernel fused with its channels
  assert set(spec.batchnorms) == {ifjax.BatchNormPair("c0", "bn0"), ifjax.BatchNormPair("sc", "sc_bn"),
                                  ifjax.BatchNormPair("dw", "dw_bn")}
  ifjax.check_spec(ResidualNet().apply, v, spec, x, scaling=True)
  assert spec.paper_index("c2") == 0


def test_plain_jax_function():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "b1": jnp.zeros(6),
            "w2": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}

  def f(variables, x):
    p = variables["params"]
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

  v, x = {"params": params}, jnp.ones((3, 4))
  spec = ifjax.trace_spec(f, v, x)
  assert [_members(g) for g in spec.groups] == [[("params/b1", 0, 0), ("params/w1", 1, 0), ("params/w2", 0, 0)]]
  ifjax.check_spec(f, v, spec, x, scaling=True)


def test_nnx_model():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))

  model = Net(nnx.Rngs(0))
  model.eval()
  fn, v = ifjax.nnx_apply(model)
  v = _randomized(v)
  x = jnp.ones((2, 5, 5, 3))
  spec = ifjax.trace_spec(fn, v, x)
  assert spec.names == ["conv"] and spec.batchnorms == (ifjax.BatchNormPair("conv", "bn"),)
  ifjax.check_spec(fn, v, spec, x, scaling=True)


def test_unknown_primitive_is_an_error_naming_it():

  def f(variables, x):
    h = x @ variables["params"]["w"]
    return jnp.cumsum(h, axis=-1) @ variables["params"]["v"]

  v = {"params": {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}}
  with pytest.raises(ifjax.UnsupportedPrimitiveError, match=r"cumsum.*params/w"):
    ifjax.trace_spec(f, v, jnp.ones((1, 3)))


def test_bn_after_activation_is_kept_as_members():
  """A BN that does not directly follow a layer cannot be folded: its arrays are per-channel members."""

  class PreAct(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True, name="bn")(nn.relu(nn.Dense(4, name="a")(x)))
      return nn.Dense(2, name="b")(x)

  v = _randomized(PreAct().init(jax.random.key(0), jnp.ones((1, 3))))
  spec = ifjax.trace_spec(PreAct().apply, v, jnp.ones((1, 3)))
  assert spec.batchnorms == ()
  assert {("params/bn/scale", 0, 0), ("batch_stats/bn/var", 0, 0)} <= set(_members(spec["a"]))
  ifjax.check_spec(PreAct().apply, v, spec, jnp.ones((2, 3)))


def test_check_spec_names_missing_and_foreign_members():
  v, spec, x = _traced(ResidualNet(), (2, 6, 6, 3))
  g = spec["c0"]
  missing = ifjax.Spec((ifjax.Group("c0", [m for m in g.producers if "sc" not in m.path], g.consumers),)
                       + spec.groups[1:], spec.batchnorms)
  with pytest.raises(ifjax.SpecCheckError, match="group 'c0'.*missing"):
    ifjax.check_spec(ResidualNet().apply, v, missing, x)
  g2 = spec["c2"]
  foreign = ifjax.Spec(spec.groups[:2] + (ifjax.Group("c2", g2.producers, g2.consumers + (("params/dw/bias", 0),)),),
                       spec.batchnorms)
  with pytest.raises((ifjax.SpecCheckError, ValueError), match="c2|dw"):
    ifjax.check_spec(ResidualNet().apply, v, foreign, x)


def test_trace_then_fuse_equals_hand_spec_on_digits_cnn():
  """The example CNN of the main job: traced spec == hand spec == the zoo's, and fusion is bit-identical."""
  consumers = {"conv0": ("params/conv1/kernel", 2), "conv1": ("params/conv2/kernel", 2),
               "conv2": ("params/fc/kernel", 0)}
  hand = ifjax.Spec([ifjax.Group(name, [(f"params/{name}/kernel", 3), (f"params/{name}/bias", 0)], [consumer])
                     for name, consumer in consumers.items()], batchnorms=[(f"conv{i}", f"bn{i}") for i in range(3)])
  model, zoo = ifjax.models.get("digits_cnn")
  x = jnp.ones((2, 8, 8, 1))
  v = _randomized(model.init(jax.random.key(0), x))
  traced = ifjax.trace_spec(model.apply, v, x)
  assert traced == zoo
  assert [_members(g) for g in traced.groups] == [_members(g) for g in hand.groups]
  assert set(traced.batchnorms) == set(hand.batchnorms)
  a = ifjax.intra_fuse(v, traced, 0.5)
  b = ifjax.intra_fuse(v, hand, 0.5)
  jax.tree.map(np.testing.assert_array_equal, a, b)
