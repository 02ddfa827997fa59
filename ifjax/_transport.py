"""Ground cost between neurons and the OT solvers that turn it into a transport map.

Shapes: ``n`` source neurons, ``m`` targets, ``d`` features per neuron.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._spec import array_module

# n * m * d at or below which the cost is computed with NumPy on the host (no XLA compilation); above it,
# one compiled tiled kernel per shape.
_HOST_COST_ELEMENTS = 1 << 22
# The compiled p-norm cost: (rows of x, rows of y) per tile; features per step (one elementwise loop over the tile,
# summed as a pairwise tree) and steps per block (summed in order, then added to the total): 256 features a block.
_TILE_ROWS, _TILE_COLS, _STEP_FEATURES, _BLOCK_STEPS = 256, 256, 16, 16
# Kept neurons from which the compiled cost computes their symmetric block once (below, the saving does not pay
# for the second compiled loop).
_SYMMETRIC_MIN_KEPT = 512
# m * m * d from which the host cost computes the kept block with pdist (below, pdist's overhead is larger).
_HOST_SYMMETRIC_MIN_ELEMENTS = 1 << 19


class Transport(NamedTuple):
  """An OT plan and its diagnostics.

  Attributes:
    matrix: (n, m) plan with row sums ~ source mass and column sums ~ target mass.
    converged: () bool. Always True for the exact solver unless the LP failed.
    marginal_error: () float, max absolute violation of either marginal.
    iterations: () int, Sinkhorn iterations (0 for the exact solver).
  """

  matrix: jax.Array
  converged: jax.Array
  marginal_error: jax.Array
  iterations: jax.Array


def check_p(p) -> float:
  """``p`` of the p-norm cost as a float; ValueError unless it is a real number with 0 < p <= inf."""
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= math.inf:
    raise ValueError(f"p must be a number with 0 < p <= inf (the cost is the distance ||x - y||_p; p = inf: the "
                     f"largest difference), got {p!r}")
  return float(p)


def check_sinkhorn(epsilon, threshold, max_iterations) -> None:
  """ValueError unless ``epsilon`` and ``threshold`` are finite and > 0 and ``max_iterations`` is a positive int.

  A negative epsilon would make Sinkhorn maximise the cost (and still report convergence); zero divides by zero.
  """
  for name, v in (("epsilon", epsilon), ("threshold", threshold)):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
      raise ValueError(f"Sinkhorn {name} must be a finite number > 0, got {v!r}")
  if isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral) or max_iterations < 1:
    raise ValueError(f"Sinkhorn max_iterations must be a positive int, got {max_iterations!r}")


def normalize_rows(x: jax.Array) -> jax.Array:
  """(n, d) -> rows divided by their L2 norm; an all-zero row stays zero (no NaN). NumPy in, NumPy out."""
  xp = array_module(x)
  norm = xp.linalg.norm(x, axis=-1, keepdims=True)
  return x / xp.where(norm > 0, norm, xp.asarray(1.0, x.dtype))


def pairwise_distance(x: jax.Array, y: jax.Array, p: float = 1.0) -> jax.Array:
  """(n, d), (m, d) -> (n, m) p-norm distances ``||x_i - y_j||_p`` (``torch.cdist``), float32.

  Evaluated from differences, so identical rows are exactly 0 apart for every p, and never as an
  (n, m, d) array: SciPy's ``cdist`` on the host for small NumPy inputs (n * m * d <= 2^22, no
  compilation), else one jit-compiled kernel over (256 x 256) tiles, vectorised along the columns, 16
  features per step (jit-able).
  ``p``: 0 < p <= inf.
  """
  p = check_p(p)
  if array_module(x, y) is np:
    return np.asarray(host_distance(x, y, p))
  return _pairwise_tiled(x, y, p=float(p))


def host_distance(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray | jax.Array:
  """:func:`pairwise_distance` of NumPy inputs without waiting for the compiled kernel: a NumPy array, or
  a jax array still being computed (``np.asarray`` waits for it), so the host can go on meanwhile, e.g.
  solve the OT problem of an earlier group. ``p`` checked by the caller."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  if x.shape[0] * y.shape[0] * x.shape[1] <= _HOST_COST_ELEMENTS:
    return _pairwise_host(x, y, float(p))
  return _pairwise_tiled(x, y, p=float(p))


