"""Small random-init models for the README coverage table (tests/test_trace_coverage.py, the resize tests).

Every builder returns a :class:`Case`: ``apply(variables, x)`` gives one output array, ``variables`` have
non-trivial norm statistics and affine parameters (so permutation checks have teeth), ``x`` is an example
input. Tests import it by name (``tests/`` is on pytest's ``pythonpath``) or take the ``coverage_models``
fixture of ``tests/conftest.py``; ``experiments/coverage_table.py`` loads it by path.

``CASES`` maps a model name to its builder; ``build(name)`` builds one; ``duplicate_errors(case, spec)``
measures exact-duplicate preservation. Nothing heavy runs at import.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Case(NamedTuple):
  """A model to trace: ``apply(variables, x) -> array``; ``module`` is the Flax module (None for wrappers)."""

  name: str
  apply: Callable[..., Any]
  variables: dict
  x: Any
  module: Any = None


def randomized(variables, seed: int = 0) -> dict:
  """Random values of ``variables``' shapes, drawn in NumPy: kernels ~ N(0, 1 / fan-in), norm scales ~1,
  biases ~0.1, BN means ~0.1 and variances in [0.5, 1.5] (non-trivial, so permutation checks have teeth).
  ``variables`` may be ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of ``init``: nothing compiles)."""
  rng = np.random.default_rng(seed)

  def f(path, a):
    key = jax.tree_util.keystr(path)
    if "batch_stats" in key:
      x = 0.5 + rng.uniform(size=a.shape) if "var" in key else 0.1 * rng.normal(size=a.shape)
    elif len(a.shape) >= 2:
      x = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    else:
      x = (1.0 if "scale" in key else 0.0) + 0.1 * rng.normal(size=a.shape)
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(f, variables)


def _case(name, module, x, seed=0, **apply_kwargs) -> Case:
  shapes = jax.eval_shape(lambda k, x: module.init(k, x, **apply_kwargs), jax.random.key(seed), x)
  return Case(name, lambda v, x: module.apply(v, x, **apply_kwargs), randomized(shapes, seed), x, module)


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# -- exact-duplicate preservation ---------------------------------------------------------
def merge_plan(n: int):
  """A plan that fuses neuron 1 into neuron 0 (barycentric: producers averaged, consumers summed), keeps the rest."""
  import ifjax

  keep = np.array([0, *range(2, n)], np.int32)
  t = np.zeros((n, n - 1), np.float32)
  t[keep, np.arange(n - 1)] = 1.0 / n
  t[1, 0] = 1.0 / n
  prod, cons = ifjax.transport_maps(t, "barycentric")
  return ifjax.GroupPlan(keep, np.ones(n, np.float32), t, prod, cons, np.asarray(True), np.asarray(0.0, np.float32),
                         np.asarray(0))


def planted(variables, spec, groups, *, every_pair: bool = False) -> dict:
  """BN-folded ``variables`` in which neuron 1 of each of ``groups`` duplicates neuron 0 on every producer array
  (``every_pair``: neuron 2j + 1 duplicates neuron 2j, for every j)."""
  from flax import traverse_util

  import ifjax
  from ifjax._batchnorm import derived_bn

  sizes = spec.validate(variables)
  flat = {k: np.array(a) for k, a in traverse_util.flatten_dict(ifjax.fold_batchnorm(variables, spec), sep="/").items()}
  for g in groups:
    pairs = 2 * np.arange(sizes[g.name] // 2 if every_pair else 1)
    for m in list(g.producers) + [m for m, _ in derived_bn(spec, g) if m.path in flat]:
      x = np.array(m.neurons_first(flat[m.path]))
      x[m.offset + pairs + 1] = x[m.offset + pairs]
      flat[m.path] = np.asarray(m.restore(x))
  return traverse_util.unflatten_dict({k: jnp.asarray(a) for k, a in flat.items()}, sep="/")


def pair_scores(sizes, groups, rng) -> dict:
  """``{group: (n,) scores}`` that rank exactly one neuron of every pair (2j, 2j + 1) in the top half."""
  scores = {}
  for g in groups:
    s = rng.uniform(0.1, 1.0, sizes[g.name])
    s[2 * np.arange(sizes[g.name] // 2) + rng.integers(0, 2, sizes[g.name] // 2)] += 2.0
    scores[g.name] = s
  return scores


def duplicate_errors(case: Case, spec) -> tuple[float, float]:
  """Plants a duplicate neuron in every exact group of ``spec`` and fuses it into its twin (``keep_shapes``).
  Returns (relative output change: ~0 when the spec and fusion are exact, the same fusion without planted
  duplicates: clearly > 0, a control)."""
  import ifjax

  sizes = spec.validate(case.variables)
  exact = [g for g in spec.groups if g.exact and sizes[g.name] > 1]
  plan = {g.name: merge_plan(sizes[g.name]) for g in exact}
  run = jax.jit(case.apply)
  out = lambda v: np.asarray(run(v, case.x), np.float64)
  rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  dup, folded = planted(case.variables, spec, exact), ifjax.fold_batchnorm(case.variables, spec)
  return (rel(out(ifjax.apply_plan(dup, spec, plan, keep_shapes=True)), out(dup)),
          rel(out(ifjax.apply_plan(folded, spec, plan, keep_shapes=True)), out(folded)))


def resize_error(case: Case, spec, groups, ratio: float = 0.25) -> tuple[float, int, int]:
  """Plans ``groups`` at ``ratio``, runs the pruned variables at their smaller shapes with :func:`ifjax.resize`
  and compares with the full-size model on the zero-padded ``keep_shapes=True`` variables. Returns (relative
  difference, parameters before, parameters after)."""
  import ifjax

  plan = ifjax.plan(case.variables, spec, ratio, groups=groups)
  small = ifjax.apply_plan(case.variables, spec, plan)
  padded = ifjax.apply_plan(case.variables, spec, plan, keep_shapes=True)
  small_apply = jax.jit(ifjax.resize(case.apply, case.variables, small, case.x))
  a, b = (np.asarray(o, np.float64) for o in (small_apply(small, case.x), jax.jit(case.apply)(padded, case.x)))
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b))), ifjax.param_count(case.variables), ifjax.param_count(small)


# -- transformers ------------------------------------------------------------------------
class MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(x)))


class ViTBlock(nn.Module):
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(self.heads, name="attn")(nn.LayerNorm(name="ln1")(x))
    x = x + y
    return x + MLP(self.mlp, x.shape[-1], name="mlp")(nn.LayerNorm(name="ln2")(x))


class ViT(nn.Module):
  """Patch embedding, class token, position embedding, pre-norm blocks, head on the class token."""

  dim: int = 16
  heads: int = 4
  mlp: int = 32
  depth: int = 2
  patch: int = 4
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, name="embed")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      x = ViTBlock(self.heads, self.mlp, name=f"block{i}")(x)
    return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="norm")(x)[:, 0])


class MixerBlock(nn.Module):
  tokens_hidden: int
  channels_hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln1")(x).transpose(0, 2, 1)
    x = x + MLP(self.tokens_hidden, x.shape[1], name="token_mlp")(y).transpose(0, 2, 1)
    return x + MLP(self.channels_hidden, x.shape[2], name="channel_mlp")(nn.LayerNorm(name="ln2")(x))


class Mixer(nn.Module):
  dim: int = 12
  depth: int = 2
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (4, 4), strides=4, name="embed")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for i in range(self.depth):
      x = MixerBlock(8, 24, name=f"block{i}")(x)
    return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="norm")(x).mean(1))


class ConvNeXtBlock(nn.Module):
  """Depthwise 7x7 conv, LayerNorm, pointwise MLP (4x), layer scale, residual."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = nn.Conv(c, (7, 7), feature_group_count=c, name="dw")(x)
    y = MLP(4 * c, c, name="mlp")(nn.LayerNorm(name="ln")(y))
    return x + self.param("gamma", nn.initializers.constant(0.5), (c,)) * y


