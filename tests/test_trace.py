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


def _logaddexp_primitive():
  """A ``logaddexp`` primitive (jnp.logaddexp is a custom_jvp of other primitives in this jax)."""
  from jax.extend.core import Primitive
  from jax.interpreters import mlir

  prim = Primitive("logaddexp")
  prim.def_impl(jnp.logaddexp)
  prim.def_abstract_eval(lambda a, b: a)
  mlir.register_lowering(prim, mlir.lower_fun(jnp.logaddexp, multiple_results=False))
  return prim


_LOGADDEXP = _logaddexp_primitive()
_INT = lambda op: lambda h: op(jnp.round(h * 4).astype(jnp.int32)).astype(jnp.float32)
CHANNEL_OPS = {  # op(h) on activations h (batch, channels): each keeps the channel axis
    "logaddexp": lambda h: _LOGADDEXP.bind(h, jnp.tanh(h)),
    "jnp.logaddexp": lambda h: jnp.logaddexp(h, 0.5),
    "xor": _INT(lambda i: i ^ 3),
    "shift_left": _INT(lambda i: jax.lax.shift_left(i, 2)),
    "shift_right_logical": _INT(lambda i: jax.lax.shift_right_logical(i, 1)),
    "shift_right_arithmetic": _INT(lambda i: jax.lax.shift_right_arithmetic(i, 1)),
    "population_count": _INT(jax.lax.population_count),
    "real / conj": lambda h: jnp.real(jnp.conj(h.astype(jnp.complex64))),
    "cumsum over the batch": lambda h: jnp.cumsum(h, axis=0),
    "sort over the batch": lambda h: jnp.sort(h, axis=0),
    "dynamic_slice of the batch": lambda h: jax.lax.dynamic_slice_in_dim(h, 1, 2, axis=0),
    "optimization_barrier": lambda h: sum(jax.lax.optimization_barrier((h, 2 * h))),
    "reduce_and over the batch": lambda h: h * jnp.all(h > -1, axis=0),
    "reduce_window over the batch": lambda h: jax.lax.reduce_window(h, 0.0, lambda a, b: a + jnp.abs(b), (2, 1),
                                                                    (1, 1), "VALID"),
}


@pytest.mark.parametrize("name", CHANNEL_OPS)
def test_trace_spec_follows_what_resize_follows(name, rel_err):
  """trace_spec accepts the element-wise primitives resize runs (one table serves both), on a channel axis."""
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "b1": jnp.asarray(rng.normal(size=6), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  op = CHANNEL_OPS[name]

  def f(variables, x):
    p = variables["params"]
    return op(x @ p["w1"] + p["b1"]) @ p["w2"]

  v, x = {"params": params}, jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  spec = ifjax.trace_spec(f, v, x)
  assert [_members(g) for g in spec.groups] == [[("params/b1", 0, 0), ("params/w1", 1, 0), ("params/w2", 0, 0)]]
  ifjax.check_spec(f, v, spec, x)
  small = {"params": {"w1": params["w1"][:, :4], "b1": params["b1"][:4], "w2": params["w2"][:4]}}
  padded = {"params": {**params, "w2": params["w2"].at[4:].set(0)}}
  assert rel_err(ifjax.resize(f, v, small, x)(small, x), f(padded, x)) < 1e-5


def test_ops_along_a_channel_axis_stay_refused():
  def f(variables, x):
    h = x @ variables["params"]["w"]
    return jnp.sort(h, axis=-1) @ variables["params"]["v"]

  v = {"params": {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}}
  with pytest.raises(ifjax.UnsupportedPrimitiveError, match=r"'sort' that sorts along axis 1.*params/w"):
    ifjax.trace_spec(f, v, jnp.ones((1, 3)))


def test_one_primitive_table_and_one_union_find():
  """trace_spec and resize dispatch through one table, so they cannot drift apart: both handle every primitive in
  it but the few it names as refused by one of them, and neither has a rule the table does not list."""
  from ifjax._trace import axis_rules, constraints, interpreter, primitives, resize
  from ifjax._trace.unionfind import UnionFind

  assert interpreter.PRIMITIVES is axis_rules.PRIMITIVES is resize.PRIMITIVES is primitives.PRIMITIVES
  tracer, builder = interpreter._Tracer({}), axis_rules._Builder()
  for name in primitives.PRIMITIVES:
    assert (tracer.handler(name) is None) == (name in primitives.NOT_TRACED), name
    assert (builder.handler(name) is None) == (name in primitives.NOT_RESIZED), name
  for cls, prefix in ((interpreter._Tracer, "p_"), (axis_rules._Builder, "r_")):
    assert {n[len(prefix):] for n in dir(cls) if n.startswith(prefix)} <= set(primitives.PRIMITIVES), cls
  assert set(primitives.NOT_TRACED) | set(primitives.NOT_RESIZED) <= set(primitives.PRIMITIVES)
  assert not set(primitives.NOT_TRACED) & set(primitives.NOT_RESIZED)
  for name in ("logaddexp", "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic"):
    assert primitives.PRIMITIVES[name] == primitives.ELEMENTWISE
  for module in (interpreter, axis_rules, resize, constraints):  # no second table of names
    tables = [n for n, x in vars(module).items() if isinstance(x, (set, frozenset, dict)) and x is not
              primitives.PRIMITIVES and {"tanh", "reduce_sum", "dot_general"} & set(x)]
    assert not tables, (module, tables)
  assert issubclass(interpreter._Tracer, UnionFind) and issubclass(constraints._Dims, UnionFind)
  for cls in (interpreter._Tracer, constraints._Dims):
    assert cls.find is UnionFind.find and cls.add is UnionFind.add and cls.link is UnionFind.link
