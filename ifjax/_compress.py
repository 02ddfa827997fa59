"""The whole recipe in one call: allocate a budget, fuse or prune, repair the BatchNorms, then distil or fine-tune
as far as the data given allows.

``data`` decides what is used, and the report says what it cost:

* ``None``: no real image at all. Calibration inputs are synthesized from the dense network's BN statistics
  (:func:`ifjax.synthesize_inputs`); they drive the measured allocation, the BN re-estimation and the
  distillation toward the dense network's outputs (:func:`ifjax.finetune.distill`). No image file is opened.
* an array of unlabelled images ``(N, H, W, C)``: the same, on those images instead of synthetic ones.
* ``(images, labels)``: the same on the images (labels unused there), then ``finetune_epochs`` epochs of
  labelled fine-tuning (:func:`ifjax.train.fit`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

import jax
import numpy as np
import optax

from ifjax import _distill, train
from ifjax._budget import allocate
from ifjax._errors import ArgumentTypeError
from ifjax._fuse import apply_plan, plan
from ifjax._repair import recalibrate_batchnorm
from ifjax._scalars import python_scalar
from ifjax._sensitivity import measure_sensitivity
from ifjax._spec import Spec
from ifjax._synthetic import SyntheticInputs, synthesize_inputs

Builder = Callable[[Mapping[str, int]], tuple[Any, Spec | None]]  # (module, spec); no spec for a module


class CompressResult(NamedTuple):
  """Attributes: the compressed ``variables``; their ``spec`` and ``widths``; the ``module`` at those widths;
  ``report``: what was done and what it cost: ``stages`` (one dict per stage: ``stage``, ``seconds`` and its
  own figures), ``seconds`` in all, ``synthetic_images`` made, ``real_images`` used, ``distill_steps``,
  ``finetune_epochs``, and ``cost`` / ``dense_cost`` of the budgeted quantity."""

  variables: dict
  spec: Spec
  widths: dict[str, int]
  module: Any
  report: dict


def _builder(model, variables: Mapping[str, Any]) -> Builder:
  """``widths -> (module, spec)`` from a zoo name, such a callable, or a linen module with a ``widths`` field."""
  if isinstance(model, str):
    from ifjax import models

    if model not in models.names():
      raise ValueError(f"compress: unknown zoo model {model!r}; the zoo has {models.names()}")
    return lambda w: models.get(model, num_classes=models.num_classes(variables, model), widths=dict(w))
  if hasattr(model, "apply") and hasattr(model, "clone"):
    if "widths" not in getattr(model, "__dataclass_fields__", {}):
      raise ArgumentTypeError(f"compress: the module {type(model).__name__} has no 'widths' field to rebuild it at "
                              "the pruned widths; pass a zoo name or a callable widths -> (module, spec)")
    return lambda w: (model.clone(widths=tuple(sorted((k, int(v)) for k, v in w.items()))), None)
  if callable(model):
    return cast(Builder, model)
  raise ArgumentTypeError(f"compress: model must be a zoo name, a linen module with a 'widths' field, or a callable "
                          f"widths -> (module, spec); got {type(model).__name__}")


def _data(data) -> tuple[np.ndarray | None, np.ndarray | None]:
  """``(images or None, labels or None)`` from ``data``, checked (synthetic inputs count as no data)."""
  if data is None or isinstance(data, SyntheticInputs):
    return None, None
  if isinstance(data, tuple) and len(data) != 2:
    raise ValueError(f"compress: data=(images, labels) expected, got a tuple of {len(data)}")
  images, labels = data if isinstance(data, tuple) else (data, None)
  images = np.asarray(images)
  if images.ndim < 2 or images.shape[0] == 0:
    raise ValueError(f"compress: data holds no images (shape {images.shape}); pass data=None for the data-free recipe")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"compress: data images must be preprocessed float arrays, got dtype {images.dtype}")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"compress: labels must be integers of shape ({images.shape[0]},) (one per image), got "
                       f"{labels.dtype} {labels.shape}")
  return images, labels


def _fraction(value, what: str) -> float:
  value = python_scalar(value, "iuf", f"compress: {what}")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ArgumentTypeError(f"compress: {what} must be a number in (0, 1), got {type(value).__name__}")
  if not 0 < value < 1:
    raise ValueError(f"compress: {what} is a fraction of the dense cost: it must be in (0, 1), got {value!r}")
  return float(value)


def compress(model, variables: Mapping[str, Any], spec: Spec, *, target_flops: float | None = None,
             target_params: float | None = None, data=None, method: str = "if",
             plan_options: Mapping[str, Any] | None = None, allocation: str = "measured", curves=None,
             groups: Any = None, protect: Iterable[str | int] = (), input_shape: tuple[int, ...] | None = None,
             repair: bool = True, calibration: int = 256, synthetic_steps: int = 200, distill_steps: int = 0,
             distill_options: Mapping[str, Any] | None = None, finetune_epochs: int = 0, optimizer=None,
             batch_size: int = 64, mesh=None, seed: int = 0, progress: bool = True) -> CompressResult:
  """Compresses a network to a budget: allocate, ``plan`` with ``method``, repair BNs, distil, fine-tune.

  Args:
    model: a zoo name, a ``widths -> (module, spec)`` callable, or a linen module with a ``widths`` field
      (``((group, width), ...)``, as the zoo's): how to build the network at the pruned widths.
    variables: the dense network's variables (with ``batch_stats`` where it has BNs).
    spec: its spec.
    target_flops: the fraction of the dense FLOPs to keep, in (0, 1); give this or ``target_params``.
    target_params: the fraction of the dense parameters to keep, in (0, 1).
    data: ``None`` (data-free), unlabelled images ``(N, H, W, C)`` preprocessed, or ``(images, labels)``; or
      :class:`ifjax.SyntheticInputs` made earlier (still data-free; reused instead of synthesized again).
    method: ``plan``'s method (``"if"``, ``"default"``, ``"neuron_merging"``, ``"model_folding"``).
    plan_options: ``plan``'s other options (``normalization=``, ``repair="statistics"``, ...).
    allocation: ``"measured"`` (each group probed alone on the calibration inputs, :func:`ifjax.measure_sensitivity`,
      BNs re-estimated if ``repair``), ``"uniform"``, ``"global"`` or ``"sensitivity"`` (:func:`ifjax.allocate`).
    curves: :class:`ifjax.SensitivityCurves` measured earlier, for ``"measured"`` (not measured again).
    groups: the groups that may be pruned (default all).
    protect: groups kept whole.
    input_shape: one input's shape, for the synthetic inputs and the FLOP count (default: ``data``'s, or the
      zoo model's).
    repair: re-estimate the BN statistics on the calibration inputs (a model without BNs needs ``False``).
    calibration: calibration inputs: synthesized (``data=None``) or the first of ``data``'s images.
    synthetic_steps: Adam steps per batch of synthetic inputs.
    distill_steps: steps of :func:`ifjax.finetune.distill` toward the dense network on the calibration inputs
      (flip-and-crop augmented). 0: none.
    distill_options: more arguments of :func:`ifjax.finetune.distill`.
    finetune_epochs: with labels, epochs of :func:`ifjax.train.fit` on ``data``.
    optimizer: the fine-tuning optimizer, as :func:`ifjax.train.fit` takes it; default SGD 0.01, momentum 0.9,
      cosine decay.
    batch_size: of distillation and fine-tuning.
    mesh: data-parallel distillation and fine-tuning over its ``"data"`` axis.
    seed: of the synthetic inputs, distillation and fine-tuning.
    progress: tqdm bars.

  Returns:
    :class:`CompressResult`.
  """
  start = time.perf_counter()
  if (target_flops is None) == (target_params is None):
    raise ValueError("compress needs exactly one of target_flops= or target_params=")
  what = "target_flops" if target_flops is not None else "target_params"
  target = _fraction(target_flops if target_flops is not None else target_params, what)
  for name, value, low in (("calibration", calibration, 2), ("synthetic_steps", synthetic_steps, 0),
                           ("distill_steps", distill_steps, 0), ("finetune_epochs", finetune_epochs, 0)):
    value = python_scalar(value, "iu", f"compress: {name}")
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"compress: {name} must be an integer >= {low}, got {value!r}")
  images, labels = _data(data)
  if finetune_epochs and labels is None:
    raise ValueError("compress: finetune_epochs needs labelled data=(images, labels)")
  if repair and not spec.batchnorms:
    raise ValueError("compress: repair=True re-estimates BatchNorm statistics, and this spec has no BatchNorm; "
                     "pass repair=False")
  build = _builder(model, variables)
  module = build({})[0]
  shape = _input_shape(model, images, input_shape)
  train_apply = lambda m: (lambda v, x, **kw: m.apply(v, x, rngs={"dropout": jax.random.key(seed)}, **kw))
  stages: list[dict[str, Any]] = []
  report: dict[str, Any] = {"synthetic_images": 0, "real_images": 0, "distill_steps": 0, "finetune_epochs": 0}

  def stage(name: str, t0: float, **figures):
    stages.append({"stage": name, "seconds": time.perf_counter() - t0, **figures})

  # calibration inputs
  t0 = time.perf_counter()
  if isinstance(data, SyntheticInputs):
    calib = np.asarray(data.inputs)[:calibration]
    report["synthetic_images"] = len(calib)
  elif images is None:
    if not spec.batchnorms:
      raise ValueError("compress: data=None synthesizes inputs from BatchNorm statistics, and this spec has none; "
                       "pass unlabelled images as data")
    calib = np.asarray(synthesize_inputs(train_apply(module), variables, shape, count=calibration,
                                         steps=synthetic_steps, seed=seed, progress=progress).inputs)
    report["synthetic_images"] = len(calib)
    stage("synthesize inputs", t0, images=len(calib), steps=synthetic_steps)
  else:
    calib = images[:calibration]
    report["real_images"] = len(calib)
  batches = [calib[i:i + 128] for i in range(0, len(calib), 128)]

  # allocation
  t0 = time.perf_counter()
  options = {"method": method, **dict(plan_options or {})}
  kwargs: dict[str, Any] = dict(method=allocation, groups=groups, protect=protect)
  if allocation == "measured" and curves is not None:
    kwargs["curves"] = curves
  elif allocation == "measured":
    probed = [g.name for g in spec.select(groups) if g.name not in {spec[p].name for p in protect}]
    kwargs["curves"] = measure_sensitivity(train_apply(module) if repair else module.apply, variables, spec, calib,
                                           groups=probed, recalibrate=repair, progress=progress, **options)
  example = np.zeros((1, *shape), np.float32)
  if target_flops is not None:
    kwargs.update(target_flops=target, rebuild=lambda w: build(w)[0].apply, example_args=(example,),
                  example_kwargs=dict(train=False))
  else:
    kwargs.update(target_params=target)
  alloc = allocate(variables, spec, **kwargs)
  stage("allocate", t0, allocation=allocation, cost=alloc.cost, dense_cost=alloc.dense_cost)
  report.update(cost=alloc.cost, dense_cost=alloc.dense_cost)

  # fuse or prune
  t0 = time.perf_counter()
  pl = plan(variables, spec, alloc.ratios, **options)
  small = apply_plan(variables, spec, pl)
  widths = pl.widths()
  small_module = build(widths)[0]
  stage(f"plan ({method})", t0)

  if repair:
    t0 = time.perf_counter()
    small = recalibrate_batchnorm(train_apply(small_module), small, variables, spec, pl, batches)
    stage("re-estimate BatchNorms", t0, images=len(calib))

  if distill_steps:
    t0 = time.perf_counter()
    opts = {"augment": train.flip_crop(4), "train_bn": False, **dict(distill_options or {})}
    result = _distill.distill(small_module, small, module, variables, calib, steps=distill_steps,
                              batch_size=min(batch_size, len(calib)), mesh=mesh, seed=seed, progress=progress,
                              **opts)
    small = result.variables
    report["distill_steps"] = distill_steps
    stage("distill", t0, steps=distill_steps, images_seen=result.images_seen,
          kl=result.history[-1]["kl"] if result.history else None)

  if finetune_epochs:
    images, labels = cast(np.ndarray, images), cast(np.ndarray, labels)  # labelled data: checked above
    t0 = time.perf_counter()
    opt = optimizer if optimizer is not None else (
        lambda steps: optax.sgd(optax.cosine_decay_schedule(0.01, steps * finetune_epochs), momentum=0.9))
    small, _ = train.fit(small_module, small, (images, labels), epochs=finetune_epochs, optimizer=opt,
                         batch_size=batch_size, mesh=mesh, seed=seed, progress=progress, augment=train.flip_crop(4))
    report["finetune_epochs"] = finetune_epochs
    report["real_images"] = len(images)
    stage("fine-tune", t0, epochs=finetune_epochs, images=len(images))

  report.update(stages=stages, seconds=time.perf_counter() - start)
  return CompressResult(jax.tree.map(np.asarray, small), pl.spec(), widths, small_module, report)


def _input_shape(model, images, input_shape) -> tuple[int, ...]:
  if input_shape is not None:
    return tuple(int(s) for s in input_shape)
  if images is not None:
    return tuple(images.shape[1:])
  if isinstance(model, str):
    from ifjax import data

    kind = data.MODEL_PREPROCESS.get(model)
    if kind is not None:
      return tuple(data.PREPROCESS[kind]["shape"])
  raise ValueError("compress: give input_shape= (one input's shape, e.g. (32, 32, 3)): data=None and the model's "
                   "input shape is not known")