class ConvNeXt(nn.Module):
  dim: int = 8
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="stem_ln")(nn.Conv(self.dim, (2, 2), strides=2, name="stem")(x))
    x = ConvNeXtBlock(name="block0")(x)
    x = ConvNeXtBlock(name="block1")(x)
    x = nn.LayerNorm(name="down_ln")(x)
    x = nn.Conv(2 * self.dim, (2, 2), strides=2, name="down")(x)
    x = ConvNeXtBlock(name="block2")(x)
    return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="norm")(x.mean((1, 2))))


class ScanMLPBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + MLP(24, x.shape[-1], name="mlp")(nn.LayerNorm(name="ln")(x)), None


class ScanTransformer(nn.Module):
  """Three pre-norm MLP blocks stacked with ``nn.scan`` (weights with a leading layer axis)."""

  dim: int = 12
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, name="embed")(x)
    blocks = nn.scan(ScanMLPBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(self.classes, name="head")(x.mean(1))


# -- convnets ----------------------------------------------------------------------------
class InvertedResidual(nn.Module):
  """MobileNetV2: 1x1 expand - BN - ReLU6, 3x3 depthwise - BN - ReLU6, 1x1 project - BN (linear)."""

  out: int
  expand: int = 4
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(use_running_average=True, name=name)
    c = x.shape[-1] * self.expand
    y = nn.relu6(bn("bn1")(nn.Conv(c, (1, 1), use_bias=False, name="expand")(x)))
    y = nn.relu6(bn("bn2")(nn.Conv(c, (3, 3), strides=self.stride, feature_group_count=c, use_bias=False,
                                   name="dw")(y)))
    y = bn("bn3")(nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y))
    return x + y if self.stride == 1 and self.out == x.shape[-1] else y