def kept_distance(x: np.ndarray, keep: np.ndarray, p: float) -> np.ndarray | jax.Array:
  """(n, d) NumPy rows, (m,) distinct kept row indices -> (n, m) ``host_distance(x, x[keep], p)``, bit for bit
  (a jax array still being computed for large inputs). The (m, m) block among the kept rows is symmetric and
  computed once where that pays, which saves up to a quarter of the work: SciPy's ``pdist`` on the host, upper-
  triangle tile pairs in the compiled kernel (from ``_SYMMETRIC_MIN_KEPT`` kept rows). Every entry is summed in
  the order :func:`pairwise_distance` sums it. ``p`` checked by the caller."""
  x = np.asarray(x, np.float32)
  n, d = x.shape
  y = x[keep]
  m = y.shape[0]
  mask = np.ones(n, bool)
  mask[keep] = False
  drop = np.flatnonzero(mask)
  if n * m * d > _HOST_COST_ELEMENTS:
    if m < _SYMMETRIC_MIN_KEPT:
      return _pairwise_tiled(x, y, p=float(p))
    return _kept_tiled(x, np.asarray(keep, np.int32), drop.astype(np.int32), p=float(p))
  if m * m * d < _HOST_SYMMETRIC_MIN_ELEMENTS:
    return _pairwise_host(x, y, float(p))
  from scipy.spatial.distance import pdist, squareform

  out = np.empty((n, m), np.float32)
  out[drop] = _pairwise_host(x[drop], y, float(p))
  metric, kw = _scipy_metric(float(p))
  out[keep] = squareform(pdist(y, metric, **kw)).astype(np.float32)
  return out


def _scipy_metric(p: float) -> tuple[str, dict]:
  return {1.0: ("cityblock", {}), 2.0: ("euclidean", {}), math.inf: ("chebyshev", {})}.get(p, ("minkowski", {"p": p}))


