"""The paper's analyses (§5, App. C): output preservation, the loss-landscape plane, accuracy against sparsity.

The functions without ``plot_`` compute NumPy arrays from models and data; the ``plot_`` functions draw
them and return a :class:`matplotlib.figure.Figure` (matplotlib is imported only when one is called, so
``import ifjax`` does not load it; install it with ``pip install "ifjax[demo]"``).

``apply_fn(variables, x) -> logits`` is a model's forward pass in evaluation mode, e.g.
``lambda v, x: module.apply(v, x, train=False)``; ``x`` is (N, ...) preprocessed inputs, ``y`` (N,) int labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ifjax._fuse import GroupPlan, GroupSelection, Plan, Ratio, apply_plan, plan
from ifjax._spec import Spec, Variables

ApplyFn = Callable[[Any, jax.Array], jax.Array]
METHODS = {"default": {"method": "default"}, "IF": {}}


# -- output preservation (digest §4.4, the paper's Fig. 5 and 8-14) ----------------------------------
def logits(apply_fn: ApplyFn, variables: Variables, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
  """(N, C) outputs of ``apply_fn`` on ``x`` (N, ...), computed in batches of ``batch_size``."""
  f = jax.jit(apply_fn)
  return np.concatenate([np.asarray(f(variables, x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def output_distances(reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
  """(N,) ℓ2 distance per sample between two (N, C) output arrays (e.g. pruned and original logits)."""
  reference, outputs = np.asarray(reference, np.float64), np.asarray(outputs, np.float64)
  if reference.shape != outputs.shape or reference.ndim != 2:
    raise ValueError(f"outputs must be two (N, C) arrays of one shape, got {reference.shape} and {outputs.shape}")
  return np.linalg.norm(outputs - reference, axis=1)


def output_preservation(apply_fn: ApplyFn, variables: Variables, spec: Spec, ratios: Iterable[float],
                        x: np.ndarray, *, groups: GroupSelection = None, importance: Any = "l1",
                        methods: Mapping[str, Mapping[str, Any]] | None = None,
                        batch_size: int = 500) -> dict[tuple[str, float], np.ndarray]:
  """How far each pruning method moves the outputs: ``{(method, ratio): (N,) ℓ2 distances}`` between the
  pruned and the original logits on ``x`` (the paper's Fig. 5 prunes group 0 at 10, 20 and 30%).

  ``methods`` maps a label to keyword arguments of :func:`ifjax.plan` (default: ``{"default": {"method":
  "default"}, "IF": {}}``). The pruned models are ``apply_plan(..., keep_shapes=True)``, so ``apply_fn`` of the
  full-size model evaluates them all.
  """
  methods = METHODS if methods is None else methods
  reference = logits(apply_fn, variables, x, batch_size=batch_size)
  out = {}
  for r in ratios:
    for label, options in methods.items():
      pl = plan(variables, spec, r, groups=groups, importance=importance, **options)
      pruned = logits(apply_fn, apply_plan(variables, spec, pl, keep_shapes=True), x, batch_size=batch_size)
      out[label, float(r)] = output_distances(reference, pruned)
  return out


# -- the loss-landscape plane (digest §4.4, the paper's Fig. 6 and 15-18; Garipov et al. 2018) -------
class Plane(NamedTuple):
  """Loss and accuracy of the models ``w0 + u·e1 + v·e2`` on a grid of the plane through three parameter sets.

  Attributes:
    u: (A,) coordinates along ``e1``, the unit vector from anchor 0 to anchor 1.
    v: (B,) coordinates along ``e2``, the unit vector orthogonal to ``e1`` towards anchor 2.
    loss: (B, A) mean cross-entropy of the model at ``(u[j], v[i])`` in ``loss[i, j]``.
    accuracy: (B, A) accuracy in percent, same layout.
    anchors: (3, 2) the ``(u, v)`` of the three parameter sets: ``(0, 0)``, ``(|w1 - w0|, 0)``, ``(., > 0)``.
    anchor_loss: (3,) loss of the plane's models at the anchors' coordinates.
    anchor_accuracy: (3,) their accuracy (%).
    labels: the three anchors' names.
  """

  u: np.ndarray
  v: np.ndarray
  loss: np.ndarray
  accuracy: np.ndarray
  anchors: np.ndarray
  anchor_loss: np.ndarray
  anchor_accuracy: np.ndarray
  labels: tuple[str, str, str]


def plane_basis(w0: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Garipov's basis of the plane through three (D,) vectors: ``(e1, e2, anchors)``.

  ``e1 = (w1 - w0) / |w1 - w0|``; ``e2`` is ``w2 - w0`` minus its ``e1`` part, normalised; ``anchors`` (3, 2)
  are the coordinates of ``w0, w1, w2``, so ``w_k = w0 + anchors[k, 0]·e1 + anchors[k, 1]·e2``. Computed in
  float64.
  """
  w0, w1, w2 = (np.asarray(w, np.float64) for w in (w0, w1, w2))
  d1, d2 = w1 - w0, w2 - w0
  n1 = np.linalg.norm(d1)
  if n1 == 0:
    raise ValueError("anchors 0 and 1 are the same point: the plane is not defined")
  e1 = d1 / n1
  along = d2 @ e1
  r = d2 - along * e1
  n2 = np.linalg.norm(r)
  if n2 <= 1e-9 * max(n1, np.linalg.norm(d2)):
    raise ValueError("the three anchors are collinear: the plane is not defined")
  return e1, r / n2, np.array([[0.0, 0.0], [n1, 0.0], [along, n2]])


def plane_grid(anchors: np.ndarray, size: int | tuple[int, int] = 11,
               margin: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """``(u (A,), v (B,))``: evenly spaced coordinates covering the anchors' (3, 2) bounding box plus ``margin``
  of its width and height on every side; ``size`` is A = B, or ``(A, B)``."""
  a, b = (size, size) if isinstance(size, int) else size
  if a < 2 or b < 2:
    raise ValueError(f"the grid needs at least 2 points per axis, got size {size!r}")
  lo, hi = anchors.min(0), anchors.max(0)
  pad = margin * (hi - lo)
  return np.linspace(lo[0] - pad[0], hi[0] + pad[0], a), np.linspace(lo[1] - pad[1], hi[1] + pad[1], b)


def loss_plane(apply_fn: ApplyFn, anchors: Sequence[Variables], x: np.ndarray, y: np.ndarray, *,
               size: int | tuple[int, int] = 11, margin: float = 0.2, batch_size: int = 500,
               labels: Sequence[str] = ("original", "default", "IF")) -> Plane:
  """Loss and accuracy on a grid of the plane through three variables of one structure (see :class:`Plane`).

  Only the ``"params"`` collection moves on the plane; the other collections (``batch_stats``) are anchor
  0's. For the triple of :func:`pruned_triplet`, whose BNs are folded into identities, that is exact at all
  three anchors. Each grid point costs one evaluation over ``x``; the model is compiled once per batch shape.
  """
  if len(anchors) != 3 or len(labels) != 3:
    raise ValueError(f"a plane needs 3 anchors and 3 labels, got {len(anchors)} and {len(labels)}")
  flat0, unravel = ravel_pytree(anchors[0]["params"])
  vecs = [np.asarray(flat0)]
  for k, v in enumerate(anchors[1:], 1):
    flat, _ = ravel_pytree(v["params"])
    if flat.shape != flat0.shape or jax.tree.structure(v["params"]) != jax.tree.structure(anchors[0]["params"]):
      raise ValueError(f"anchor {k} ({labels[k]!r}) has another params structure or size ({flat.shape[0]} values) "
                       f"than anchor 0 ({flat0.shape[0]}); use apply_plan(..., keep_shapes=True) outputs")
    vecs.append(np.asarray(flat))
  e1, e2, coords = plane_basis(*vecs)
  rest = {k: v for k, v in anchors[0].items() if k != "params"}
  w0, e1, e2 = (jnp.asarray(w, jnp.float32) for w in (vecs[0], e1, e2))

  @jax.jit
  def sums(w0, e1, e2, a, b, xb, yb):  # (summed loss, correct predictions) of one batch at (a, b)
    params = unravel(w0 + a * e1 + b * e2)
    out = apply_fn({**rest, "params": params}, xb)
    loss = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), yb)
    return jnp.sum(loss), jnp.sum(jnp.argmax(out, -1) == yb)

  def evaluate(a: float, b: float) -> tuple[float, float]:
    total, hits = 0.0, 0
    for i in range(0, len(x), batch_size):
      s, h = sums(w0, e1, e2, a, b, x[i:i + batch_size], y[i:i + batch_size])
      total, hits = total + float(s), hits + int(h)
    return total / len(y), 100.0 * hits / len(y)

  u, v = plane_grid(coords, size, margin)
  grid = np.array([[evaluate(a, b) for a in u] for b in v])
  at_anchors = np.array([evaluate(a, b) for a, b in coords])
  return Plane(u, v, grid[..., 0], grid[..., 1], coords, at_anchors[:, 0], at_anchors[:, 1],
               cast("tuple[str, str, str]", tuple(labels)))  # three, checked above


