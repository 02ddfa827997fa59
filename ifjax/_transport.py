"""Ground cost between neurons and the OT solvers that turn it into a transport map.

Shapes: ``n`` source neurons, ``m`` targets, ``d`` features per neuron.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from ifjax._errors import ArgumentTypeError
from ifjax._spec import AnyArray, array_module

_A = TypeVar("_A", jax.Array, np.ndarray)
_Metric = Literal["cityblock", "euclidean", "chebyshev", "minkowski"]  # SciPy's names of the p-norm distances

# n * m * d at or below which the cost is computed by SciPy on the host (no XLA compilation); above it, by
# compiled tiles (p = 2: a BLAS matmul).
_HOST_COST_ELEMENTS = 1 << 22
# The compiled p-norm cost: rows of x and of y per (square) tile; features per step (one elementwise loop over the
# tile, summed as a pairwise tree) and steps per block (summed in order, then added to the total): 256 features a
# block. NumPy inputs go through one program, ``_tile_kernel``, for every shape: a tile against a tile over
# ``_CHUNK_BLOCKS`` blocks of features per call (then one block per call for the rest).
_TILE, _STEP_FEATURES, _BLOCK_STEPS, _CHUNK_BLOCKS = 256, 16, 16, 4
# m * m * d from which the host cost computes the kept block with pdist (below, pdist's overhead is larger).
_HOST_SYMMETRIC_MIN_ELEMENTS = 1 << 19
# Above _HOST_COST_ELEMENTS, few neurons against few (an attention head group: 12 x 6 neurons of ~200k numbers)
# fill a small corner of the 256 x 256 tiles, which cost the whole tile: such costs go to SciPy's cdist directly
# (by rows, float64 copies of at most _DIRECT_CHUNK_BYTES at a time) when the tiles would do more than
# _DIRECT_SPEED[p] times its n * m * d work (cdist is ~4x slower per entry than the tiles for p = 1 and inf, and
# ~100x for other p, which take a power per entry).
_DIRECT_CHUNK_BYTES = 1 << 26
_DIRECT_SPEED = {1.0: 4, math.inf: 4}
_DIRECT_SPEED_POWER = 128
# p = 2 above _HOST_COST_ELEMENTS: the matmul form, with the pairs whose squared distance it puts below this
# fraction of ||x||^2 + ||y||^2 (where its rounding error is not small against the distance) recomputed from
# differences; pairs recomputed at a time.
_MATMUL_NEAR, _NEAR_CHUNK = 1e-2, 4096


class Transport(NamedTuple):
  """An OT plan and its diagnostics.

  Attributes:
    matrix: (n, m) plan with row sums ~ source mass and column sums ~ target mass.
    converged: () bool. Always True for the exact solver unless the LP failed.
    marginal_error: () float, max absolute violation of either marginal.
    iterations: () int, Sinkhorn iterations (0 for the exact solver).
  """

  matrix: AnyArray
  converged: AnyArray
  marginal_error: AnyArray
  iterations: AnyArray


def check_p(p) -> float:
  """``p`` of the p-norm cost as a float; ValueError unless it is a real number with 0 < p <= inf."""
  # (numbers.Real's stub has no comparison with an int)
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= math.inf:  # pyright: ignore[reportOperatorIssue]
    wrong_type = isinstance(p, bool) or not isinstance(p, numbers.Real)  # a TypeError, and a ValueError as before
    raise (ArgumentTypeError if wrong_type else ValueError)(
        f"p must be a number with 0 < p <= inf (the cost is the distance ||x - y||_p; p = inf: the largest "
        f"difference), got {p!r}")
  return float(p)


def check_sinkhorn(epsilon, threshold, max_iterations) -> None:
  """ValueError unless ``epsilon`` and ``threshold`` are finite and > 0 and ``max_iterations`` is a positive int.

  A negative epsilon would make Sinkhorn maximise the cost (and still report convergence); zero divides by zero.
  """
  for name, v in (("epsilon", epsilon), ("threshold", threshold)):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:  # pyright: ignore[reportOperatorIssue]
      wrong_type = isinstance(v, bool) or not isinstance(v, numbers.Real)
      raise (ArgumentTypeError if wrong_type else ValueError)(
          f"Sinkhorn {name} must be a finite number > 0, got {v!r}")
  if isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral) or max_iterations < 1:
    raise ValueError(f"Sinkhorn max_iterations must be a positive int, got {max_iterations!r}")


def normalize_rows(x: AnyArray, *, in_place: bool = False) -> AnyArray:
  """(n, d) -> rows divided by their L2 norm; an all-zero row stays zero (no NaN). NumPy in, NumPy out;
  ``in_place`` overwrites a NumPy ``x`` (the same values, no second (n, d) array)."""
  xp = array_module(x)
  norm = xp.linalg.norm(x, axis=-1, keepdims=True)
  norm = xp.where(norm > 0, norm, xp.asarray(1.0, x.dtype))
  if in_place and isinstance(x, np.ndarray):  # (xp is np)
    return np.divide(x, norm, out=x)
  return x / norm


def pairwise_distance(x: AnyArray, y: AnyArray, p: float = 1.0) -> AnyArray:
  """(n, d), (m, d) -> (n, m) p-norm distances ``||x_i - y_j||_p`` (``torch.cdist``), float32.

  Identical rows are exactly 0 apart for every p, and no (n, m, d) array is formed. Small NumPy inputs
  (n * m * d <= 2^22), and larger ones with few rows (few neurons, long vectors: :func:`direct_pairs`): SciPy's
  ``cdist`` on the host, no compilation. Larger: compiled (256 x 256) tiles of
  differences, vectorised along the columns, 16 features per step; for NumPy inputs one program for every
  shape, called per tile and chunk of up to 1024 features, for jax arrays one program per shape (jit-able).
  Except p = 2 with large NumPy inputs: the matmul form, its near pairs recomputed from differences
  (:func:`_euclidean_matmul`; within ~1e-6 of the differences).
  ``p``: 0 < p <= inf.
  """
  p = check_p(p)
  if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):  # array_module(x, y) is np
    return np.asarray(host_distance(x, y, p))
  return _pairwise_tiled(x, y, p=float(p))


def host_distance(x: npt.ArrayLike, y: npt.ArrayLike, p: float) -> np.ndarray | PendingCost:
  """:func:`pairwise_distance` of NumPy inputs without waiting for the compiled kernel: a NumPy array, or
  a :class:`PendingCost` still being computed (``np.asarray`` waits for it), so the host can go on meanwhile,
  e.g. solve the OT problem of an earlier group. ``p`` checked by the caller."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  if x.shape[0] * y.shape[0] * x.shape[1] <= _HOST_COST_ELEMENTS:
    return _pairwise_host(x, y, float(p))
  if direct_pairs(x.shape[0], y.shape[0], float(p)):
    return _pairwise_direct(x, y, float(p))
  if p == 2:
    return _euclidean_matmul(x, y)
  rows, cols = _host_tiles(x, False), _host_tiles(y, True)
  tiles = {(i, j): _tile_sums(rows[i], cols[j], p) for i in range(len(rows)) for j in range(len(cols))}
  return PendingCost(tiles, (x.shape[0], y.shape[0]), float(p), None)


