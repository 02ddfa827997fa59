"""Split-Data (Section 6 of the paper): train models on parts of the data in parallel, then prune and fuse.

* :func:`folds` splits n examples into k disjoint, equal folds; :func:`subsets` lists the C(k, k/2)
  training sets (unions of k/2 folds, each half the data: k=2 gives two disjoint halves, k=4 six
  overlapping halves).
* :func:`train_models` trains one model per training set side by side with a model axis
  (:func:`ifjax.train.fit_many`): on a ``("models", "data")`` mesh each model has its own devices and
  no gradient crosses between models; weights meet only once, at fusion.
* :func:`prune_and_fuse` (PaF): prune every model with Intra-Fusion and fine-tune it on the whole data,
  fuse the pruned models with OT, fine-tune. :func:`fuse_and_prune` (FaP): fuse, fine-tune, prune,
  fine-tune. :func:`whole_data`: the baseline, one model on all data, pruned and fine-tuned for the same
  total epochs.

Every pipeline returns a :class:`SplitResult` with the wall time of each phase.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ifjax import finetune, train
from ifjax._errors import IfjaxError
from ifjax._modelfusion import fuse_models
from ifjax._scalars import python_scalar


class SplitResult(NamedTuple):
  """Attributes: ``variables`` (final), ``widths``, ``accuracy`` (on the eval data, None without),
  ``seconds`` ``{phase: wall seconds}``, ``history`` ``{phase: history}``."""

  variables: dict
  widths: dict[str, int]
  accuracy: float | None
  seconds: dict[str, float]
  history: dict[str, Any]


class SplitDataError(IfjaxError, ValueError):
  """Bad Split-Data input: a fold count that does not divide the data, an odd k, ..."""


def folds(n: int, k: int, seed: int = 0, drop_remainder: bool = False) -> list[np.ndarray]:
  """k disjoint folds of ``range(n)``, equal in size, drawn at random with ``seed`` (sorted indices).

  >>> [f.tolist() for f in folds(6, 2, seed=0)]
  [[2, 3, 5], [0, 1, 4]]
  """
  n = python_scalar(n, "iu", "folds: n")
  if isinstance(n, bool) or not isinstance(n, int):
    raise TypeError(f"folds: n (the number of examples) must be an int, got {type(n).__name__} {n!r:.80}")
  k = _fold_count(k, "folds")
  if n < k:
    raise SplitDataError(f"cannot split {n} examples into {k} folds")
  if n % k and not drop_remainder:
    raise SplitDataError(f"{k} folds do not divide {n} examples ({n % k} left over); pass drop_remainder=True to "
                         f"leave {n % k} random examples out")
  order = np.random.default_rng(seed).permutation(n)[:n - n % k]
  return [np.sort(f) for f in np.split(order, k)]


def _fold_count(k, who: str) -> int:
  """The fold count ``k`` as a Python int >= 2 (NumPy / JAX integer scalars accepted)."""
  k = python_scalar(k, "iu", f"{who}: k")
  if isinstance(k, bool) or not isinstance(k, int):
    raise TypeError(f"{who}: the fold count k must be an int >= 2, got {type(k).__name__} {k!r:.80}")
  if k < 2:
    raise SplitDataError(f"{who}: the fold count k must be an int >= 2, got {k!r}")
  return k


def subsets(k: int) -> list[tuple[int, ...]]:
  """The training sets of k-fold Split-Data: every union of k/2 of the k folds (C(k, k/2) of them).

  >>> subsets(2), len(subsets(4))
  ([(0,), (1,)], 6)
  """
  k = _fold_count(k, "subsets")
  if k % 2:
    raise SplitDataError(f"k-fold Split-Data needs an even k >= 2 (each model sees k/2 folds), got {k!r}")
  return list(itertools.combinations(range(k), k // 2))


def split(data: tuple[np.ndarray, np.ndarray], k: int = 2, seed: int = 0,
          drop_remainder: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(images, labels)`` -> one training set per model (see :func:`subsets`)."""
  images, labels = data
  if len(images) != len(labels):
    raise SplitDataError(f"{len(images)} images but {len(labels)} labels")
  parts = folds(len(images), k, seed, drop_remainder)
  out = []
  for s in subsets(k):
    idx = np.sort(np.concatenate([parts[i] for i in s]))
    out.append((images[idx], labels[idx]))
  return out


def train_models(module, variables: Sequence[Mapping[str, Any]], datasets: Sequence, *, epochs: int, optimizer,
                 mesh=None, **fit_options) -> tuple[list[dict], list[dict], float]:
  """Trains model i on ``datasets[i]``, all at once (one program, a model axis). With a ``("models",
  "data")`` mesh the models sit on disjoint device sets. Returns ``(variables, history, seconds)``."""
  t0 = time.perf_counter()
  out, history = train.fit_many(module, variables, datasets, epochs=epochs, optimizer=optimizer, mesh=mesh,
                                **fit_options)
  return out, history, time.perf_counter() - t0


def _fuse(spec, module, models: Sequence[Mapping[str, Any]], fusion: str, samples: np.ndarray | None):
  if fusion == "activations":
    return fuse_models(list(models), spec, mode="activations", apply_fn=module.apply, batches=[samples],
                       unfold_bn=True)
  return fuse_models(list(models), spec, mode="weights", unfold_bn=True)


