"""Tracer coverage for common model code (issue 21 item 4), each on a small random-init flax.linen model written
here as timm / Hugging Face write it: a fused qkv projection reshaped to (B, N, 3, heads, head dim) (timm's ViT
and Swin), ``jnp.tile`` of a class embedding (CLIP's vision embeddings), weight-standardised convs (BiT), and
``check_spec`` on every output leaf (a dict or tuple of outputs, BERT's ``pooler_output``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax


class TimmAttention(nn.Module):
  """timm's ``Attention``: one qkv Dense, reshaped to (B, N, 3, heads, head dim) and moved to (3, B, heads, N, hd)."""

  heads: int

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = jax.nn.softmax((q @ k.swapaxes(-2, -1)) * (c // self.heads) ** -0.5, axis=-1)
    return nn.Dense(c, name="proj")((attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c))


class TimmBlock(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + TimmAttention(self.heads, name="attn")(nn.LayerNorm(name="norm1")(x))
    return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(nn.LayerNorm(name="norm2")(x))))


class TimmViT(nn.Module):
  heads: int = 6

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4 * self.heads, name="embed")(x)
    for i in range(2):
      x = TimmBlock(self.heads, name=f"block{i}")(x)
    return nn.Dense(5, name="head")(nn.LayerNorm(name="norm")(x).mean(1))


class WindowAttention(nn.Module):
  """timm's Swin window attention: fused qkv, relative position bias gathered from a table per head."""

  heads: int
  window: int

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    w = self.window
    table = self.param("relative_position_bias_table", nn.initializers.normal(0.02), ((2 * w - 1) ** 2, self.heads))
    coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (w - 1)
    index = rel[..., 0] * (2 * w - 1) + rel[..., 1]
    bias = table[index.reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
    qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = jax.nn.softmax(q * (c // self.heads) ** -0.5 @ k.swapaxes(-2, -1) + bias[None], axis=-1)
    return nn.Dense(c, name="proj")((attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c))


class SwinBlock(nn.Module):
  """Shifted windows (roll), window partition and merge by reshapes, pre-norm attention and MLP."""

  heads: int = 4
  window: int = 2

  @nn.compact
  def __call__(self, x):
    b, h, wd, c = x.shape
    w = self.window
    y = nn.LayerNorm(name="norm1")(x)
    y = jnp.roll(y, (-1, -1), axis=(1, 2))
    y = y.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    y = WindowAttention(self.heads, w, name="attn")(y)
    y = y.reshape(b, h // w, wd // w, w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, wd, c)
    x = x + jnp.roll(y, (1, 1), axis=(1, 2))
    return x + nn.Dense(c, name="fc2")(nn.gelu(nn.Dense(4 * c, name="fc1")(nn.LayerNorm(name="norm2")(x))))


class Swin(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (2, 2), strides=2, name="patch")(x)
    x = SwinBlock(name="block0")(x)
    return nn.Dense(5, name="head")(nn.LayerNorm(name="norm")(x).mean((1, 2)))


class ClipVision(nn.Module):
  """CLIP's vision embeddings: patch conv, class embedding tiled over the batch, position embedding."""

  @nn.compact
  def __call__(self, x):
    patches = nn.Conv(16, (4, 4), strides=4, use_bias=False, name="patch")(x)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, 16)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (16,))
    h = jnp.concatenate([jnp.tile(jnp.expand_dims(cls, (0, 1)), (b, 1, 1)), patches], axis=1)
    h = nn.LayerNorm(name="pre_ln")(h + nn.Embed(h.shape[1], 16, name="pos")(jnp.arange(h.shape[1])[None]))
    h = h + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(h)))
    return nn.Dense(5, name="head")(h[:, 0])


class StdConv(nn.Conv):
  """BiT's weight-standardised conv: the kernel standardised over (kh, kw, in) before the convolution."""

  def param(self, name, *args, **kwargs):
    w = super().param(name, *args, **kwargs)
    if name == "kernel":
      w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
      w = w / jnp.sqrt(jnp.var(w, axis=(0, 1, 2), keepdims=True) + 1e-10)
    return w