def aligned_original(variables: Variables, spec: Spec, pl: Plan) -> dict:
  """The original model in the coordinates of ``apply_plan(variables, spec, pl, keep_shapes=True)``.

  That output puts each group's m kept (or fused) neurons first, in ``keep`` order; this returns the
  unpruned model (BNs folded, as ``apply_plan`` returns them) with each planned group's neurons permuted
  the same way: the kept ones first, then the dropped ones. It computes the original function.
  """
  perms = {}
  for name, gp in pl.items():
    if gp.keep is None:
      raise ValueError(f"group {name!r}: the plan has no keep indices (target='cluster_centroid'), so its fused "
                       "neurons do not sit at neuron positions; align with a most_important plan")
    keep = np.asarray(gp.keep)
    order = np.concatenate([keep, np.setdiff1d(np.arange(len(gp.importance)), keep)]).astype(np.int32)
    perms[name] = GroupPlan(order, gp.importance, None, None, None, np.asarray(True), np.float32(0), np.int32(0))
  return apply_plan(variables, spec, perms)


def pruned_triplet(variables: Variables, spec: Spec, ratio: Ratio, *, groups: GroupSelection = None,
                   importance: Any = "l1", **options) -> tuple[dict, dict, dict]:
  """``(original, default-pruned, Intra-Fused)`` variables in one parameter space, for :func:`loss_plane`.

  The pruned models are ``apply_plan(..., keep_shapes=True)`` (dropped neurons zeroed, full shapes); the
  original is :func:`aligned_original`, so neuron j of every group is the same neuron in all three (IF's
  fused neuron j stands for kept neuron j). ``options`` go to :func:`ifjax.plan` for IF only.
  """
  default = plan(variables, spec, ratio, groups=groups, importance=importance, method="default")
  fused = plan(variables, spec, ratio, groups=groups, importance=importance, **options)
  for name, gp in fused.items():
    if gp.keep is None or not np.array_equal(np.asarray(gp.keep), np.asarray(default[name].keep)):
      raise ValueError(f"group {name!r}: IF's targets are not default pruning's kept neurons; the triplet needs "
                       "target='most_important' and the same importance for both")
  return (aligned_original(variables, spec, default), apply_plan(variables, spec, default, keep_shapes=True),
          apply_plan(variables, spec, fused, keep_shapes=True))


