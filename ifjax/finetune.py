"""Pruning with fine-tuning: one-shot or iterative (k steps x e epochs), Intra-Fusion or default pruning.

The setting of the paper's Table 1 and of its Split-Data pipelines. A *model* is a zoo name or a
callable ``widths -> (module, spec)`` that builds the network at given group widths (zoo models:
``lambda w: ifjax.models.get(name, widths=w)``), because every pruning step changes the shapes.

Iterative pruning to sparsity r in k steps cuts each group to ``kept_count(n, r * i / k)`` neurons
after step i (so the last step lands exactly on ``kept_count(n, r)``, as one-shot pruning does),
re-planning on the current, fine-tuned weights each time.

:func:`distill` trains a pruned network toward the dense one's outputs on unlabelled (or synthetic) inputs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from ifjax import _importance, train
from ifjax._distill import DistillResult, default_optimizer, distill, gram_loss, kl_to_teacher  # noqa: F401 (public)
from ifjax._fuse import _ratios, apply_plan, kept_count, plan, relative_ratios, step_widths  # noqa: F401 (public here)
from ifjax._repair import recalibrate_batchnorm, unfold_batchnorm
from ifjax._spec import Spec
from ifjax._spec import widths as group_widths

Model = str | Callable[[Mapping[str, int]], tuple[Any, Spec]]


class PruneResult(NamedTuple):
  """Attributes: the pruned (and fine-tuned) ``variables``; ``module`` and ``spec`` at its ``widths``;
  ``history``: one dict per pruning step (``step``, ``widths`` after it, ``accuracy_pruned`` before any
  fine-tuning if eval data was given, ``epochs``: the fit history, ``seconds``)."""

  variables: dict
  module: Any
  spec: Spec
  widths: dict[str, int]
  history: list[dict]


def model_builder(model: Model) -> Callable[[Mapping[str, int]], tuple[Any, Spec]]:
  """A zoo name or a ``widths -> (module, spec)`` callable -> the callable."""
  if isinstance(model, str):
    from ifjax import models
    if model not in models.names():
      raise ValueError(f"unknown zoo model {model!r}; the zoo has {models.names()}")
    num_classes = 1000 if model in ("resnet50", "efficientnet_lite0") else 10
    return lambda w: models.get(model, num_classes=num_classes, widths=dict(w))
  if callable(model):
    return model
  raise ValueError(f"model must be a zoo name or a callable widths -> (module, spec), got {type(model).__name__}")


def taylor(module, batches) -> Callable:
  """Taylor importance of the current (BN-folded) weights from labelled ``batches`` ``[(images, labels)]``:
  the gradient of the eval-mode cross-entropy."""

  def loss_fn(variables, batch):
    logits = module.apply(variables, batch[0], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return _importance.taylor(loss_fn=loss_fn, batches=tuple(batches))


def prune_and_finetune(model: Model, variables: Mapping[str, Any], ratio: float | Mapping[str | int, float],
                       train_data, *, method: str = "if", groups=None, steps: int = 1, epochs_per_step: int = 0,
                       finetune_epochs: int = 0, optimizer=None, importance: Any = "l1", taylor_batches: int = 5,
                       recalibrate: int = 0, unfold_bn: bool = True, eval_data=None, mesh=None, batch_size: int = 128,
                       augment=None, seed: int = 0, progress: bool = True, **plan_options) -> PruneResult:
  """Prunes ``groups`` of ``model`` to ``ratio`` in ``steps`` steps, each followed by ``epochs_per_step``
  epochs of fine-tuning, then fine-tunes ``finetune_epochs`` more.

  Args:
    model: zoo name or ``widths -> (module, spec)``; ``variables`` are at the model's default widths.
    variables: the dense variables.
    ratio: neuron sparsity per group (a number, or ``{group name or paper index: ratio}``).
    train_data: ``(images, labels)`` arrays, preprocessed (see :func:`ifjax.train.fit`).
    method: ``"if"`` (Intra-Fusion, :func:`ifjax.plan` with ``plan_options``) or ``"default"`` (keep the
      most important neurons).
    groups: the groups to prune (default all; as for :func:`ifjax.plan`).
    steps: pruning steps; step i prunes every group to ``kept_count(n, ratio * i / steps)`` neurons.
    epochs_per_step: fine-tuning epochs after each pruning step.
    finetune_epochs: fine-tuning epochs after the last step.
    importance: as for :func:`ifjax.plan`, or ``"taylor"``: Taylor scores from ``taylor_batches`` random
      training batches, recomputed at every step.
    taylor_batches: training batches for the ``"taylor"`` importance.
    recalibrate: re-estimate the BatchNorm statistics on this many training batches after each pruning
      step (:func:`ifjax.recalibrate_batchnorm`; data-light); 0 = off (the paper's setting).
    unfold_bn: before each fine-tuning phase (and without ``recalibrate``), give the folded BNs estimated
      statistics (:func:`ifjax.unfold_batchnorm`, data-free; the pruned model's function is unchanged), so
      that training-mode BN starts near the pruned model instead of renormalising its folded channels.
    optimizer: as for :func:`ifjax.train.fit`; default the paper's fine-tuning SGD (lr 0.01).
    eval_data: evaluated after each pruning step and each epoch.
    mesh: as for :func:`ifjax.train.fit`.
    batch_size: as for :func:`ifjax.train.fit`.
    augment: as for :func:`ifjax.train.fit`.
    seed: step i trains, and draws its Taylor and recalibration batches, with ``seed + i``.
    progress: as for :func:`ifjax.train.fit`.
    **plan_options: for :func:`ifjax.plan` (``method="if"``).
  """
  if method not in ("if", "default"):
    raise ValueError(f"method must be 'if' or 'default', got {method!r}")
  build = model_builder(model)
  module, spec = build({})
  optimizer = optimizer or functools.partial(train.paper_sgd, "finetune")
  sizes = spec.validate(variables)
  ratios = {g.name: r for g, r in _ratios(spec, ratio, groups)}
  images, labels = train_data
  history, current = [], dict(variables)
  targets = step_widths(sizes, ratios, steps)
  for i, target in enumerate(targets, start=1):
    t0 = time.perf_counter()
    now = group_widths(current, spec)
    rel = relative_ratios(now, target)
    imp = importance
    if importance == "taylor":
      imp = taylor(module, _sample(images, labels, taylor_batches, batch_size, seed + i))
    pl = plan(current, spec, rel, importance=imp, fuse=method == "if", **(plan_options if method == "if" else {}))
    pruned = apply_plan(current, spec, pl)
    new_widths = group_widths(current, spec, pl)
    new_module, new_spec = build(new_widths)
    epochs = epochs_per_step + (finetune_epochs if i == len(targets) else 0)
    if recalibrate:
      calib = [x for x, _ in _sample(images, labels, recalibrate, batch_size, seed + i)]
      pruned = recalibrate_batchnorm(new_module.apply, pruned, current, spec, pl, calib)
    elif unfold_bn and epochs:
      pruned = unfold_batchnorm(pruned, current, spec, pl)
    module, spec, current = new_module, new_spec, pruned
    entry = {"step": i, "widths": {g: new_widths[g] for g in ratios}}
    if eval_data is not None:
      entry["accuracy_pruned"] = train.evaluate(module, current, eval_data, mesh)
    if epochs:
      current, entry["epochs"] = train.fit(module, current, train_data, epochs=epochs, optimizer=optimizer, mesh=mesh,
                                           eval_data=eval_data, progress=progress, batch_size=batch_size,
                                           seed=seed + i, augment=augment, desc=f"{method} step {i}/{steps}")
    entry["seconds"] = time.perf_counter() - t0
    history.append(entry)
  return PruneResult(jax.device_get(current), module, spec, group_widths(current, spec), history)


def _sample(images, labels, count: int, batch_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """``count`` batches drawn at random without replacement (training sets are often sorted by class)."""
  idx = np.random.default_rng(seed).permutation(len(images))[:count * batch_size]
  return [(images[np.sort(j)], labels[np.sort(j)]) for j in np.array_split(idx, max(1, -(-len(idx) // batch_size)))]