class BiT(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    y = nn.relu(StdConv(12, (3, 3), use_bias=False, name="conv1")(x))
    y = StdConv(12, (1, 1), use_bias=False, name="conv2")(y)
    y = nn.relu(nn.GroupNorm(4, name="gn")(y))
    return nn.Dense(5, name="head")(StdConv(16, (1, 1), name="conv3")(y).mean((1, 2)))


class TwoOutputs(nn.Module):
  """A sequence output and a pooled one (BERT's ``last_hidden_state`` and ``pooler_output``)."""

  tuple_out: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="hidden")(x))
    pooled = jnp.tanh(nn.Dense(3, name="pool")(nn.relu(nn.Dense(6, name="pool_hidden")(h))))
    seq = nn.Dense(4, name="out")(h)
    return (seq, pooled) if self.tuple_out else {"last_hidden_state": seq, "pooler_output": pooled}


def _traced(module, x):
  variables = jax.jit(module.init)(jax.random.key(0), x)
  noise = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: np.asarray(a) + np.float32(0.1) * noise.normal(size=a.shape).astype(np.float32),
                           variables)
  return variables, ifjax.trace_spec(module.apply, variables, x)


def _resize_error(module, variables, spec, x, groups, ratio=0.5):
  """Relative difference of the resized model to the zero-padded one, and the resized output's shape."""
  plan = ifjax.plan(variables, spec, ratio, groups=groups)
  small = ifjax.apply_plan(variables, spec, plan)
  got = jax.jit(ifjax.resize(module.apply, variables, small, x))(small, x)
  want = jax.jit(module.apply)(ifjax.apply_plan(variables, spec, plan, keep_shapes=True), x)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))), plan.widths()


@pytest.mark.parametrize("ratio", [0.5, 0.33])  # 6 heads -> 3, 4: at 4, shrinking the stacked 3 to 2 also fits
def test_fused_qkv_gives_head_groups(ratio):
  module, x = TimmViT(), jax.random.normal(jax.random.key(2), (2, 5, 6))
  variables, spec = _traced(module, x)
  kinds = {g.name: g.exact for g in spec.groups}
  for b in ("block0", "block1"):
    assert kinds[f"{b}/attn/qkv:heads"] and kinds[f"{b}/fc1"], kinds
  assert kinds["embed"] is False  # the LayerNorm-coupled stream
  heads = spec["block0/attn/qkv:heads"]
  qkv = sorted((m.path, m.offset, m.inner) for m in heads.producers if m.path.endswith("kernel"))
  assert qkv == [("params/block0/attn/qkv/kernel", k * 6, 4) for k in range(3)]  # q, k and v: heads of 4
  assert [(m.path, m.inner) for m in heads.consumers] == [("params/block0/attn/proj/kernel", 4)]
  ifjax.check_spec(module.apply, variables, spec, x)
  exact = [g.name for g in spec.groups if g.exact]
  err, widths = _resize_error(module, variables, spec, x, exact, ratio)
  assert widths["block0/attn/qkv:heads"] == ifjax.kept_count(6, ratio) and err < 1e-5, (err, widths)


def test_swin_window_attention():
  module, x = Swin(), jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  variables, spec = _traced(module, x)
  assert {g.name: g.exact for g in spec.groups} == {"block0/attn:heads": True, "block0/fc1": True, "patch": False}
  heads = spec["block0/attn:heads"]
  assert {(m.path, m.axis) for m in heads.members} == {
      ("params/block0/attn/relative_position_bias_table", 1), ("params/block0/attn/qkv/kernel", 1),
      ("params/block0/attn/qkv/bias", 0), ("params/block0/attn/proj/kernel", 0)}
  ifjax.check_spec(module.apply, variables, spec, x)
  err, widths = _resize_error(module, variables, spec, x, ["block0/attn:heads", "block0/fc1"])
  assert widths["block0/attn:heads"] == 2 and err < 1e-5, (err, widths)