# -- accuracy against sparsity per group (the paper's Fig. 3 and 4) --------------------------------
def accuracy_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """``{group label: {method: (sparsities (k,), accuracies (k,))}}`` from result rows, sorted by sparsity.

  A row has ``group``, ``sparsity``, ``method``, ``accuracy`` and optionally ``group_name`` (the CSV rows of
  ``experiments/data_free.py``); rows of method ``"dense"`` are skipped. Groups come in paper order (0
  first), then non-numeric groups such as ``"all"``. Two rows for one (group, method, sparsity) raise
  ValueError (filter the rows to one importance first).
  """
  cells: dict[str, dict[str, dict[float, float]]] = {}
  order: dict[str, tuple] = {}
  for r in rows:
    if r["method"] == "dense":
      continue
    group, name = str(r["group"]), str(r.get("group_name", "") or "")
    label = group if not name or name in (group, "all") else f"{group} ({name})"
    order.setdefault(label, (0, int(group)) if group.isdigit() else (1, len(order)))
    curve = cells.setdefault(label, {}).setdefault(str(r["method"]), {})
    s = float(r["sparsity"])
    if s in curve:
      raise ValueError(f"two rows for group {label!r}, method {r['method']!r}, sparsity {s}: "
                       "filter the rows to one importance (and one model) first")
    curve[s] = float(r["accuracy"])
  return {label: {m: (np.array(sorted(c)), np.array([c[s] for s in sorted(c)])) for m, c in cells[label].items()}
          for label in sorted(cells, key=order.__getitem__)}


