"""Split-Data (Section 6 of the paper): train models on parts of the data in parallel, then prune and fuse.

* :func:`folds` splits n examples into k disjoint, equal folds; :func:`subsets` lists the C(k, k/2)
  training sets (unions of k/2 folds, each half the data: k=2 gives two disjoint halves, k=4 six
  overlapping halves).
* :func:`split` also gives label-skewed folds (``skew=0.8``: 80/20 of each class, :func:`skewed_folds`) and
  overlapping training sets (``overlap=0.3``: 30% of the data shared by every model, 65% subsets for k=2).
* :func:`train_pinned` trains each model in its own process pinned to its own CPU cores (``os.sched_setaffinity``,
  single-threaded XLA per core): a real, measured Split-Data speed-up on a CPU (:mod:`ifjax._pinned`).
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
from ifjax._pinned import PinnedError, PinnedResult, core_sets, fit_job, run_pinned, train_pinned  # noqa: F401 (public)
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


def split(data: tuple[np.ndarray, np.ndarray], k: int = 2, seed: int = 0, drop_remainder: bool = False, *,
          skew: float | None = None, overlap: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(images, labels)`` -> one training set per model: the unions of k/2 of k folds (see :func:`subsets`).

  Args:
    data: ``(images, labels)`` arrays of equal length.
    k: the fold count (even; k=2 gives two halves, k=4 the six unions of two folds).
    seed: draws the folds (and the shared part); the same seed gives the same sets.
    drop_remainder: leave out the few examples that do not divide into k equal folds (IID folds only).
    skew: None (IID folds) or a fraction in ``[1/k, 1]``: class c (the c-th of the sorted labels) puts
      ``round(skew * n_c)`` of its ``n_c`` examples in fold ``c mod k`` and spreads the rest evenly over the other
      folds (k=2, ``skew=0.8``: 80/20 halves, alternating which half by class). Needs at least k classes
      (every fold is some class's major fold). Folds are disjoint and complete but need not be equal in size
      (they are when every class has the same count and k divides the number of classes).
    overlap: None or a fraction in ``(0, 1)`` of the data shared by every model: ``round(overlap * n)``
      random examples join every training set, and the other examples are folded as above. With k=2 each
      model sees ``overlap + (1 - overlap) / 2`` of the data: ``overlap=0.2`` gives 60% subsets, ``0.3`` 65%,
      ``0.4`` 70%.

  Returns:
    One ``(images, labels)`` pair per model (C(k, k/2) of them), each in the data's original order.

  >>> x, y = np.arange(40), np.arange(40) % 2
  >>> [np.bincount(ly).tolist() for _, ly in split((x, y), 2, skew=0.8)]
  [[16, 4], [4, 16]]
  >>> [len(ly) for _, ly in split((x, y), 2, overlap=0.3)]
  [26, 26]
  """
  images, labels = data
  if len(images) != len(labels):
    raise SplitDataError(f"{len(images)} images but {len(labels)} labels")
  k = _fold_count(k, "split")
  sets = subsets(k)
  n = len(images)
  rng = np.random.default_rng(seed)
  shared = np.zeros(0, np.int64)
  rest = np.arange(n)
  if skew is None and overlap is None:
    parts = folds(n, k, seed, drop_remainder)  # the same folds as before skew / overlap existed
  elif overlap is not None:
    if not 0.0 < float(overlap) < 1.0:
      raise SplitDataError(f"split: overlap is the fraction of the data every model shares, in (0, 1), got "
                           f"{overlap!r}")
    perm = rng.permutation(n)
    shared, rest = np.sort(perm[:round(float(overlap) * n)]), np.sort(perm[round(float(overlap) * n):])
  if skew is None and overlap is None:
    pass
  elif skew is None:
    parts = [rest[f] for f in folds(len(rest), k, int(rng.integers(2**31)), drop_remainder)]
  else:
    parts = [rest[f] for f in skewed_folds(np.asarray(labels)[rest], k, skew, int(rng.integers(2**31)))]
  out = []
  for s in sets:
    idx = np.sort(np.concatenate([shared] + [parts[i] for i in s]))
    out.append((images[idx], labels[idx]))
  return out


