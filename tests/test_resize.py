"""ifjax.resize / resize_nnx: pruned models run at their smaller shapes and compute what the zero-padded
(``apply_plan(..., keep_shapes=True)``) model computes; ifjax.widths without a plan on option-A ResNets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import models


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _zoo(name, shape, ratio=0.5, groups=None, fuse=True):
  module, spec = models.get(name)
  x = _images(shape)
  v = module.init(jax.random.key(0), x, train=False)
  pl = ifjax.plan(v, spec, ratio, groups=groups, fuse=fuse)
  return module, spec, v, pl, x


@pytest.mark.parametrize("name,shape,fuse", [("mlp", (3, 28, 28, 1), True), ("lenet5", (3, 28, 28, 1), True),
                                             ("resnet20", (3, 32, 32, 3), True),
                                             pytest.param("efficientnet_lite0", (2, 32, 32, 3), False,
                                                          marks=pytest.mark.slow)])  # ~40 s of compiling on 2 cores
def test_zoo_resized_equals_keep_shapes(name, shape, fuse, rel_err):
  module, spec, v, pl, x = _zoo(name, shape, fuse=fuse)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  small = ifjax.apply_plan(v, spec, pl)
  zeroed = ifjax.apply_plan(v, spec, pl, keep_shapes=True)
  small_apply = jax.jit(ifjax.resize(module.apply, v, small, x, train=False))
  out = small_apply(small, x)
  assert rel_err(out, apply(zeroed, x)) < 1e-5
  rebuilt, _ = models.get(name, widths=ifjax.widths(v, spec, pl))  # the hand-written model at the pruned widths
  assert rel_err(out, jax.jit(lambda v, x: rebuilt.apply(v, x, train=False))(small, x)) < 1e-5
  x2 = _images((1,) + shape[1:], seed=2)  # another batch size: traced again, same weights
  assert rel_err(small_apply(small, x2), apply(zeroed, x2)) < 1e-5


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_pretrained_resnet20_resized(rel_err):
  from ifjax import data

  module, spec, v = models.pretrained("resnet20")
  x = jnp.asarray(data.preprocess("resnet20", data.cifar10_jpeg("test", limit=20)[0]))
  pl = ifjax.plan(v, spec, 0.3)
  small = ifjax.apply_plan(v, spec, pl)
  ref = module.apply(ifjax.apply_plan(v, spec, pl, keep_shapes=True), x)
  out = jax.jit(ifjax.resize(module.apply, v, small, x))(small, x)
  assert rel_err(out, ref) < 1e-5
  assert (np.argmax(out, -1) == np.argmax(ref, -1)).all()


def test_flops_of_resized_resnet20_below_dense():
  module, spec, v, _, x = _zoo("resnet20", (1, 32, 32, 3))
  internal = [g.name for g in spec.groups if g.name.endswith("/conv1")]
  pl = ifjax.plan(v, spec, 0.5, groups=internal)
  small = ifjax.apply_plan(v, spec, pl)
  small_apply = ifjax.resize(module.apply, v, small, x, train=False)
  dense = ifjax.flops(module.apply, v, x, train=False)
  pruned = ifjax.flops(small_apply, small, x, train=False)
  rebuilt, _ = models.get("resnet20", widths=ifjax.widths(v, spec, pl))
  assert pruned < 0.7 * dense  # every block's first conv out and second conv in halved: ~half the conv FLOPs
  assert pruned == pytest.approx(ifjax.flops(rebuilt.apply, small, x, train=False), rel=0.01)


# -- hand-written blocks: transformer MLP, attention with merged heads, depthwise + concat, scan, control flow --
class TransformerBlock(nn.Module):
  """Pre-LN block: attention whose q/k/v are one Dense(dim) each, reshaped into (heads, head_dim), then an MLP."""

  dim: int = 16
  qkv: int = 16
  heads: int = 4
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.LayerNorm(name="ln1")(x)
    q, k, val = (nn.Dense(self.qkv, name=n)(h).reshape(b, t, self.heads, -1) for n in ("q", "k", "v"))
    att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", att, val).reshape(b, t, -1)
    x = x + nn.Dense(self.dim, name="o")(o)
    h = nn.gelu(nn.Dense(self.hidden, name="fc1")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(self.dim, name="fc2")(h)


def _keep(v, edits):
  """(small, zeroed): ``edits`` = {path: (axis, kept indices)}; small keeps them, zeroed zeros the others."""
  small = jax.tree_util.tree_map(lambda a: a, v)
  zeroed = jax.tree_util.tree_map(lambda a: a, v)
  for path, (axis, keep) in edits.items():
    *head, last = path.split("/")
    ds, dz = small, zeroed
    for k in head:
      ds, dz = ds[k], dz[k]
    a = np.asarray(ds[last])
    ds[last] = jnp.asarray(np.take(a, keep, axis=axis))
    mask = np.zeros(a.shape[axis], bool)
    mask[keep] = True
    dz[last] = jnp.asarray(np.where(mask.reshape([-1 if i == axis else 1 for i in range(a.ndim)]), a, 0))
  return small, zeroed


def test_transformer_heads_and_mlp_neurons(rel_err):
  block = TransformerBlock()
  x = _images((2, 5, 16))
  v = block.init(jax.random.key(0), x)
  heads = np.concatenate([np.arange(4), np.arange(8, 12)])  # heads 0 and 2 of 4 (head_dim 4)
  hidden = np.arange(0, 32, 3)  # 11 of 32 MLP neurons
  edits = {f"params/{n}/{k}": (ax, heads) for n in "qkv" for k, ax in (("kernel", 1), ("bias", 0))}
  edits.update({"params/o/kernel": (0, heads), "params/fc1/kernel": (1, hidden), "params/fc1/bias": (0, hidden),
                "params/fc2/kernel": (0, hidden)})
  small, zeroed = _keep(v, edits)
  # a zeroed head attends uniformly to zero values and its output rows are zero: it contributes nothing
  ref = block.apply(zeroed, x)
  small_apply = jax.jit(ifjax.resize(block.apply, v, small, x))
  assert rel_err(small_apply(small, x), ref) < 1e-5
  assert rel_err(TransformerBlock(qkv=8, heads=2, hidden=11).apply(small, x), ref) < 1e-5  # whole heads were pruned


def test_linen_attention_heads(rel_err):
  att = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
  x = _images((2, 5, 16))
  v = att.init(jax.random.key(0), x)
  heads = np.array([1, 3])
  edits = {f"params/{n}/{k}": (1 if k == "kernel" else 0, heads) for n in ("query", "key", "value")
           for k in ("kernel", "bias")}
  edits["params/out/kernel"] = (0, heads)
  small, zeroed = _keep(v, edits)
  out = jax.jit(ifjax.resize(att.apply, v, small, x))(small, x)
  assert rel_err(out, att.apply(zeroed, x)) < 1e-5


class DepthwiseConcat(nn.Module):
  """A stem, a depthwise conv (flax's feature_group_count), a concatenation of two branches, option-A style pad."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
    y = nn.relu(nn.Conv(16, (3, 3), feature_group_count=16, name="dw")(x))
    z = nn.relu(nn.Conv(8, (1, 1), name="side")(x))
    h = jnp.concatenate([y, z], axis=-1)
    h = nn.relu(nn.Conv(12, (1, 1), name="mix")(h))
    h = jnp.pad(h[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (6, 6))) + nn.Conv(24, (1, 1), strides=2, name="wide")(h)
    return nn.Dense(10, name="head")(h.mean((1, 2)))


def test_depthwise_concat_and_pad(rel_err):
  net = DepthwiseConcat()
  x = _images((2, 8, 8, 3))
  v = net.init(jax.random.key(0), x)
  keep16, keep8, keep12 = np.arange(0, 16, 2), np.array([0, 3, 5, 6]), np.arange(6)
  keep24 = np.concatenate([np.arange(3), 6 + keep12, np.arange(18, 21)])  # pad halves 6 -> 3, mix's 12 -> 6
  edits = {"params/stem/kernel": (3, keep16), "params/stem/bias": (0, keep16), "params/dw/kernel": (3, keep16),
           "params/dw/bias": (0, keep16), "params/side/kernel": (2, keep16), "params/mix/kernel": (3, keep12),
           "params/mix/bias": (0, keep12), "params/wide/kernel": (3, keep24), "params/wide/bias": (0, keep24),
           "params/head/kernel": (0, keep24)}
  small, zeroed = _keep(v, edits)
  side = np.asarray(small["params"]["side"]["kernel"])
  small["params"]["side"]["kernel"] = jnp.asarray(side[..., keep8])
  mix = np.asarray(small["params"]["mix"]["kernel"])
  small["params"]["mix"]["kernel"] = jnp.asarray(mix[:, :, np.concatenate([keep16, 16 + keep8])])
  small["params"]["side"]["bias"] = small["params"]["side"]["bias"][keep8]
  small["params"]["wide"]["kernel"] = small["params"]["wide"]["kernel"][:, :, keep12]
  drop8 = np.setdiff1d(np.arange(8), keep8)
  zeroed["params"]["side"]["kernel"] = zeroed["params"]["side"]["kernel"].at[..., drop8].set(0)
  zeroed["params"]["side"]["bias"] = zeroed["params"]["side"]["bias"].at[drop8].set(0)
  small_apply = ifjax.resize(net.apply, v, small, x)
  assert small_apply(small, x).shape == (2, 10)
  assert rel_err(jax.jit(small_apply)(small, x), net.apply(zeroed, x)) < 1e-5


class ScanMLP(nn.Module):
  """Three residual MLP layers stacked with nn.scan (params with a leading layer axis)."""

  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(6, name="fc2")(nn.relu(nn.Dense(20, name="fc1")(h))), None

    scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def test_scan_over_stacked_layers(rel_err):
  net = ScanMLP()
  x = _images((4, 6))
  v = net.init(jax.random.key(0), x)
  keep = np.array([0, 2, 3, 7, 11, 19])
  small, zeroed = _keep(v, {"params/layers/fc1/kernel": (2, keep), "params/layers/fc1/bias": (1, keep),
                            "params/layers/fc2/kernel": (1, keep)})
  assert rel_err(jax.jit(ifjax.resize(net.apply, v, small, x))(small, x), net.apply(zeroed, x)) < 1e-5


def test_cond_and_while_loop(rel_err):
  def f(p, x, scale=1.0):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jax.lax.cond(h.sum() > 0, lambda h: h * scale, lambda h: -h, h)
    h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h + 0.1 * h ** 3), h)
    return h @ p["w2"]

  rng = np.random.default_rng(0)
  p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in (("w1", (5, 12)), ("b1", (12,)), ("w2", (12, 3)))}
  x = _images((4, 5))
  keep = np.array([1, 4, 5, 9])
  small, zeroed = _keep(p, {"w1": (1, keep), "b1": (0, keep), "w2": (0, keep)})
  small_apply = jax.jit(ifjax.resize(f, p, small, x, scale=2.0), static_argnames="scale")
  assert rel_err(small_apply(small, x, scale=2.0), f(zeroed, x, scale=2.0)) < 1e-5