def _evaluate(module, variables, eval_data, mesh):
  return None if eval_data is None else train.evaluate(module, variables, eval_data, mesh)


def prune_and_fuse(model: finetune.Model, models: Sequence[Mapping[str, Any]], ratio, train_data, *,
                   prune_epochs: int, finetune_epochs: int, steps: int = 1, method: str = "if",
                   fusion: str = "activations", fusion_samples: int = 200, eval_data=None, mesh=None,
                   seed: int = 0, **options) -> SplitResult:
  """PaF: each model is pruned (``steps`` x ``prune_epochs`` epochs on the whole data), the pruned
  models are fused with OT, and the result is fine-tuned ``finetune_epochs`` epochs."""
  seconds, history, pruned = {}, {}, []
  t0 = time.perf_counter()
  for i, v in enumerate(models):
    r = finetune.prune_and_finetune(model, v, ratio, train_data, method=method, steps=steps,
                                    epochs_per_step=prune_epochs, mesh=mesh, seed=seed + 100 * i, **options)
    pruned.append(r)
    history[f"prune_{i}"] = r.history
  seconds["prune"] = time.perf_counter() - t0
  module, spec = pruned[0].module, pruned[0].spec
  if any(r.widths != pruned[0].widths for r in pruned):
    raise SplitDataError("the pruned models have different widths and cannot be fused")
  t0 = time.perf_counter()
  fused = _fuse(spec, module, [r.variables for r in pruned], fusion, _samples(train_data, fusion_samples, seed))
  seconds["fuse"] = time.perf_counter() - t0
  history["fused_accuracy"] = _evaluate(module, fused, eval_data, mesh)
  t0 = time.perf_counter()
  fused, history["finetune"] = _fit(module, fused, train_data, finetune_epochs, eval_data, mesh, seed, options)
  seconds["finetune"] = time.perf_counter() - t0
  return SplitResult(fused, pruned[0].widths, _evaluate(module, fused, eval_data, mesh), seconds, history)


def fuse_and_prune(model: finetune.Model, models: Sequence[Mapping[str, Any]], ratio, train_data, *,
                   prune_epochs: int, finetune_epochs: int, steps: int = 1, method: str = "if",
                   fusion: str = "activations", fusion_samples: int = 200, eval_data=None, mesh=None,
                   seed: int = 0, **options) -> SplitResult:
  """FaP: the models are fused with OT and fine-tuned ``finetune_epochs`` epochs on the whole data, then
  pruned (``steps`` x ``prune_epochs`` epochs)."""
  build = finetune.model_builder(model)
  module, spec = build({})
  seconds, history = {}, {}
  t0 = time.perf_counter()
  fused = _fuse(spec, module, models, fusion, _samples(train_data, fusion_samples, seed))
  seconds["fuse"] = time.perf_counter() - t0
  history["fused_accuracy"] = _evaluate(module, fused, eval_data, mesh)
  t0 = time.perf_counter()
  fused, history["finetune"] = _fit(module, fused, train_data, finetune_epochs, eval_data, mesh, seed, options)
  seconds["finetune"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  r = finetune.prune_and_finetune(model, fused, ratio, train_data, method=method, steps=steps,
                                  epochs_per_step=prune_epochs, eval_data=eval_data, mesh=mesh, seed=seed, **options)
  seconds["prune"] = time.perf_counter() - t0
  history["prune"] = r.history
  return SplitResult(r.variables, r.widths, _evaluate(r.module, r.variables, eval_data, mesh), seconds, history)


def whole_data(model: finetune.Model, variables: Mapping[str, Any], ratio, train_data, *, prune_epochs: int,
               finetune_epochs: int, steps: int = 1, method: str = "if", eval_data=None, mesh=None, seed: int = 0,
               **options) -> SplitResult:
  """The baseline: ``variables`` (trained on all data) pruned in ``steps`` x ``prune_epochs`` epochs, then
  fine-tuned ``finetune_epochs`` epochs (pass twice the PaF/FaP value for the same total, as the paper)."""
  t0 = time.perf_counter()
  r = finetune.prune_and_finetune(model, variables, ratio, train_data, method=method, steps=steps,
                                  epochs_per_step=prune_epochs, finetune_epochs=finetune_epochs, eval_data=eval_data,
                                  mesh=mesh, seed=seed, **options)
  seconds = {"prune": time.perf_counter() - t0}
  return SplitResult(r.variables, r.widths, _evaluate(r.module, r.variables, eval_data, mesh), seconds,
                     {"prune": r.history})


def _fit(module, variables, train_data, epochs: int, eval_data, mesh, seed: int, options: Mapping[str, Any]):
  if not epochs:
    return variables, []
  keep = {k: options[k] for k in ("optimizer", "batch_size", "augment", "progress") if k in options}
  keep.setdefault("optimizer", lambda s: train.paper_sgd("finetune", s))
  return train.fit(module, variables, train_data, epochs=epochs, eval_data=eval_data, mesh=mesh, seed=seed + 7,
                   desc="fine-tune fused", **keep)


def _samples(train_data, count: int, seed: int) -> np.ndarray:
  """``count`` random training images: the activations of activation-based fusion (the paper uses 200)."""
  images = train_data[0]
  return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:count])]
