"""Tracer coverage on the models of the README table (tests/coverage_models.py): transformers (MLP hidden
neurons, attention heads, LayerNorm-coupled streams), MLP-Mixer, ConvNeXt, MobileNetV2, a DenseNet block
(BN and biases after concatenations), a U-Net, ``nn.scan`` and flaxmodels' ResNet18/50, VGG16 and GPT-2.

Per model: the spec traces, ``check_spec`` passes, ``intra_fuse`` shrinks every group, the pruned model runs at
its smaller shapes with ``ifjax.resize``, and planted exact-duplicate neurons of every exact group, merged with
barycentric maps, leave the output unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import ifjax

MODELS = ["ViT", "MLP-Mixer", "ConvNeXt", "MobileNetV2", "DenseNet", "U-Net", "scan transformer",
          "flaxmodels ResNet18", "flaxmodels ResNet50", "flaxmodels VGG16", "flaxmodels GPT-2",
          "zoo mlp", "zoo lenet5", "zoo resnet20", "zoo vgg11_bn", "zoo resnet18",
          *(pytest.param(f"zoo {n}", marks=pytest.mark.slow) for n in ("resnet56", "resnet50", "efficientnet_lite0"))]

_SPECS = {}


def _traced(coverage_models, name):
  """(case, spec), traced once per session."""
  if name.startswith("flaxmodels"):
    pytest.importorskip("flaxmodels", reason="flaxmodels is a test extra: pip install -e '.[test]'")
  if name not in _SPECS:
    case = coverage_models.build(name)
    _SPECS[name] = case, ifjax.trace_spec(case.apply, case.variables, case.x)
  return _SPECS[name]


@pytest.mark.parametrize("name", MODELS)
def test_model_traces_checks_fuses_and_keeps_duplicates(coverage_models, name):
  case, spec = _traced(coverage_models, name)
  exact = [g for g in spec.groups if g.exact]
  assert exact, f"{name}: no exactly fusable group"
  ifjax.check_spec(case.apply, case.variables, spec, case.x)

  err, control = coverage_models.duplicate_errors(case, spec)
  assert err < 1e-4, f"{name}: merging planted duplicates changes the output by {err:.2e} (relative)"
  assert control > 1e-3  # merging neurons that are not duplicates does change it

  sizes = spec.validate(case.variables)
  # Intra-Fusion of every group (up to 128 neurons: the flaxmodels ResNets' wide groups make the exact OT slow)
  fuse = [g.name for g in spec.groups if sizes[g.name] <= 128]
  small = traverse_util.flatten_dict(ifjax.intra_fuse(case.variables, spec, 0.25, groups=fuse), sep="/")
  axes = [(m.path, m.axis) for g in spec.groups for m in g.members]
  for g in spec.groups:  # a member alone on its axis has the group's new width there
    m = next((m for m in g.members if axes.count((m.path, m.axis)) == 1), None)
    if m is not None and sizes[g.name] >= 4 and g.name in fuse:
      width = np.shape(small[m.path])[m.axis] // (m.outer * m.inner)
      assert width == ifjax.kept_count(sizes[g.name], 0.25), (g.name, m)

  # the pruned model runs at its smaller shapes (resize) and computes what the zero-padded full-size one does;
  # exact groups only: for a norm-coupled group the padded model's norm still counts the dropped channels
  err, before, after = coverage_models.resize_error(case, spec, [g.name for g in exact if g.name in fuse])
  assert err < 1e-4 and after < before, (name, err, before, after)


def _names(spec):
  return {g.name: g.exact for g in spec.groups}


def test_vit_groups_heads_mlp_and_stream(coverage_models):
  case, spec = _traced(coverage_models, "ViT")
  kinds = _names(spec)
  for b in ("block0", "block1"):
    assert kinds[f"{b}/mlp/fc1"] and kinds[f"{b}/attn/query:heads"] and kinds[f"{b}/attn/value:head_dim"]
    assert not kinds[f"{b}/attn/query:head_dim"]  # query and key dims: contracted together, pruning only
  assert kinds["embed"] is False  # the LayerNorm-coupled residual stream
  heads = spec["block0/attn/query:heads"]
  assert {(m.path, m.axis) for m in heads.members} >= {
      ("params/block0/attn/query/kernel", 1), ("params/block0/attn/key/kernel", 1),
      ("params/block0/attn/value/kernel", 1), ("params/block0/attn/out/kernel", 0)}
  stream = spec["embed"]
  paths = {m.path for m in stream.producers}
  assert {"params/cls", "params/pos", "params/block0/ln1/scale", "params/norm/bias"} <= paths
  # a pruning-only group is pruned by plan even with fuse=True
  pl = ifjax.plan(case.variables, spec, 0.25)
  assert pl["embed"].producer_map is None and pl["block0/mlp/fc1"].producer_map is not None
  assert ifjax.Spec.from_json(spec.to_json()) == spec


def test_gpt2_heads_from_a_fused_qkv_projection(coverage_models):
  """flaxmodels' GPT-2: one Dense makes q, k and v, split and reshaped into heads."""
  case, spec = _traced(coverage_models, "flaxmodels GPT-2")
  heads = spec["transformer/GPT2Block_0/GPT2SelfAttention_0/Dense_0:heads"]
  qkv = "params/transformer/GPT2Block_0/GPT2SelfAttention_0/Dense_0/kernel"
  assert heads.exact and heads.size == 4
  assert sorted(m.offset for m in heads.producers if m.path == qkv) == [0, 4, 8]  # q, k, v heads of 4 dims
  assert all(m.inner == 4 for m in heads.members)
  assert not spec["transformer/Embed_0"].exact
  small = ifjax.intra_fuse(case.variables, spec, 0.25)  # widths reads the pruned heads off their three segments
  assert ifjax.widths(small, spec)[heads.name] == 3