def _pairwise_host(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray:
  """SciPy's ``cdist`` (a C loop in float64, then rounded to float32)."""
  from scipy.spatial.distance import cdist

  metric, kw = _scipy_metric(p)
  return cdist(x, y, metric, **kw).astype(np.float32)


def _tiles(x: jax.Array, size: int) -> jax.Array:
  """(k, d) -> (tiles, blocks, steps, feats, size): the rows in tiles of ``size`` and each tile's features in
  blocks of ``_BLOCK_STEPS`` steps of ``_STEP_FEATURES``, zero-padded (zero rows are cropped from the result;
  zero features add |0 - 0| = 0), the rows of a tile last (the vectorised axis)."""
  k, d = x.shape
  x = jnp.pad(x, ((0, -k % size), (0, -d % (_STEP_FEATURES * _BLOCK_STEPS))))
  x = x.T.reshape(-1, _BLOCK_STEPS, _STEP_FEATURES, x.shape[0] // size, size)
  return jnp.moveaxis(x, 3, 0)


def _tile_distance(xb: jax.Array, yb: jax.Array, p: float) -> jax.Array:
  """(blocks, steps, feats, rows) and (blocks, steps, feats, cols) feature blocks -> (rows, cols) sums of
  ``|x - y|^p`` (max for p = inf). The summation order of every entry, whatever the tile: a pairwise tree over
  the features of a step, the steps of a block in order, then the blocks in order. Each step is one elementwise
  loop over the (rows, cols) tile, vectorised along the columns (no horizontal reductions)."""
  combine = jnp.maximum if math.isinf(p) else jnp.add

  def term(xs, ys):
    diff = jnp.abs(xs[:, None] - ys[None, :])
    return diff if p == 1 or math.isinf(p) else diff**p

  def step(part, xy):
    terms = [term(xs, ys) for xs, ys in zip(*xy)]
    while len(terms) > 1:
      terms = [combine(*terms[i:i + 2]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return combine(part, terms[0]), None

  def block(acc, xy):
    part, _ = jax.lax.scan(step, jnp.zeros_like(acc), xy)
    return combine(acc, part), None

  acc, _ = jax.lax.scan(block, jnp.zeros((xb.shape[-1], yb.shape[-1]), jnp.float32), (xb, yb))
  return acc


def _rows_distance(x: jax.Array, y: jax.Array, p: float) -> jax.Array:
  """(n, d), (m, d) -> (n, m) sums (no root), in tiles of ``_TILE_ROWS`` x ``_TILE_COLS``."""
  (n, _), m = x.shape, y.shape[0]
  xt, yt = _tiles(x, min(_TILE_ROWS, n)), _tiles(y, min(_TILE_COLS, m))
  out = jax.lax.map(lambda a: jax.lax.map(lambda b: _tile_distance(a, b, p), yt), xt)  # (rt, ct, rows, cols)
  return out.transpose(0, 2, 1, 3).reshape(out.shape[0] * out.shape[2], -1)[:n, :m]


def _root(out: jax.Array, p: float) -> jax.Array:
  return out if p == 1 or math.isinf(p) else out ** (1.0 / p)


@functools.partial(jax.jit, static_argnames=("p",))
def _pairwise_tiled(x: jax.Array, y: jax.Array, p: float) -> jax.Array:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return _root(_rows_distance(x, y, p), p)


@functools.partial(jax.jit, static_argnames=("p",))
def _kept_tiled(x: jax.Array, keep: jax.Array, drop: jax.Array, p: float) -> jax.Array:
  """:func:`kept_distance`'s compiled kernel: the dropped rows against the kept ones as in
  :func:`_pairwise_tiled`, and the kept block from its upper-triangle (r, r) tile pairs (r = min(_TILE_COLS, m)),
  mirrored into the lower triangle."""
  n, _ = x.shape
  m, k = keep.shape[0], drop.shape[0]
  r = min(_TILE_COLS, m)
  t = -(-m // r)
  tiles = _tiles(x[keep], r)  # (t, blocks, steps, feats, r)
  ia, ib = np.triu_indices(t)
  pairs = jax.lax.map(lambda ij: _tile_distance(tiles[ij[0]], tiles[ij[1]], p), jnp.asarray(np.stack([ia, ib], 1)))
  block = jnp.zeros((t, t, r, r), jnp.float32).at[ia, ib].set(pairs).at[ib, ia].set(pairs.transpose(0, 2, 1))
  out = jnp.zeros((n, m), jnp.float32).at[keep].set(block.transpose(0, 2, 1, 3).reshape(t * r, t * r)[:m, :m])
  if k:
    out = out.at[drop].set(_rows_distance(x[drop], x[keep], p))
  return _root(out, p)


def _marginal_error(t, a, b):
  xp = array_module(t, a, b)
  return xp.maximum(xp.max(xp.abs(t.sum(1) - a)), xp.max(xp.abs(t.sum(0) - b)))


def solve_exact(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> Transport:
  """Exact EMD (POT's network simplex, ``ot.emd``), the authors' solver, in float64 on the host.

  Returns NumPy arrays (the plan as float32)."""
  import ot  # POT; imported lazily, it is only needed for the exact solver.

  cost, a, b = (np.asarray(v, np.float64) for v in (cost, a, b))
  a, b = a / a.sum(), b / b.sum()
  # a and b have equal sums, and the duals are not used: no marginal check, no centring of the duals
  t, log = ot.emd(a, b, cost, numItermax=max(100_000, 50 * cost.size), log=True, center_dual=False,
                  check_marginals=False)
  ok = log["result_code"] == 1
  return Transport(t.astype(np.float32), np.asarray(ok), np.float32(_marginal_error(t, a, b)), np.asarray(0))


@functools.partial(jax.jit, static_argnames=("threshold", "max_iterations"))
def _sinkhorn_batch(cost, a, b, epsilon, threshold, max_iterations):
  """Batched Sinkhorn: (k, n, m) costs, (k, n) and (k, m) masses -> Transport with a leading k axis."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)

  def one(c, a_, b_):
    scale = jnp.max(jnp.where((a_[:, None] > 0) & (b_[None, :] > 0), c, 0.0))
    geom = geometry.Geometry(cost_matrix=c / jnp.where(scale > 0, scale, 1.0), epsilon=epsilon)
    out = solver(linear_problem.LinearProblem(geom, a_, b_))
    t = out.matrix
    return Transport(t, out.converged, _marginal_error(t, a_, b_), out.n_iters)

  return jax.vmap(one)(cost, a, b)


def solve_sinkhorn(problems: Sequence[tuple[jax.Array, jax.Array, jax.Array]], *, epsilon: float = 1e-3,
                   threshold: float = 1e-3, max_iterations: int = 10000) -> list[Transport]:
  """Entropic OT (OTT-JAX Sinkhorn, jit-compiled) for many (cost, a, b) problems at once.

  Costs are divided by their maximum, so ``epsilon`` is relative to the largest
  cost. Problems are padded with zero-mass points to power-of-two buckets and
  each bucket is solved in one vmapped call (one compilation per bucket shape).
  """
  check_sinkhorn(epsilon, threshold, max_iterations)
  buckets: dict[tuple[int, int], list[int]] = {}
  for i, (c, _, _) in enumerate(problems):
    n, m = c.shape
    buckets.setdefault((_bucket(n), _bucket(m)), []).append(i)
  results: list[Transport | None] = [None] * len(problems)
  xp = array_module(*(v for pr in problems for v in pr))  # NumPy problems: pad on the host, NumPy results
  for (bn, bm), idx in buckets.items():
    cs, as_, bs = [], [], []
    for i in idx:
      c, a, b = problems[i]
      n, m = c.shape
      cs.append(xp.pad(xp.asarray(c, xp.float32), ((0, bn - n), (0, bm - m))))
      as_.append(xp.pad(xp.asarray(a, xp.float32) / xp.sum(a), (0, bn - n)))
      bs.append(xp.pad(xp.asarray(b, xp.float32) / xp.sum(b), (0, bm - m)))
    out = _sinkhorn_batch(xp.stack(cs), xp.stack(as_), xp.stack(bs), np.float32(epsilon),
                          threshold=float(threshold), max_iterations=int(max_iterations))
    if xp is np:
      out = Transport(*(np.asarray(f) for f in out))
    for k, i in enumerate(idx):
      n, m = problems[i][0].shape
      t = out.matrix[k, :n, :m]
      results[i] = Transport(t, out.converged[k], out.marginal_error[k], out.iterations[k])
  return results  # type: ignore[return-value]


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def kmeans(x: jax.Array, k: int, key: jax.Array, iterations: int = 100) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means with k-means++ seeding. (n, d) -> centroids (k, d), labels (n,).

  An empty cluster keeps its previous centroid.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  sqn = jnp.sum(x * x, 1)

  def sqdist(c):
    return jnp.maximum(sqn[:, None] + jnp.sum(c * c, 1)[None] - 2 * jnp.matmul(x, c.T, precision="highest"), 0.0)

  key0, key_seed = jax.random.split(key)
  first = jax.random.randint(key0, (), 0, n)
  cent = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  best = jnp.sum((x - x[first]) ** 2, 1)

  def seed(i, carry):
    cent, best = carry
    prob = jnp.where(jnp.sum(best) > 0, best / jnp.sum(best), jnp.full((n,), 1.0 / n))
    j = jax.random.choice(jax.random.fold_in(key_seed, i), n, p=prob)
    cent = cent.at[i].set(x[j])
    return cent, jnp.minimum(best, jnp.sum((x - x[j]) ** 2, 1))

  cent, _ = jax.lax.fori_loop(1, k, seed, (cent, best))

  def lloyd(_, cent):
    labels = jnp.argmin(sqdist(cent), 1)
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
    count = onehot.sum(0)
    mean = jnp.matmul(onehot.T, x, precision="highest") / jnp.maximum(count, 1.0)[:, None]
    return jnp.where(count[:, None] > 0, mean, cent)

  cent = jax.lax.fori_loop(0, iterations, lloyd, cent)
  return cent, jnp.argmin(sqdist(cent), 1)