def test_remat_custom_vjp_and_gradients(rel_err):
  @jax.custom_vjp
  def act(h):
    return jnp.sin(h)

  act.defvjp(lambda h: (jnp.sin(h), h), lambda h, g: (g * jnp.cos(h),))

  def f(p, x):
    h = act(jax.checkpoint(jnp.tanh)(x @ p["w"]))
    return jax.lax.optimization_barrier(h) @ p["v"]

  rng = np.random.default_rng(0)
  p = {"w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32), "v": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
  x = _images((2, 3))
  small, zeroed = _keep(p, {"w": (1, np.arange(5)), "v": (0, np.arange(5))})
  small_apply = ifjax.resize(f, p, small, x)
  assert rel_err(jax.jit(small_apply)(small, x), f(zeroed, x)) < 1e-6
  grad = jax.grad(lambda q: small_apply(q, x).sum())(small)
  assert rel_err(grad["w"], jax.grad(lambda q: f(q, x).sum())(zeroed)["w"][:, :5]) < 1e-6


def test_resize_nnx(rel_err):
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
      self.dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
      self.conv2 = nnx.Conv(16, 8, (1, 1), rngs=rngs)
      self.fc = nnx.Linear(8, 32, rngs=rngs)
      self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.conv2(nnx.relu(self.dw(nnx.relu(self.bn(self.conv(x)))))))
      return self.out(nnx.relu(self.fc(x.mean((1, 2)))))

  model = Net(nnx.Rngs(0))
  x = _images((2, 8, 8, 3))
  apply_fn, v = ifjax.nnx_apply(model)
  spec = ifjax.trace_spec(apply_fn, v, x)
  pl = ifjax.plan(v, spec, 0.5)
  small = ifjax.resize_nnx(model, ifjax.apply_plan(v, spec, pl))
  ref = apply_fn(ifjax.apply_plan(v, spec, pl, keep_shapes=True), x)
  assert rel_err(small(x), ref) < 1e-5
  assert (small.conv.out_features, small.bn.num_features, small.dw.feature_group_count, small.fc.in_features) == \
      (8, 8, 8, 4)
  assert model.conv.kernel[...].shape == (3, 3, 3, 16) and model.dw.feature_group_count == 16  # not modified


# -- widths without a plan -----------------------------------------------------------------------------
def test_widths_without_plan_on_option_a_resnet(rel_err):
  module, spec, v, pl, x = _zoo("resnet20", (2, 32, 32, 3), ratio=0.3)
  small = ifjax.apply_plan(v, spec, pl)
  w = ifjax.widths(small, spec)  # the README's first example, on a model with segment groups
  assert w == ifjax.widths(v, spec, pl)
  assert (w["stream1"], w["stream2a"], w["stream3b"]) == (11, 5, 11)
  rebuilt, _ = models.get("resnet20", widths=w)
  ref = module.apply(ifjax.apply_plan(v, spec, pl, keep_shapes=True), x, train=False)
  assert rel_err(rebuilt.apply(small, x, train=False), ref) < 1e-5


def test_widths_without_plan_refuses_mixed_segment_ratios():
  module, spec, v, pl, x = _zoo("resnet20", (1, 32, 32, 3), ratio={"stream2a": 0.5})
  small = ifjax.apply_plan(v, spec, pl)
  with pytest.raises(ValueError, match=r"stream2a.*different ratios: pass plan="):
    ifjax.widths(small, spec)
  assert ifjax.widths(v, spec, pl)["stream2a"] == 4
  message = r"'stream2b'.*its size= is 8, but 'params/layer2_0/conv2/kernel' axis 3 has 28 entries \(offset 24"
  with pytest.raises(ValueError, match=message):
    spec.validate(small)  # the spec describes the unpruned arrays: the message says which number is which