# -- plots ------------------------------------------------------------------------------------------
def _figure(panels: int, cols: int, width: float, height: float):
  from matplotlib.figure import Figure  # lazily: `import ifjax` must not load matplotlib

  cols = max(1, min(cols, panels))
  rows = math.ceil(panels / cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[panels:]:
    ax.set_axis_off()
  return fig, axes[:panels]


def plot_output_distances(distances: Mapping[tuple[str, float], np.ndarray], *, bins: int = 40,
                          title: str | None = None):
  """Histograms of :func:`output_preservation`'s distances: one panel per ratio, one colour per method, the
  means in the legend (as the paper's Fig. 5)."""
  ratios = sorted({r for _, r in distances})
  methods = list(dict.fromkeys(m for m, _ in distances))
  fig, axes = _figure(len(ratios), len(ratios), 3.6, 2.8)
  for ax, r in zip(axes, ratios):
    data = [np.asarray(distances[m, r]) for m in methods if (m, r) in distances]
    edges = np.histogram_bin_edges(np.concatenate(data), bins=bins)
    for m in methods:
      if (m, r) in distances:
        d = np.asarray(distances[m, r])
        ax.hist(d, bins=edges, alpha=0.55, label=f"{m} (mean {d.mean():.2f})")
    ax.set_title(f"sparsity {r:g}", fontsize=9)
    ax.set_xlabel("ℓ2 distance to the original logits", fontsize=8)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("test samples", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def plot_plane(plane: Plane, *, title: str | None = None, levels: int = 20):
  """Two contour panels of a :class:`Plane`: loss (log colour scale) and accuracy, with the anchors marked
  and annotated with their values (as the paper's Fig. 6)."""
  from matplotlib.colors import LogNorm

  fig, axes = _figure(2, 2, 4.4, 3.6)
  for ax, values, what in ((axes[0], plane.loss, "loss"), (axes[1], plane.accuracy, "accuracy")):
    if what == "loss":
      lo, hi = max(float(values.min()), 1e-3), max(float(values.max()), float(values.min()) * 1.01, 2e-3)
      cs = ax.contourf(plane.u, plane.v, np.clip(values, lo, hi), levels=np.geomspace(lo, hi, levels),
                       norm=LogNorm(lo, hi), cmap="viridis_r")
    else:
      cs = ax.contourf(plane.u, plane.v, values, levels=np.linspace(0, 100, levels + 1), cmap="viridis")
    fig.colorbar(cs, ax=ax, label="test loss" if what == "loss" else "test accuracy (%)",
                 format="%.2g" if what == "loss" else "%.0f")
    at = plane.anchor_loss if what == "loss" else plane.anchor_accuracy
    for (a, b), name, val in zip(plane.anchors, plane.labels, at):
      ax.plot(a, b, "o", color="white", mec="black", ms=6)
      ax.annotate(f"{name}\n{val:.2f}" if what == "loss" else f"{name}\n{val:.1f}%", (a, b),
                  textcoords="offset points", xytext=(5, 5), fontsize=7, color="white",
                  bbox=dict(boxstyle="round,pad=0.2", fc="black", alpha=0.5, lw=0))
    ax.set_xlabel("u (along original → default)", fontsize=8)
    ax.set_ylabel("v", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def plot_accuracy_grid(rows: Iterable[Mapping[str, Any]], *, methods: Sequence[str] | None = None,
                       dense: float | None = None, cols: int = 6, title: str | None = None):
  """Accuracy against sparsity, one small panel per group (:func:`accuracy_curves`), one line per method;
  a dotted line at ``dense`` (default: the accuracy of a row of method ``"dense"``, if any)."""
  rows = list(rows)
  if dense is None:
    dense = next((float(r["accuracy"]) for r in rows if r["method"] == "dense"), None)
  curves = accuracy_curves(rows)
  if not curves:
    raise ValueError("no result rows to plot (only 'dense' rows, or none)")
  methods = list(methods) if methods is not None else list(dict.fromkeys(m for c in curves.values() for m in c))
  fig, axes = _figure(len(curves), cols, 2.5, 2.1)
  for ax, (label, curve) in zip(axes, curves.items()):
    for m in methods:
      if m in curve:
        ax.plot(*curve[m], marker="o", ms=2.5, lw=1.2, label=m)
    if dense is not None:
      ax.axhline(dense, color="gray", ls=":", lw=1)
    ax.set_title(label, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_ylim(0, 100)
  axes[0].legend(fontsize=6)
  fig.supxlabel("neuron sparsity of the pruned group (of every group in \"all\")", fontsize=8)
  fig.supylabel("test accuracy (%)", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig
