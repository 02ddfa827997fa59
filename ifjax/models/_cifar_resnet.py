"""The CIFAR ResNet-20/32/44/56/110 of github akamaster/pytorch_resnet_cifar10 (He et al. 2016, option-A
shortcuts: stride-2 subsample + zero channel padding), with their specs and torch key maps.

Option A couples the residual streams of consecutive stages: stage k's stream is
padded by ``lo`` zero channels in front and ``hi`` behind, so stream channel c of
stage k is channel c + lo of stage k + 1. A sound group is therefore a *segment*:
``stream1`` (stage 1's 16 channels) lives at offset 8 of stage 2's stream and
offset 24 of stage 3's; ``stream2a`` / ``stream2b`` are stage 2's own padding
channels (also inside stage 3's stream); ``stream3a`` / ``stream3b`` stage 3's.
Fusing each segment group with one map keeps every residual add consistent, and
the pruned model pads by the pruned segment widths.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ifjax._spec import Group, Spec
from ifjax.models._zoo import Widths, _bn

CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
_PAD = ((1, 1), (1, 1))  # PyTorch's padding=1, also for the stride-2 convs (Flax "SAME" would pad (0, 1))


def stream_widths(widths: dict) -> dict[str, int]:
  """Segment widths (defaults 16 / 8+8 / 16+16) and the resulting stream and padding sizes."""
  w = {"stream1": 16, "stream2a": 8, "stream2b": 8, "stream3a": 16, "stream3b": 16}
  w.update({k: v for k, v in widths.items() if k in w})
  w["s1"] = w["stream1"]
  w["s2"] = w["stream2a"] + w["s1"] + w["stream2b"]
  w["s3"] = w["stream3a"] + w["s2"] + w["stream3b"]
  return w


class CifarBlock(nn.Module):
  """conv1 -> bn1 -> ReLU -> conv2 -> bn2, + shortcut (identity, or option A: subsample and pad (lo, hi))."""

  inner: int
  out: int
  stride: int
  pad: tuple[int, int] | None

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn("bn1", train)(nn.Conv(self.inner, (3, 3), self.stride, padding=_PAD, use_bias=False,
                                          name="conv1")(x)))
    y = _bn("bn2", train)(nn.Conv(self.out, (3, 3), padding=_PAD, use_bias=False, name="conv2")(y))
    if self.pad is not None:
      x = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), self.pad))
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """(batch, 32, 32, 3) -> logits. ``stem_conv``/``stem_bn``, blocks ``layer{s}_{b}``, ``fc``."""

  blocks: int = 3
  num_classes: int = 10
  widths: Widths = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = dict(self.widths)
    sw = stream_widths(w)
    x = nn.relu(_bn("stem_bn", train)(nn.Conv(sw["s1"], (3, 3), padding=_PAD, use_bias=False, name="stem_conv")(x)))
    for s, planes in enumerate((16, 32, 64), start=1):
      for b in range(self.blocks):
        name = f"layer{s}_{b}"
        first = s > 1 and b == 0
        pad = (sw[f"stream{s}a"], sw[f"stream{s}b"]) if first else None
        x = CifarBlock(w.get(f"{name}/conv1", planes), sw[f"s{s}"], 2 if first else 1, pad, name=name)(x, train)
    return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def cifar_resnet_spec(blocks: int, widths: dict | None = None) -> Spec:
  """Internal groups ``layer{s}_{b}/conv1`` and the five stream segment groups, at ``widths``."""
  sw = stream_widths(dict(widths or {}))
  stage = {s: [f"layer{s}_{b}" for b in range(blocks)] for s in (1, 2, 3)}
  # where each segment sits inside each stage's stream (None: not there)
  lo2, lo3 = sw["stream2a"], sw["stream3a"]
  place = {
      "stream1": {1: 0, 2: lo2, 3: lo3 + lo2},
      "stream2a": {2: 0, 3: lo3},
      "stream2b": {2: lo2 + sw["s1"], 3: lo3 + lo2 + sw["s1"]},
      "stream3a": {3: 0},
      "stream3b": {3: lo3 + sw["s2"]},
  }
  groups, bns = [], [("stem_conv", "stem_bn")]
  for s in (1, 2, 3):
    for blk in stage[s]:
      groups.append(Group(f"{blk}/conv1", [(f"params/{blk}/conv1/kernel", 3)], [(f"params/{blk}/conv2/kernel", 2)]))
      bns += [(f"{blk}/conv1", f"{blk}/bn1"), (f"{blk}/conv2", f"{blk}/bn2")]
    for seg, where in place.items():
      if max(where) != s:  # a segment's group sits after the last stage that carries it
        continue
      prod, cons = [], []
      for t, off in where.items():
        if t == 1:
          prod.append(("params/stem_conv/kernel", 3, off))
        prod += [(f"params/{b}/conv2/kernel", 3, off) for b in stage[t]]
        readers = stage[t][1:] if t > 1 else stage[t]
        cons += [(f"params/{b}/conv1/kernel", 2, off) for b in readers]
        if t < 3:
          cons.append((f"params/layer{t + 1}_0/conv1/kernel", 2, off))
      cons.append(("params/fc/kernel", 0, where[3]))
      groups.append(Group(seg, prod, cons, size=sw[seg]))
  return Spec(tuple(groups), tuple(bns))


def cifar_resnet_torch_keys(blocks: int) -> dict[str, tuple[str, str]]:
  """``{flax path: (torch key, layout)}`` for akamaster's state_dict (``module.`` stripped)."""
  keys = {"params/stem_conv/kernel": ("conv1.weight", "conv"), "params/fc/kernel": ("linear.weight", "dense"),
          "params/fc/bias": ("linear.bias", "vector")}
  keys.update(bn_torch_keys("stem_bn", "bn1"))
  for s in (1, 2, 3):
    for b in range(blocks):
      for k in (1, 2):
        keys[f"params/layer{s}_{b}/conv{k}/kernel"] = (f"layer{s}.{b}.conv{k}.weight", "conv")
        keys.update(bn_torch_keys(f"layer{s}_{b}/bn{k}", f"layer{s}.{b}.bn{k}"))
  return keys


def bn_torch_keys(flax: str, torch: str) -> dict[str, tuple[str, str]]:
  """The four arrays of a Flax BatchNorm and their PyTorch names."""
  return {f"params/{flax}/scale": (f"{torch}.weight", "vector"), f"params/{flax}/bias": (f"{torch}.bias", "vector"),
          f"batch_stats/{flax}/mean": (f"{torch}.running_mean", "vector"),
          f"batch_stats/{flax}/var": (f"{torch}.running_var", "vector")}