# -- errors ----------------------------------------------------------------------------------------------
def test_bad_small_variables():
  net = nn.Dense(4)
  x = jnp.ones((2, 3))
  v = net.init(jax.random.key(0), x)
  with pytest.raises(ifjax.ResizeError, match=r"'params/kernel': shape \(3, 5\).*original \(3, 4\)"):
    ifjax.resize(net.apply, v, {"params": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(4)}}, x)
  with pytest.raises(ifjax.ResizeError, match="tree structure"):
    ifjax.resize(net.apply, v, {"params": {"kernel": jnp.ones((3, 4))}}, x)


def test_unsupported_cases_name_the_primitive():
  def sliced(p, x):
    return (x @ p["w"])[:, :3].sum(-1)

  def split_heads(p, x):
    return (x @ p["w"]).reshape(x.shape[0], 3, 4).sum((1, 2))

  x = jnp.ones((2, 5))
  p = {"w": jnp.ones((5, 12))}
  small = {"w": jnp.ones((5, 10))}
  with pytest.raises(ifjax.ResizeError, match=r"'slice'.*\(2, 12\).*slices part of axis 1.*10"):
    ifjax.resize(sliced, p, small, x)
  with pytest.raises(ifjax.ResizeError, match=r"'reshape'.*cannot split 10 entries into axes of original sizes \[3, 4"):
    ifjax.resize(split_heads, p, small, x)