def kept_distance(x: npt.ArrayLike, keep: np.ndarray, p: float) -> np.ndarray | PendingCost:
  """(n, d) NumPy rows, (m,) distinct kept row indices -> (n, m) ``host_distance(x, x[keep], p)``
  (a :class:`PendingCost` for large inputs). The (m, m) block among the kept rows is symmetric by construction,
  and computed once where that pays, which saves up to a quarter of the work: SciPy's ``pdist`` on the host,
  upper-triangle tile pairs in the compiled kernel from two column tiles (more than ``_TILE`` kept rows).
  Every entry is summed in the order :func:`pairwise_distance` sums it, so the two agree bit for bit, except
  for large costs at p = 2: those are one BLAS matmul, whose rounding depends on the CPU's kernels, and whose
  kept block is mirrored from its upper triangle (within ~1 ulp of ``host_distance``). ``p`` checked by the
  caller."""
  x = np.asarray(x, np.float32)
  n, d = x.shape
  y = x[keep]
  m = y.shape[0]
  large = n * m * d > _HOST_COST_ELEMENTS
  if large and p == 2:  # one matmul; BLAS may round (i, j) and (j, i) differently: keep the upper triangle
    out = _euclidean_matmul(x, y)
    block = out[keep]
    out[keep] = np.triu(block) + np.triu(block, 1).T
    return out
  if large and direct_pairs(n, m, p):
    return _pairwise_direct(x, y, p)  # cdist is symmetric: |a - b| = |b - a|, summed in one order
  if (large and m <= _TILE) or (not large and m * m * d < _HOST_SYMMETRIC_MIN_ELEMENTS):
    return host_distance(x, y, p)  # one column tile or a small block: nothing worth sharing
  mask = np.ones(n, bool)
  mask[keep] = False
  drop = np.flatnonzero(mask)
  if large:
    rows, cols, dropped = _host_tiles(y, False), _host_tiles(y, True), _host_tiles(x[drop], False)
    tiles = {(i, j): _tile_sums(rows[i], cols[j], p) for i in range(len(rows)) for j in range(i, len(cols))}
    tiles.update({(-1 - i, j): _tile_sums(dropped[i], cols[j], p) for i in range(len(dropped))
                  for j in range(len(cols))})
    return PendingCost(tiles, (n, m), float(p), (np.asarray(keep), drop))
  from scipy.spatial.distance import pdist, squareform

  out = np.empty((n, m), np.float32)
  out[drop] = _pairwise_host(x[drop], y, float(p))
  metric, kw = _scipy_metric(float(p))
  out[keep] = squareform(pdist(y, metric, **kw)).astype(np.float32)
  return out