class MobileNetV2(nn.Module):
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.relu6(nn.BatchNorm(use_running_average=True, name="bn0")(nn.Conv(8, (3, 3), 2, use_bias=False,
                                                                           name="stem")(x)))
    x = InvertedResidual(8, name="ir1")(x)
    x = InvertedResidual(12, stride=2, name="ir2")(x)
    x = InvertedResidual(12, name="ir3")(x)
    return nn.Dense(self.classes, name="fc")(x.mean((1, 2)))


class DenseLayer(nn.Module):
  growth: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.growth, (3, 3), use_bias=False, name="conv")(
        nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x)))
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
  """A stem, a dense block of three BN-ReLU-conv layers with concatenations, a transition, a head."""

  growth: int = 4
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    for i in range(3):
      x = DenseLayer(self.growth, name=f"layer{i}")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="trans_bn")(x))
    x = nn.avg_pool(nn.Conv(10, (1, 1), use_bias=False, name="trans")(x), (2, 2), (2, 2))
    x = jnp.concatenate([x, nn.Conv(4, (1, 1), name="side")(x)], axis=-1)
    x = nn.Conv(x.shape[-1], (3, 3), feature_group_count=x.shape[-1], name="dw")(x)  # biased depthwise after concat
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="final_bn")(x))
    return nn.Dense(self.classes, name="fc")(x.mean((1, 2)))


class UNet(nn.Module):
  """Two-level U-Net: encoder convs (two with GroupNorm), nearest upsampling, skip concatenations, a 1x1 head."""

  @nn.compact
  def __call__(self, x):
    def conv(c, name, gn=False):
      norm = nn.GroupNorm(num_groups=2, name=f"{name}_gn") if gn else (lambda y: y)
      return lambda y: nn.relu(norm(nn.Conv(c, (3, 3), name=name)(y)))

    e1 = conv(6, "enc1b")(conv(6, "enc1a")(x))
    e2 = conv(10, "enc2b")(conv(10, "enc2a", gn=True)(nn.max_pool(e1, (2, 2), (2, 2))))
    b = conv(12, "mid", gn=True)(nn.max_pool(e2, (2, 2), (2, 2)))
    d2 = conv(10, "dec2")(jnp.concatenate([e2, jnp.repeat(jnp.repeat(b, 2, 1), 2, 2)], -1))
    d1 = conv(6, "dec1")(jnp.concatenate([e1, jnp.repeat(jnp.repeat(d2, 2, 1), 2, 2)], -1))
    return nn.Conv(2, (1, 1), name="head")(d1)


# -- flaxmodels (random init, nothing downloaded) ---------------------------------------------
def _flaxmodels_resnet(depth: int) -> Case:
  import flaxmodels

  build = {18: flaxmodels.ResNet18, 50: flaxmodels.ResNet50}[depth]
  module = build(output="logits", pretrained=None, num_classes=5)
  return _case(f"flaxmodels ResNet{depth}", module, _images((2, 32, 32, 3)), train=False)


