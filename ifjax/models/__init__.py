"""Model zoo: ``get(name, num_classes=10, widths=None) -> (module, spec)``.

>>> import ifjax
>>> module, spec = ifjax.models.get("vgg11_bn")
>>> spec[0].name, len(spec.groups)
('conv7', 8)
"""

from __future__ import annotations

from collections.abc import Mapping

from ifjax._spec import Spec
from ifjax.models._pretrained import (CIFAR_RESNET_DEPTHS, CifarResNet, LeNet5, cifar_resnet_spec,
                                     cifar_resnet_torch_keys, lenet5_spec, lenet5_torch_keys)
from ifjax.models._zoo import MLP, VGG11BN, ResNet18, ResNet50, mlp_spec, resnet18_spec, resnet50_spec, vgg11_bn_spec

# name -> (module factory(num_classes, widths), spec factory(widths), torch key map factory or None)
_ZOO = {
    "mlp": (MLP, lambda w: mlp_spec(), None),
    "vgg11_bn": (VGG11BN, lambda w: vgg11_bn_spec(), None),
    "resnet18": (ResNet18, lambda w: resnet18_spec(), None),
    "resnet50": (ResNet50, lambda w: resnet50_spec(), None),
    "lenet5": (LeNet5, lambda w: lenet5_spec(), lenet5_torch_keys),
}
for _name, _blocks in CIFAR_RESNET_DEPTHS.items():
  _ZOO[_name] = (lambda num_classes, widths, b=_blocks: CifarResNet(b, num_classes, widths),
                 lambda w, b=_blocks: cifar_resnet_spec(b, w), lambda b=_blocks: cifar_resnet_torch_keys(b))


def names() -> list[str]:
  return sorted(_ZOO)


def get(name: str, num_classes: int = 10, widths: Mapping[str, int] | None = None):
  """A flax.linen module and its spec. ``widths`` = ``{group name: width}`` (e.g. ``ifjax.widths(pruned, spec)``)."""
  if name not in _ZOO:
    raise ValueError(f"unknown model {name!r}; the zoo has {names()}")
  make_module, make_spec, _ = _ZOO[name]
  widths = dict(widths or {})
  spec: Spec = make_spec(widths)
  unknown = sorted(set(widths) - set(spec.names))
  if unknown:
    raise ValueError(f"widths for unknown groups {unknown}; {name} has groups {spec.names}")
  bad = {k: v for k, v in widths.items() if not isinstance(v, int) or v < 1}
  if bad:
    raise ValueError(f"widths must be positive ints, got {bad}")
  return make_module(num_classes=num_classes, widths=tuple(sorted(widths.items()))), spec


def torch_keys(name: str) -> dict[str, tuple[str, str]]:
  """``{flax path: (torch state_dict key, layout)}`` for a model with a public PyTorch checkpoint."""
  if name not in _ZOO or _ZOO[name][2] is None:
    raise ValueError(f"no PyTorch key map for {name!r}; models with one: "
                     f"{sorted(n for n, z in _ZOO.items() if z[2] is not None)}")
  return _ZOO[name][2]()


__all__ = ["CifarResNet", "LeNet5", "MLP", "ResNet18", "ResNet50", "VGG11BN", "get", "names", "torch_keys"]
