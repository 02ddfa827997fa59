"""The paper's models as flax.linen modules with hand-written specs.

Inputs are NHWC (the MLP flattens). ``widths`` is a tuple of ``(group name,
width)`` pairs (hashable, so it can be a module field); missing groups keep
their default width. Spec groups are in network order, so the paper's group
0 (closest to the output) is the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from ifjax._spec import Group, Spec

Widths = tuple[tuple[str, int], ...]


def _bn(name: str, train: bool):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv_group(name: str, producers: Sequence[str], consumers: Sequence[str], fc: str | None = None,
                bias: bool = True) -> Group:
  """A group of conv producers (kernel out axis 3, + bias) and conv consumers (in axis 2), plus a Dense ``fc``."""
  prod = []
  for p in producers:
    prod.append((f"params/{p}/kernel", 3))
    if bias:
      prod.append((f"params/{p}/bias", 0))
  cons = [(f"params/{c}/kernel", 2) for c in consumers]
  if fc:
    cons.append((f"params/{fc}/kernel", 0))
  return Group(name, prod, cons)


# -- MLP -----------------------------------------------------------------------------
class MLP(nn.Module):
  """(batch, ...) -> (batch, num_classes). Hidden Dense layers ``dense0, dense1, ...`` and ``head``."""

  hidden: tuple[int, ...] = (128, 64)
  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(w.get(f"dense{i}", h), name=f"dense{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def mlp_spec(depth: int = 2) -> Spec:
  names = [f"dense{i}" for i in range(depth)] + ["head"]
  return Spec(tuple(
      Group(names[i], [(f"params/{names[i]}/kernel", 1), (f"params/{names[i]}/bias", 0)],
            [(f"params/{names[i + 1]}/kernel", 0)]) for i in range(depth)))


# -- VGG11-BN (CIFAR, kuangliu) ------------------------------------------------------------
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
  """(batch, 32, 32, 3) -> logits. conv{i} (3x3, bias) -> bn{i} -> ReLU, max-pools, then ``fc``."""

  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w, i = dict(self.widths), 0
    for c in VGG11_CFG:
      if c == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      x = nn.Conv(w.get(f"conv{i}", c), (3, 3), padding=1, name=f"conv{i}")(x)
      x = nn.relu(_bn(f"bn{i}", train)(x))
      i += 1
    return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def vgg11_bn_spec() -> Spec:
  n = sum(c != "M" for c in VGG11_CFG)
  groups = [_conv_group(f"conv{i}", [f"conv{i}"], [f"conv{i + 1}"] if i + 1 < n else [], fc=None if i + 1 < n else "fc")
            for i in range(n)]
  return Spec(tuple(groups), tuple((f"conv{i}", f"bn{i}") for i in range(n)))


# -- ResNet18 (CIFAR, kuangliu: every conv has a bias) -----------------------------------------
class BasicBlock(nn.Module):
  """conv1 -> bn1 -> ReLU -> conv2 -> bn2, plus the (1x1 conv + BN) shortcut when the shape changes."""

  inner: int
  out: int
  stride: int
  shortcut: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn("bn1", train)(nn.Conv(self.inner, (3, 3), self.stride, padding=1, name="conv1")(x)))
    y = _bn("bn2", train)(nn.Conv(self.out, (3, 3), padding=1, name="conv2")(y))
    if self.shortcut:
      x = _bn("shortcut_bn", train)(nn.Conv(self.out, (1, 1), self.stride, name="shortcut_conv")(x))
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """(batch, 32, 32, 3) -> logits. Stem 3x3 (stride 1, no max-pool), blocks ``layer{s}_{b}``, ``fc``."""

  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    stream = w.get("stream1", 64)
    x = nn.relu(_bn("stem_bn", train)(nn.Conv(stream, (3, 3), padding=1, name="stem_conv")(x)))
    for s, planes in enumerate((64, 128, 256, 512), start=1):
      out = w.get(f"stream{s}", planes)
      for b in range(2):
        stride = 2 if (s > 1 and b == 0) else 1
        name = f"layer{s}_{b}"
        x = BasicBlock(w.get(f"{name}/conv1", planes), out, stride, shortcut=(b == 0 and s > 1), name=name)(x, train)
    return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def resnet18_spec() -> Spec:
  groups, bns = [], [("stem_conv", "stem_bn")]
  for s in range(1, 5):
    blocks = [f"layer{s}_{b}" for b in range(2)]
    for blk in blocks:
      groups.append(_conv_group(f"{blk}/conv1", [f"{blk}/conv1"], [f"{blk}/conv2"]))
      bns += [(f"{blk}/conv1", f"{blk}/bn1"), (f"{blk}/conv2", f"{blk}/bn2")]
    producers = (["stem_conv"] if s == 1 else [f"{blocks[0]}/shortcut_conv"]) + [f"{b}/conv2" for b in blocks]
    if s > 1:
      bns.append((f"{blocks[0]}/shortcut_conv", f"{blocks[0]}/shortcut_bn"))
    readers = [f"{b}/conv1" for b in blocks] if s == 1 else [f"{blocks[1]}/conv1"]
    nxt = [f"layer{s + 1}_0/conv1", f"layer{s + 1}_0/shortcut_conv"] if s < 4 else []
    groups.append(_conv_group(f"stream{s}", producers, readers + nxt, fc="fc" if s == 4 else None))
  return Spec(tuple(groups), tuple(bns))


# -- ResNet50 (ImageNet, torchvision v1.5 layout, convs without bias) -----------------------------
class Bottleneck(nn.Module):
  """1x1 conv1 -> 3x3 conv2 (stride) -> 1x1 conv3, each with BN; ``downsample`` (1x1 conv + BN) when needed."""

  inner1: int
  inner2: int
  out: int
  stride: int
  downsample: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn("bn1", train)(nn.Conv(self.inner1, (1, 1), use_bias=False, name="conv1")(x)))
    y = nn.relu(_bn("bn2", train)(nn.Conv(self.inner2, (3, 3), self.stride, padding=1, use_bias=False,
                                          name="conv2")(y)))
    y = _bn("bn3", train)(nn.Conv(self.out, (1, 1), use_bias=False, name="conv3")(y))
    if self.downsample:
      x = _bn("downsample_bn", train)(nn.Conv(self.out, (1, 1), self.stride, use_bias=False,
                                              name="downsample_conv")(x))
    return nn.relu(y + x)


RESNET50_BLOCKS = (3, 4, 6, 3)


class ResNet50(nn.Module):
  """(batch, 224, 224, 3) -> logits. 7x7/2 stem + 3x3/2 max-pool, bottlenecks [3, 4, 6, 3], ``fc``."""

  num_classes: int = 1000
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    x = nn.Conv(w.get("stem_conv", 64), (7, 7), 2, padding=3, use_bias=False, name="stem_conv")(x)
    x = nn.relu(_bn("stem_bn", train)(x))
    # (flax annotates padding as str; it takes explicit (low, high) pairs too)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pyright: ignore[reportArgumentType]
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), RESNET50_BLOCKS), start=1):
      out = w.get(f"stream{s}", planes * 4)
      for b in range(n):
        name = f"layer{s}_{b}"
        x = Bottleneck(w.get(f"{name}/conv1", planes), w.get(f"{name}/conv2", planes), out,
                       2 if (s > 1 and b == 0) else 1, downsample=(b == 0), name=name)(x, train)
    return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def resnet50_spec() -> Spec:
  groups = [_conv_group("stem_conv", ["stem_conv"], ["layer1_0/conv1", "layer1_0/downsample_conv"], bias=False)]
  bns = [("stem_conv", "stem_bn")]
  for s, n in enumerate(RESNET50_BLOCKS, start=1):
    blocks = [f"layer{s}_{b}" for b in range(n)]
    for blk in blocks:
      groups.append(_conv_group(f"{blk}/conv1", [f"{blk}/conv1"], [f"{blk}/conv2"], bias=False))
      groups.append(_conv_group(f"{blk}/conv2", [f"{blk}/conv2"], [f"{blk}/conv3"], bias=False))
      bns += [(f"{blk}/conv{k}", f"{blk}/bn{k}") for k in (1, 2, 3)]
    bns.append((f"{blocks[0]}/downsample_conv", f"{blocks[0]}/downsample_bn"))
    producers = [f"{blocks[0]}/downsample_conv"] + [f"{b}/conv3" for b in blocks]
    readers = [f"{b}/conv1" for b in blocks[1:]]
    nxt = [f"layer{s + 1}_0/conv1", f"layer{s + 1}_0/downsample_conv"] if s < 4 else []
    groups.append(_conv_group(f"stream{s}", producers, readers + nxt, fc="fc" if s == 4 else None, bias=False))
  return Spec(tuple(groups), tuple(bns))