def skewed_folds(labels, k: int, skew: float, seed: int = 0) -> list[np.ndarray]:
  """k disjoint folds of ``range(len(labels))`` covering it, label-skewed: the c-th class (sorted labels) puts
  ``round(skew * n_c)`` examples in fold ``c mod k`` and the rest, as evenly as possible, in the others (see
  :func:`split`).

  >>> [f.tolist() for f in skewed_folds(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 2, 0.75)]
  [[0, 1, 2, 4], [3, 5, 6, 7]]
  """
  k = _fold_count(k, "skewed_folds")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise SplitDataError(f"skewed_folds: labels must be one class index per example, got shape {labels.shape}")
  skew = float(skew)
  if not 1.0 / k <= skew <= 1.0:
    raise SplitDataError(f"skewed_folds: skew is the share of each class in its major fold, in [1/k, 1] = "
                         f"[{1.0 / k:.3g}, 1] for k={k}, got {skew!r}")
  classes = np.unique(labels)
  if len(classes) < k:
    raise SplitDataError(f"a skewed split into k={k} folds needs at least {k} classes (one major class per fold), "
                         f"but the labels hold {len(classes)}: {classes.tolist()}")
  rng = np.random.default_rng(seed)
  parts: list[list[np.ndarray]] = [[] for _ in range(k)]
  for j, c in enumerate(classes):
    idx = rng.permutation(np.flatnonzero(labels == c))
    major = j % k
    n_major = round(skew * len(idx))
    parts[major].append(idx[:n_major])
    others = [(major + 1 + i) % k for i in range(k - 1)]
    others = others[j % (k - 1):] + others[:j % (k - 1)]  # rotate who gets the remainder
    for fold, chunk in zip(others, np.array_split(idx[n_major:], k - 1)):
      parts[fold].append(chunk)
  return [np.sort(np.concatenate(p)) for p in parts]


def check_equal(datasets: Sequence, who: str = "train_models") -> int:
  """The common size of ``datasets`` (``(images, labels)`` pairs); ``SplitDataError`` when they differ."""
  sizes = [len(d[1]) for d in datasets]
  if len(set(sizes)) > 1:
    raise SplitDataError(f"{who}: the training sets must be equal in size (one program steps every model in "
                         f"lockstep), got sizes {sizes}; use split(..., drop_remainder=True), balanced classes for a "
                         f"skewed split, or ifjax.split_data.train_pinned (one process per model)")
  return sizes[0] if sizes else 0


def train_models(module, variables: Sequence[Mapping[str, Any]], datasets: Sequence, *, epochs: int, optimizer,
                 mesh=None, **fit_options) -> tuple[list[dict], list[dict], float]:
  """Trains model i on ``datasets[i]``, all at once (one program, a model axis). With a ``("models",
  "data")`` mesh the models sit on disjoint device sets. Returns ``(variables, history, seconds)``.

  The training sets must be equal in size, and the mesh's ``models`` axis (if any) must give every model
  its own devices (``SplitDataError`` otherwise).
  """
  if all(isinstance(d, (tuple, list)) and len(d) == 2 for d in datasets):
    check_equal(datasets)
  if mesh is not None and "models" in mesh.axis_names and len(datasets) > mesh.shape["models"]:
    raise SplitDataError(f"train_models: {len(datasets)} models but the mesh's 'models' axis has "
                         f"{mesh.shape['models']} device groups ({mesh.devices.size} devices): every model needs "
                         f"its own devices")
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
                   seed: int = 0, after_prune_epochs: int = 0, pruned=None, **options) -> SplitResult:
  """PaF: each model is pruned (``steps`` x ``prune_epochs`` epochs on the whole data, then
  ``after_prune_epochs`` more: the paper fine-tunes after the iterative pruning and after fusion), the pruned
  models are fused with OT, and the result is fine-tuned ``finetune_epochs`` epochs.

  ``pruned``: the models' :class:`ifjax.finetune.PruneResult` when already pruned elsewhere (e.g. each in its
  own process, :func:`run_pinned`); ``seconds["prune"]`` is then 0 and the caller times that phase.
  """
  seconds, history = {}, {}
  t0 = time.perf_counter()
  if pruned is None:
    pruned = [prune_one(model, v, ratio, train_data, steps=steps, prune_epochs=prune_epochs,
                        after_prune_epochs=after_prune_epochs, method=method, eval_data=eval_data, mesh=mesh,
                        seed=seed + 100 * i, **options)
              for i, v in enumerate(models)]
  for i, r in enumerate(pruned):
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
                   seed: int = 0, after_prune_epochs: int = 0, **options) -> SplitResult:
  """FaP: the models are fused with OT and fine-tuned ``finetune_epochs`` epochs on the whole data, then
  pruned (``steps`` x ``prune_epochs`` epochs, then ``after_prune_epochs`` more)."""
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
                                  epochs_per_step=prune_epochs, finetune_epochs=after_prune_epochs,
                                  eval_data=eval_data, mesh=mesh, seed=seed, **options)
  seconds["prune"] = time.perf_counter() - t0
  history["prune"] = r.history
  return SplitResult(r.variables, r.widths, _evaluate(r.module, r.variables, eval_data, mesh), seconds, history)


def prune_one(model: finetune.Model, variables: Mapping[str, Any], ratio, train_data, *, steps: int,
              prune_epochs: int, after_prune_epochs: int = 0, method: str = "if", mesh=None, seed: int = 0,
              **options) -> finetune.PruneResult:
  """PaF's per-model step: ``variables`` pruned in ``steps`` x ``prune_epochs`` epochs on the whole data, then
  fine-tuned ``after_prune_epochs`` more (a top-level function, so :func:`run_pinned` can run it per model)."""
  return finetune.prune_and_finetune(model, variables, ratio, train_data, method=method, steps=steps,
                                     epochs_per_step=prune_epochs, finetune_epochs=after_prune_epochs, mesh=mesh,
                                     seed=seed, **options)


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