def _flaxmodels_vgg16() -> Case:
  import flaxmodels

  # include_head=True needs 224x224 inputs and 120M head weights; the conv trunk is the pruned part
  module = flaxmodels.VGG16(output="logits", pretrained=None, include_head=False)
  return _case("flaxmodels VGG16", module, _images((2, 32, 32, 3)), train=False)


def gpt2_config(**kw) -> types.SimpleNamespace:
  """A tiny GPT-2 config in flaxmodels' format (its fields, GPT-2's defaults)."""
  cfg = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=4, n_inner=None,
             activation_function="gelu_new",
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, scale_attn_weights=True)
  return types.SimpleNamespace(**{**cfg, **kw})


class _ReshapeNewshape:
  """``jax.numpy`` whose ``reshape`` also takes the removed ``newshape=`` keyword (for flaxmodels' GPT-2 only)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def reshape(a, shape=None, newshape=None):
    return jnp.reshape(a, newshape if shape is None else shape)


class GPT2LM(nn.Module):
  """flaxmodels' GPT2Model with a language-model head. (flaxmodels 0.1.3's own GPT2LMHeadModel fails without
  pretrained weights: it reads ``self.param_dict``, which only its pretrained branch sets.) Returns the logits
  only: the last hidden state as a second output would pin the residual stream."""

  config: Any

  @nn.compact
  def __call__(self, ids):
    from flaxmodels.gpt2 import gpt2

    gpt2.jnp = _ReshapeNewshape()  # flaxmodels 0.1.3 calls jnp.reshape(x, newshape=...), gone from jax
    h = gpt2.GPT2Model(config=self.config, pretrained=None, name="transformer")(input_ids=ids)["last_hidden_state"]
    return nn.Dense(self.config.vocab_size, use_bias=False, name="lm_head")(h)


def _flaxmodels_gpt2() -> Case:
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, size=(2, 8)), jnp.int32)
  return _case("flaxmodels GPT-2", GPT2LM(gpt2_config()), ids)


def _zoo(name: str) -> Case:
  import ifjax

  module, _ = ifjax.models.get(name, num_classes=5)
  shape = (2, 28, 28, 1) if name == "lenet5" else (2, 64, 64, 3) if name == "efficientnet_lite0" else (2, 32, 32, 3)
  return _case(f"zoo {name}", module, _images(shape), train=False)


ZOO = ["mlp", "lenet5", "resnet20", "resnet56", "vgg11_bn", "resnet18", "resnet50", "efficientnet_lite0"]

CASES: dict[str, Callable[[], Case]] = {
    "ViT": lambda: _case("ViT", ViT(), _images((2, 16, 16, 3))),
    "MLP-Mixer": lambda: _case("MLP-Mixer", Mixer(), _images((2, 16, 16, 3))),
    "ConvNeXt": lambda: _case("ConvNeXt", ConvNeXt(), _images((2, 16, 16, 3))),
    "MobileNetV2": lambda: _case("MobileNetV2", MobileNetV2(), _images((2, 16, 16, 3))),
    "DenseNet": lambda: _case("DenseNet", DenseNet(), _images((2, 8, 8, 3))),
    "U-Net": lambda: _case("U-Net", UNet(), _images((2, 16, 16, 3))),
    "scan transformer": lambda: _case("scan transformer", ScanTransformer(), _images((2, 6, 5))),
    "flaxmodels ResNet18": lambda: _flaxmodels_resnet(18),
    "flaxmodels ResNet50": lambda: _flaxmodels_resnet(50),
    "flaxmodels VGG16": _flaxmodels_vgg16,
    "flaxmodels GPT-2": _flaxmodels_gpt2,
    **{f"zoo {name}": (lambda name=name: _zoo(name)) for name in ZOO},  # tests/test_zoo.py covers these
}


def build(name: str) -> Case:
  """The model ``name`` of :data:`CASES`, freshly initialised (deterministic)."""
  if name not in CASES:
    raise KeyError(f"unknown coverage model {name!r}; models are {sorted(CASES)}")
  return CASES[name]()