def test_tiled_class_embedding_is_a_member_of_the_stream():
  module, x = ClipVision(), jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  variables, spec = _traced(module, x)
  stream = spec["patch"]
  assert not stream.exact  # the pre-LayerNorm
  assert {m.path for m in stream.members} >= {"params/class_embedding", "params/pos/embedding",
                                              "params/fc2/kernel", "params/head/kernel"}
  assert spec["fc1"].exact
  ifjax.check_spec(module.apply, variables, spec, x)
  err, _ = _resize_error(module, variables, spec, x, ["fc1"])
  assert err < 1e-5
  _, widths = _resize_error(module, variables, spec, x, ["patch", "fc1"])  # the tiled embedding at 8 channels
  assert widths == {"patch": 8, "fc1": 16}


def test_tile_of_channels_is_refused():
  class Repeat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(jnp.tile(nn.Dense(4, name="hidden")(x), (1, 2)))

  x = jnp.ones((2, 3))
  with pytest.raises(ifjax.UnsupportedPrimitiveError, match="tile repeats the channel axis 1"):
    _traced(Repeat(), x)


def test_weight_standardised_convs():
  """The standardised kernels are followed back to their parameters; channels a kernel is standardised over
  are pruning-only (merging two changes the kernel's statistics), its output channels stay exact."""
  module, x = BiT(), jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  variables, spec = _traced(module, x)
  kinds = {g.name: g.exact for g in spec.groups}
  assert kinds == {"stem": False, "conv1": False, "conv2:heads": False, "conv3": True}, kinds
  ifjax.check_spec(module.apply, variables, spec, x)
  conv1 = spec["conv1"]
  assert [(m.path, m.axis) for m in conv1.consumers] == [("params/conv2/kernel", 2)]
  _, widths = _resize_error(module, variables, spec, x, list(kinds))
  assert widths == {"stem": 4, "conv1": 6, "conv2:heads": 2, "conv3": 8}


def test_weight_standardised_output_channels_stay_exact():
  class OutStd(nn.Module):  # standardised over its output channels only: the input channels stay exact
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(6, (1, 1), name="a")(x))
      w = self.param("b", nn.initializers.normal(1.0), (1, 1, 6, 4))
      w = (w - w.mean(3, keepdims=True)) / w.std(3, keepdims=True)
      y = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return nn.Dense(2, name="head")(nn.relu(y).mean((1, 2)))

  module, x = OutStd(), jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
  variables, spec = _traced(module, x)
  assert {g.name: g.exact for g in spec.groups} == {"a": True, "b": False}
  ifjax.check_spec(module.apply, variables, spec, x)


def test_weight_normalised_dense():
  class WeightNorm(nn.Module):  # w / ||w|| over the inputs (weight norm): the hidden neurons read are pruning-only
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(6, name="a")(x))
      w = self.param("b", nn.initializers.normal(1.0), (6, 4))
      h = nn.relu(h @ (w / jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True))))
      return nn.Dense(2, name="head")(h)

  module, x = WeightNorm(), jax.random.normal(jax.random.key(2), (3, 5))
  variables, spec = _traced(module, x)
  assert {g.name: g.exact for g in spec.groups} == {"a": False, "b": True}
  assert [(m.path, m.axis) for m in spec["a"].consumers] == [("params/b", 0)]
  ifjax.check_spec(module.apply, variables, spec, x)


@pytest.mark.parametrize("tuple_out", [False, True])
def test_check_spec_checks_every_output_leaf(tuple_out):
  module, x = TwoOutputs(tuple_out), jax.random.normal(jax.random.key(2), (3, 5))
  variables, spec = _traced(module, x)
  report = ifjax.check_spec(module.apply, variables, spec, x)
  assert set(report) == {"hidden", "pool_hidden"}
  g = spec["pool_hidden"]
  bad = ifjax.Spec([spec["hidden"], ifjax.Group("pool_hidden", g.producers, (), None)])  # pool's rows left out
  with pytest.raises(ifjax.SpecCheckError, match="pool_hidden"):  # only the second output leaf changes
    ifjax.check_spec(module.apply, variables, bad, x)
  first = jax.tree.leaves(module.apply(variables, x))[0]
  assert np.shape(first) == (3, 4)  # the broken group does not reach the first leaf