def test_mixer_token_mixing_is_a_group_and_tokens_stay(coverage_models):
  case, spec = _traced(coverage_models, "MLP-Mixer")
  assert _names(spec) == {"block0/token_mlp/fc1": True, "block0/channel_mlp/fc1": True,
                          "block1/token_mlp/fc1": True, "block1/channel_mlp/fc1": True, "embed": False}


def test_densenet_bn_and_bias_after_concatenation(coverage_models):
  case, spec = _traced(coverage_models, "DenseNet")
  # trans_bn follows the block's concatenation: one segment member per source group, at its offset
  segs = sorted((m.offset, g.name) for g in spec.groups for m in g.producers if m.path == "params/trans_bn/scale")
  assert segs == [(0, "stem"), (8, "layer0/conv"), (12, "layer1/conv"), (16, "layer2/conv")]
  # the stem's output is read by a concatenation too, so layer0's BN cannot fold into it
  assert ("batch_stats/layer0/bn/var", 0, 0) in [tuple(m) for m in spec["stem"].producers]
  # the biased depthwise conv after a concatenation, and the BN after it (folded into the depthwise conv)
  assert [m.offset for g in spec.groups for m in g.producers if m.path == "params/dw/bias"] == [0, 10]
  assert spec.batchnorms == (ifjax.BatchNormPair("dw", "final_bn"),)


def test_unet_groupnorm_groups_are_whole_norm_groups(coverage_models):
  case, spec = _traced(coverage_models, "U-Net")
  g = spec["enc2a:heads"]  # GroupNorm(num_groups=2) over 10 channels: 2 groups of 5
  assert g.exact and g.size is None and spec.validate(case.variables)[g.name] == 2
  assert ifjax.FlatMember("params/enc2a_gn/scale", 0, 0, 1, 5) in g.producers
  assert ifjax.FlatMember("params/enc2b/kernel", 2, 0, 1, 5) in g.consumers