class PendingCost:
  """An (n, m) cost matrix that the compiled kernel is still computing, as (tile, tile) sums; ``np.asarray``
  waits for them and assembles the matrix (with the root for 1 < p < inf).

  Tiles are keyed ``(i, j)``: row tile i of x (or of the kept rows, of which only i <= j is computed and the rest
  mirrored) against column tile j, and ``(-1 - i, j)``: row tile i of the dropped rows, for :func:`kept_distance`.
  """

  def __init__(self, tiles: dict[tuple[int, int], AnyArray], shape: tuple[int, int], p: float,
               kept: tuple[np.ndarray, np.ndarray] | None):
    self.tiles, self.shape, self.p, self.kept = tiles, shape, p, kept

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    n, m = self.shape
    ct = -(-m // _TILE)
    full = lambda rows: np.empty((-(-rows // _TILE) * _TILE, ct * _TILE), np.float32)
    if self.kept is None:
      out = full(n)
    else:
      keep, drop = self.kept
      out, rest = full(m), full(len(drop))
    for (i, j), tile in self.tiles.items():
      tile = np.asarray(tile)
      if i < 0:
        rest[(-1 - i) * _TILE:(-i) * _TILE, j * _TILE:(j + 1) * _TILE] = tile
      else:
        out[i * _TILE:(i + 1) * _TILE, j * _TILE:(j + 1) * _TILE] = tile
        if self.kept is not None and i != j:
          out[j * _TILE:(j + 1) * _TILE, i * _TILE:(i + 1) * _TILE] = tile.T
    if self.kept is None:
      out = out[:n, :m]
    else:
      kept_block, out = out[:m, :m], np.empty((n, m), np.float32)
      out[keep], out[drop] = kept_block, rest[:len(drop), :m]
    out = _root(out, self.p)
    return out if dtype is None else out.astype(dtype, copy=False)


def _euclidean_matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(n, d), (m, d) float32 -> (n, m) float32 Euclidean distances from the matmul form
  ``sqrt(||x||^2 + ||y||^2 - 2 x.y)``, one float32 BLAS product (2.7x faster than the differences on 2 cores).
  Its rounding error grows as the distance shrinks, so every pair it puts closer than
  ``sqrt(_MATMUL_NEAR * (||x||^2 + ||y||^2))`` is recomputed from differences in float64: identical rows are
  exactly 0 apart, and a kept neuron exactly 0 from itself."""
  sx, sy = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
  scale = sx[:, None] + sy[None, :]
  square = scale - np.float32(2) * (x @ y.T)
  out = np.sqrt(np.maximum(square, 0))
  rows, cols = np.nonzero(square < np.float32(_MATMUL_NEAR) * scale)
  for k in range(0, rows.size, _NEAR_CHUNK):
    i, j = rows[k:k + _NEAR_CHUNK], cols[k:k + _NEAR_CHUNK]
    diff = x[i].astype(np.float64) - y[j]
    out[i, j] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
  return out


def direct_pairs(n: int, m: int, p: float) -> bool:
  """Whether a large (n, m) cost of NumPy rows goes to SciPy's ``cdist`` rather than the compiled tiles: when the
  (256 x 256) tiles covering it would do more than ``_DIRECT_SPEED[p]`` times its n * m entries' work (p = 2
  only when the matmul form would not be faster either: never, as the matmul is the fastest path there)."""
  if p == 2:
    return False
  tiles = -(-n // _TILE) * _TILE * (-(-m // _TILE) * _TILE)
  return _DIRECT_SPEED.get(p, _DIRECT_SPEED_POWER) * n * m <= tiles


def _pairwise_direct(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray:
  """:func:`_pairwise_host` by chunks of rows of x (float64 copies of at most ``_DIRECT_CHUNK_BYTES``)."""
  y64 = y.astype(np.float64)
  rows = max(1, _DIRECT_CHUNK_BYTES // (8 * max(1, x.shape[1])))
  out = np.empty((x.shape[0], y.shape[0]), np.float32)
  for i in range(0, x.shape[0], rows):
    out[i:i + rows] = _pairwise_host(x[i:i + rows].astype(np.float64), y64, p)
  return out


def _scipy_metric(p: float) -> tuple[_Metric, dict]:
  metrics: dict[float, tuple[_Metric, dict]] = {1.0: ("cityblock", {}), 2.0: ("euclidean", {}),
                                                math.inf: ("chebyshev", {})}
  return metrics.get(p, ("minkowski", {"p": p}))


def _pairwise_host(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray:
  """SciPy's ``cdist`` (a C loop in float64, then rounded to float32)."""
  from scipy.spatial.distance import cdist

  metric, kw = _scipy_metric(p)
  return cdist(x, y, metric, **kw).astype(np.float32)


def _tile_distance(xs: jax.Array, ys: jax.Array, p: float, acc: jax.Array | None = None) -> jax.Array:
  """(rows, F) features of x, row-major, and (F, cols) features of y, feature-major (F a multiple of the block,
  ``_BLOCK_STEPS * _STEP_FEATURES``) -> (rows, cols) sums of ``|x - y|^p`` (max for p = inf), added to ``acc``
  (running sums over earlier features) if given. The summation order of every entry, whatever the tile and
  the chunks of features: a pairwise tree over the features of a step, the steps of a block in order, then the
  blocks in order. Each step is one elementwise loop over the tile, vectorised along the columns."""
  combine = jnp.maximum if math.isinf(p) else jnp.add
  xb = jnp.moveaxis(xs.reshape(xs.shape[0], -1, _BLOCK_STEPS, _STEP_FEATURES), 0, 2)  # (blocks, steps, rows, feats)
  yb = ys.reshape(-1, _BLOCK_STEPS, _STEP_FEATURES, ys.shape[1])  # (blocks, steps, feats, cols)

  def term(xcol, yrow):
    diff = jnp.abs(xcol[:, None] - yrow[None, :])
    return diff if p == 1 or math.isinf(p) else diff**p

  def step(part, xy):
    xk, yk = xy
    terms = [term(xk[:, u], yk[u]) for u in range(_STEP_FEATURES)]
    while len(terms) > 1:
      terms = [combine(*terms[i:i + 2]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return combine(part, terms[0]), None

  def block(acc, xy):
    part, _ = jax.lax.scan(step, jnp.zeros_like(acc), xy)
    return combine(acc, part), None

  acc = jnp.zeros((xs.shape[0], ys.shape[1]), jnp.float32) if acc is None else acc
  return jax.lax.scan(block, acc, (xb, yb))[0]


def _padded(x, rows: int, features: int):
  """(k, d) -> zero-padded to multiples of ``rows`` and ``features`` (zero rows are cropped from results, zero
  features add |0 - 0| = 0)."""
  k, d = x.shape
  return array_module(x).pad(x, ((0, -k % rows), (0, -d % features)))


def _rows_distance(x: jax.Array, y: jax.Array, p: float) -> jax.Array:
  """(n, d), (m, d) -> (n, m) sums (no root), in tiles of up to ``_TILE`` x ``_TILE``."""
  (n, _), m = x.shape, y.shape[0]
  rows, cols, block = min(_TILE, n), min(_TILE, m), _BLOCK_STEPS * _STEP_FEATURES
  xt = _padded(x, rows, block)
  xt = xt.reshape(-1, rows, xt.shape[1])  # (row tiles, rows, F)
  yt = _padded(y, cols, block).T  # (F, column tiles * cols)
  yt = jnp.moveaxis(yt.reshape(yt.shape[0], -1, cols), 1, 0)  # (column tiles, F, cols)
  out = jax.lax.map(lambda a: jax.lax.map(lambda b: _tile_distance(a, b, p), yt), xt)  # (rt, ct, rows, cols)
  return out.transpose(0, 2, 1, 3).reshape(out.shape[0] * rows, -1)[:n, :m]


def _root(out: _A, p: float) -> _A:
  return out if p == 1 or math.isinf(p) else out ** np.float32(1.0 / p)


@functools.partial(jax.jit, static_argnames=("p",))
def _pairwise_tiled(x: jax.Array, y: jax.Array, p: float) -> jax.Array:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return _root(_rows_distance(x, y, p), p)


def _chunks(d: int) -> list[slice]:
  """Feature ranges of the kernel calls over d features: ``_CHUNK_BLOCKS`` blocks each, then single blocks
  (two compiled shapes in all)."""
  block = _BLOCK_STEPS * _STEP_FEATURES
  blocks = -(-d // block)
  whole = blocks - blocks % _CHUNK_BLOCKS
  starts = [*range(0, whole, _CHUNK_BLOCKS), *range(whole, blocks)]
  ends = starts[1:] + [blocks]
  return [slice(a * block, b * block) for a, b in zip(starts, ends)]


def _host_tiles(x: np.ndarray, columns: bool) -> list[list[jax.Array]]:
  """(k, d) NumPy rows -> per tile of ``_TILE`` rows, per chunk of :func:`_chunks`, a device array of the
  tile's features: (_TILE, F) as rows of the cost, (F, _TILE) if ``columns`` (zero-padded)."""
  padded = _padded(x, _TILE, _BLOCK_STEPS * _STEP_FEATURES)
  chunks = _chunks(x.shape[1])
  if columns:
    padded = padded.T
    return [[jax.device_put(np.ascontiguousarray(padded[c, i:i + _TILE])) for c in chunks]
            for i in range(0, padded.shape[1], _TILE)]
  return [[jax.device_put(np.ascontiguousarray(padded[i:i + _TILE, c])) for c in chunks]
          for i in range(0, padded.shape[0], _TILE)]


def _tile_sums(xs: list[jax.Array], ys: list[jax.Array], p: float) -> AnyArray:
  """A row tile's and a column tile's feature chunks (:func:`_host_tiles`) -> their (_TILE, _TILE) sums (no
  root), one :func:`_tile_kernel` call per chunk, dispatched without waiting."""
  acc = np.zeros((_TILE, _TILE), np.float32)
  for a, b in zip(xs, ys):
    acc = _tile_kernel(acc, a, b, p=p)
  return acc


@functools.partial(jax.jit, static_argnames=("p",))
def _tile_kernel(acc: jax.Array, xs: jax.Array, ys: jax.Array, p: float) -> jax.Array:
  """(T, T) running sums, (T, F) features of a row tile and (F, T) of a column tile -> the sums continued over
  the F features (:func:`_tile_distance`): the compiled program of every host-side cost, whatever the model,
  in two shapes of F (:func:`_chunks`)."""
  return _tile_distance(xs, ys, p, acc)


def _marginal_error(t, a, b):
  xp = array_module(t, a, b)
  return xp.maximum(xp.max(xp.abs(t.sum(1) - a)), xp.max(xp.abs(t.sum(0) - b)))


def solve_exact(cost: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike) -> Transport:
  """Exact EMD (POT's network simplex, ``ot.emd``), the authors' solver, in float64 on the host.

  Returns NumPy arrays (the plan as float32)."""
  import ot  # POT; imported lazily, it is only needed for the exact solver.

  cost, a, b = (np.asarray(v, np.float64) for v in (cost, a, b))
  a, b = a / a.sum(), b / b.sum()
  # a and b have equal sums, and the duals are not used: no marginal check, no centring of the duals
  t, log = ot.emd(a, b, cost, numItermax=max(100_000, 50 * cost.size), log=True, center_dual=False,
                  check_marginals=False)
  ok = log["result_code"] == 1
  error = np.float32(_marginal_error(t, a, b))  # a NumPy scalar, used as the 0-d array it acts as
  return Transport(t.astype(np.float32), np.asarray(ok), error, np.asarray(0))  # pyright: ignore[reportArgumentType]


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
    # (ott's annotations are the Python types; under vmap they are arrays)
    return Transport(t, out.converged, _marginal_error(t, a_, b_), out.n_iters)  # pyright: ignore[reportArgumentType]

  return jax.vmap(one)(cost, a, b)


def solve_sinkhorn(problems: Sequence[tuple[AnyArray, AnyArray, AnyArray]], *, epsilon: float = 1e-3,
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