def test_resize_nnx_attention_heads():
  from flax import nnx

  att = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16, decode=False, rngs=nnx.Rngs(0))
  x = _images((2, 5, 16))
  apply_fn, v = ifjax.nnx_apply(att)
  heads = np.array([0, 2])
  edits = {f"params/{n}/{k}": (1 if k == "kernel" else 0, heads) for n in ("query", "key", "value")
           for k in ("kernel", "bias")}
  edits["params/out/kernel"] = (0, heads)
  small, zeroed = _keep(v, edits)
  new = ifjax.resize_nnx(att, small)
  assert (new.num_heads, new.qkv_features, new.head_dim) == (2, 8, 4)
  np.testing.assert_allclose(new(x), apply_fn(zeroed, x), atol=1e-6)


@pytest.mark.parametrize("name, reorder, message", [
    ("reversed", lambda h: h[:, ::-1], r"'rev'.*reverses axis 1, which resize can only keep at its original size"),
    ("sorted", lambda h: jnp.sort(h, axis=1), r"'sort'.*sorts along axis 1"),
    ("argsorted", lambda h: jnp.take_along_axis(h, jnp.argsort(h, axis=1), axis=1), r"'sort'.*sorts along axis 1"),
    ("permuted", lambda h: h[:, np.array([3, 1, 0, 2, 7, 5, 6, 4])], r"'gather'.*indexes axis 1"),
    ("cumprod backwards", lambda h: jax.lax.cumprod(h, axis=1, reverse=True), r"'cumprod'.*accumulates.*backwards"),
])
def test_channel_permutations_raise(name, reorder, message):
  """Reordering a pruned axis: the small model holds the kept channels first, the zero-padded one zeros after them,
  so no reordering lines up with the next layer's weights; it used to give wrong outputs without an error."""
  rng = np.random.default_rng(0)
  p = {"w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
  small = {"w1": p["w1"][:, :6], "w2": p["w2"][:6]}
  x = _images((4, 5))
  with pytest.raises(ifjax.ResizeError, match=message):
    ifjax.resize(lambda v, x: reorder(jax.nn.relu(x @ v["w1"])) @ v["w2"], p, small, x)


def test_order_dependent_ops_on_unpruned_axes_and_cumsum_still_resize(rel_err):
  rng = np.random.default_rng(0)
  p = {"w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
  small = {"w1": p["w1"][:, :6], "w2": p["w2"][:6]}
  padded = {"w1": p["w1"].at[:, 6:].set(0), "w2": p["w2"].at[6:].set(0)}  # the kept channels first, zeros after

  def fn(v, x):
    h = jax.nn.relu(x[::-1] @ v["w1"])  # reversing the batch axis
    return jnp.sort(jnp.cumsum(h, axis=1) + jax.lax.cumsum(h, axis=1, reverse=True), axis=0) @ v["w2"]

  x = _images((4, 5))
  assert rel_err(ifjax.resize(fn, p, small, x)(small, x), fn(padded, x)) < 1e-5