def test_scan_over_stacked_layers(coverage_models):
  case, spec = _traced(coverage_models, "scan transformer")
  g = spec["blocks/mlp/fc1"]
  assert g.exact and ("params/blocks/mlp/fc1/kernel", 2, 0) in [tuple(m) for m in g.producers]  # (layer, in, out)
  assert ("params/blocks/mlp/fc2/kernel", 1, 0) in [tuple(m) for m in g.consumers]
  assert not spec["embed"].exact


def test_layernorm_fusion_is_not_exact(coverage_models):
  """Why LayerNorm streams are pruning-only: merging two duplicate channels changes the norm's statistics."""

  class Net(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(nn.LayerNorm(name="ln")(nn.Dense(self.width, name="a")(x)))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  v = Net().init(jax.random.key(0), x)
  spec = ifjax.trace_spec(Net().apply, v, x)
  assert [(g.name, g.exact) for g in spec.groups] == [("a", False)]
  dup = coverage_models.planted(v, spec, spec.groups)
  small = ifjax.apply_plan(dup, spec, {"a": coverage_models.merge_plan(6)})
  diff = np.max(np.abs(Net(width=5).apply(small, x) - Net().apply(dup, x)))
  assert diff > 1e-3  # the 5-channel LayerNorm normalises differently


def test_module_called_twice_is_a_clear_error():

  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      d = nn.Dense(4, name="shared")
      return nn.Dense(2, name="out")(nn.relu(d(nn.relu(d(x)))))

  v = Twice().init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ifjax.UnsupportedPrimitiveError, match="module 'shared' is applied more than once"):
    ifjax.trace_spec(Twice().apply, v, jnp.ones((1, 4)))


def test_residual_with_input_data_freezes_channels():
  """Channels added element-wise to the raw input cannot be permuted (the input's order is fixed)."""

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      y = x + nn.Dense(3, name="a")(nn.relu(nn.Dense(5, name="h")(x)))
      return nn.Dense(2, name="out")(y)

  x = jnp.ones((2, 3))
  v = Net().init(jax.random.key(0), x)
  assert ifjax.trace_spec(Net().apply, v, x).names == ["h"]


def test_tied_embedding_is_pruning_only():
  """An embedding table read again as the output projection (``Embed.attend``): one array axis is both a
  producer and a consumer of the stream, so the stream can be pruned but not fused exactly."""

  class TiedLM(nn.Module):

    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(20, 8, name="embed")
      h = embed(ids)
      h = h + nn.Dense(8, name="proj")(nn.gelu(nn.Dense(16, name="fc")(h)))
      return embed.attend(h)

  ids = jnp.asarray(np.random.default_rng(0).integers(0, 20, size=(2, 5)), jnp.int32)
  v = TiedLM().init(jax.random.key(0), ids)
  spec = ifjax.trace_spec(TiedLM().apply, v, ids)
  assert {g.name: g.exact for g in spec.groups} == {"fc": True, "embed": False}
  assert ("params/embed/embedding", 1, 0) in [tuple(m) for m in spec["embed"].producers]
  assert "params/embed/embedding" not in [m.path for m in spec["embed"].consumers]
  ifjax.check_spec(TiedLM().apply, v, spec, ids)


def test_sliced_channels_become_groups_of_their_own():
  """A layer's channels cut by slices (a split into branches): each piece is a group, named by its range."""

  class Branches(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(10, name="a")(x))
      left, mid, right = h[:, :4], h[:, 4:7], h[:, 7:]
      return nn.Dense(2, name="l")(left) + nn.Dense(2, name="m")(mid) * nn.Dense(2, name="r")(right)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  v = Branches().init(jax.random.key(0), x)
  spec = ifjax.trace_spec(Branches().apply, v, x)
  assert spec.names == ["a[0:4]", "a[4:7]", "a[7:10]"]
  assert [(m.path, m.offset) for m in spec["a[4:7]"].consumers] == [("params/m/kernel", 0)]
  ifjax.check_spec(Branches().apply, v, spec, x, scaling=True)
