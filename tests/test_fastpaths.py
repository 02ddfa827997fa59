"""The host path's shortcuts give the bits of the plain computation.

* ``kept_distance`` computes the symmetric (m, m) block among the kept neurons once (SciPy ``pdist``; upper-
  triangle tile pairs in the compiled kernel): every entry must equal ``pairwise_distance(x, x[keep])``.
* ``apply_plan`` replaces the matmul by a gather-add where every row of a map is one or two unit entries (the
  paper's maps at ratio 0.5): every fused weight must equal the dense product's, signed zeros included.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import _fuse, _transport


def _normalized(rng, n, d):
  return np.asarray(_transport.normalize_rows(rng.normal(size=(n, d)).astype(np.float32)))


def _small_tiles(monkeypatch):
  """Tiles that do not divide the test shapes: 3 x 3 rows, steps of 3 features (an odd tree), 2 steps a block,
  2 blocks a chunk."""
  for name, value in (("_TILE", 3), ("_STEP_FEATURES", 3), ("_BLOCK_STEPS", 2), ("_CHUNK_BLOCKS", 2)):
    monkeypatch.setattr(_transport, name, value)


@pytest.mark.parametrize("kernel, p", [(False, p) for p in (1.0, 2.0, 3.0, 0.5, np.inf)]
                         + [(True, p) for p in (1.0, 2.0, 3.0, np.inf)])  # the kernel compiles per p; p = 2: matmul
def test_kept_distance_is_pairwise_distance(p, kernel, monkeypatch):
  """Bit for bit, but for the BLAS matmul of large p = 2 costs; the kept block is symmetric in every case."""
  if kernel:  # every NumPy input to the compiled tiles
    _small_tiles(monkeypatch)
    monkeypatch.setattr(_transport, "_HOST_COST_ELEMENTS", 0)
  else:  # pdist for every kept block
    monkeypatch.setattr(_transport, "_HOST_SYMMETRIC_MIN_ELEMENTS", 0)
  _transport._pairwise_tiled.clear_cache()
  try:
    rng = np.random.default_rng(0)
    for n, m, d in [(11, 5, 9), (12, 7, 4), (8, 8, 5), (9, 1, 6), (16, 10, 13)]:  # all kept (8 of 8), one kept
      x = _normalized(rng, n, d)
      keep = np.sort(rng.choice(n, m, replace=False)).astype(np.int32)
      got = np.asarray(_transport.kept_distance(x, keep, p))
      want = ifjax.pairwise_distance(x, x[keep], p=p)
      assert got.dtype == np.float32 and got.shape == (n, m)
      if kernel and p == 2:  # one BLAS matmul: its rounding depends on the CPU's kernels, no bits are promised
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=f"n={n} m={m} d={d}")
      else:
        np.testing.assert_array_equal(got, want, err_msg=f"n={n} m={m} d={d}")
      assert np.all(got[keep, np.arange(m)] == 0)  # a kept neuron is 0 from itself
      np.testing.assert_array_equal(got[keep], got[keep].T)  # the kept block is symmetric
      if kernel:  # the jit-able kernel of jax inputs sums in the same order; the root (p = 3) is XLA's pow, not
        # NumPy's; p = 2 on the host is the matmul form
        traced = np.asarray(ifjax.pairwise_distance(jnp.asarray(x), jnp.asarray(x[keep]), p=p))
        np.testing.assert_allclose(traced, want, rtol={1.0: 0, np.inf: 0, 3.0: 3e-7, 2.0: 2e-6}[p], atol=0)
  finally:
    monkeypatch.undo()
    _transport._pairwise_tiled.clear_cache()


def test_euclidean_matmul_form_recomputes_near_pairs():
  """The matmul form ||x||^2 + ||y||^2 - 2 x.y loses the small distances to rounding (about 1e-4 at 1e-3 apart in
  float32); those pairs are recomputed from differences: duplicates are exactly 0 apart, a pair 1e-3 apart is
  right to float32 rounding, and every distance is within 2e-6 of float64 differences."""
  from scipy.spatial.distance import cdist

  rng = np.random.default_rng(4)
  x = _normalized(rng, 40, 300)
  x[1] = _normalized(np.random.default_rng(5), 1, 300)[0] * 1e-3 + x[0]
  x[1] /= np.linalg.norm(x[1])
  x[2] = x[0]
  got = _transport._euclidean_matmul(x, x[:10])
  want = cdist(x.astype(np.float64), x[:10].astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert got[0, 0] == got[2, 0] == got[0, 2] == 0
  assert 5e-4 < want[1, 0] < 2e-3 and abs(got[1, 0] - want[1, 0]) <= 1e-7 * want[1, 0]
  sq = np.einsum("ij,ij->i", x, x)
  raw = np.sqrt(max(sq[1] + sq[0] - np.float32(2) * (x[1:2] @ x[0:1].T)[0, 0], 0))  # the unrepaired form
  assert abs(raw - want[1, 0]) > 2e-6


def test_kept_distance_kernel_computes_only_upper_tile_pairs(monkeypatch):
  """7 kept rows in 3-row tiles: 3 tiles, 6 = 3 * 4 / 2 tile pairs instead of 9, and 5 dropped rows in 2 tiles
  against the 3; 13 features in 3 blocks of 6: a chunk of 2 blocks and one of 1, so (6 + 6) * 2 kernel calls of
  two compiled shapes."""
  _small_tiles(monkeypatch)
  monkeypatch.setattr(_transport, "_HOST_COST_ELEMENTS", 0)
  calls = []
  kernel = _transport._tile_kernel
  monkeypatch.setattr(_transport, "_tile_kernel", lambda acc, a, b, p: calls.append(a.shape) or kernel(acc, a, b, p=p))
  x = _normalized(np.random.default_rng(0), 12, 13)
  keep = np.array([0, 2, 4, 6, 8, 10, 11], np.int32)
  cost = _transport.kept_distance(x, keep, 1.0)
  assert sorted(k for k in cost.tiles if k[0] >= 0) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
  assert sorted(k for k in cost.tiles if k[0] < 0) == [(i, j) for i in (-2, -1) for j in range(3)]
  assert len(calls) == 24 and set(calls) == {(3, 12), (3, 6)}
  np.testing.assert_array_equal(np.asarray(cost), ifjax.pairwise_distance(x, x[keep], p=1.0))


def _one_layer(kernel):
  variables = {"params": {"hidden": {"kernel": kernel}, "out": {"kernel": np.ones((kernel.shape[1], 3), kernel.dtype)}}}
  spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
  return variables, spec


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unit_pair_maps_apply_as_the_dense_product(dtype):
  rng = np.random.default_rng(1)
  n, m = 8, 4
  kernel = (rng.normal(size=(5, n)) * 10.0 ** rng.integers(-3, 4, size=(5, n))).astype(dtype)
  kernel[0, :2] = -0.0  # -0 + -0: a matmul accumulates from +0 and gives +0
  kernel[1, 3] = -kernel[1, 5]  # x + (-x) = +0
  variables, spec = _one_layer(kernel)
  unit = np.zeros((m, n), np.float32)  # rows of one or two ones
  unit[0, [0, 1]] = unit[1, 2] = unit[2, [3, 5]] = unit[3, [4, 6]] = 1
  half = unit.copy()
  half[3, 4] = 0.5  # not a unit entry: the dense product
  pairs = unit.copy()
  pairs[1, 7] = 1  # every row sums two sources
  maps = {"one or two ones": unit, "two ones": pairs, "a half": half}
  assert _fuse._unit_pairs(unit)[1].tolist() == [0, 2, 3] and _fuse._unit_pairs(pairs)[1] is None
  assert _fuse._unit_pairs(half) is None
  assert _fuse._unit_pairs(np.array([[1, 1, 1, 0]], np.float32)) is None  # three terms: order-dependent rounding
  for what, mp in maps.items():
    plan = {"hidden": _fuse.GroupPlan(None, np.ones(n, np.float32), mp.T / n, mp, mp, np.asarray(True),
                                      np.float32(0), np.asarray(0))}
    out = ifjax.apply_plan(variables, spec, plan)
    got_in = np.asarray(out["params"]["hidden"]["kernel"])
    got_out = np.asarray(out["params"]["out"]["kernel"])
    want_in = np.tensordot(mp, kernel.T.astype(np.float32), axes=1).astype(dtype).T
    want_out = np.tensordot(mp, variables["params"]["out"]["kernel"].astype(np.float32), axes=1).astype(dtype)
    assert got_in.dtype == dtype
    np.testing.assert_array_equal(got_in, want_in, err_msg=what)
    np.testing.assert_array_equal(np.signbit(got_in), np.signbit(want_in), err_msg=what)
    np.testing.assert_array_equal(got_out, want_out, err_msg=what)
    assert got_in[0, 0] == 0 and not np.signbit(got_in[0, 0])  # -0 + -0 -> +0


def test_exact_plans_at_half_are_unit_pairs():
  """Ratio 0.5, uniform masses, even n: the exact plan is integral, so the fast path is the one taken."""
  rng = np.random.default_rng(2)
  variables, spec = _one_layer(rng.normal(size=(6, 16)).astype(np.float32))
  pl = ifjax.plan(variables, spec, 0.5)["hidden"]
  first, rows, second = _fuse._unit_pairs(np.asarray(pl.consumer_map))
  assert rows is None  # 16 -> 8: two sources per target
  assert sorted(np.concatenate([first, second]).tolist()) == list(range(16))


def test_solving_queued_groups_early_changes_nothing(monkeypatch):
  """With every cost compiled and no room for queued ones, each group is solved as soon as the next is queued
  (cost, cost, solve, cost, solve, solve) and the plan has the bits of the one that queues every cost first."""
  import jax

  module, spec = ifjax.models.get("resnet20")
  v = module.init(jax.random.key(0), np.ones((1, 32, 32, 3), np.float32))
  groups = ["layer1_0/conv1", "layer2_0/conv1", "layer3_0/conv1"]
  monkeypatch.setattr(_transport, "_HOST_COST_ELEMENTS", 0)
  monkeypatch.setattr(_transport, "_DIRECT_SPEED_POWER", np.inf)  # 16-64 neurons: not the direct path either
  monkeypatch.setattr(_transport, "_DIRECT_SPEED", {})
  calls = []
  cost, solve = _transport.kept_distance, _transport.solve_exact
  monkeypatch.setattr(_transport, "kept_distance", lambda *a: calls.append("cost") or cost(*a))
  monkeypatch.setattr(_transport, "solve_exact", lambda *a: calls.append("solve") or solve(*a))
  whole = ifjax.plan(v, spec, 0.5, groups=groups)
  assert calls == ["cost"] * 3 + ["solve"] * 3
  calls.clear()
  monkeypatch.setattr(_fuse, "_INFLIGHT_BYTES", 0)
  early = ifjax.plan(v, spec, 0.5, groups=groups)
  assert calls == ["cost", "cost", "solve", "cost", "solve", "solve"]
  for g in groups:
    for field in ("keep", "transport", "producer_map", "consumer_map"):
      np.testing.assert_array_equal(np.asarray(getattr(early[g], field)), np.asarray(getattr(whole[g], field)))


def test_sparse_maps_of_large_groups_apply_as_the_dense_product(monkeypatch):
  """Above _SPARSE_PRODUCT a map is applied by its nonzero entries (an exact plan has <= n + m - 1): same values."""
  rng = np.random.default_rng(0)
  w = {"params": {"a": {"kernel": rng.standard_normal((5, 40)).astype(np.float32)},
                  "b": {"kernel": rng.standard_normal((40, 3)).astype(np.float32)}}}
  spec = ifjax.Spec([ifjax.Group("a", [("params/a/kernel", 1)], [("params/b/kernel", 0)])])
  pl = ifjax.plan(w, spec, 0.3)
  assert np.count_nonzero(pl["a"].producer_map) <= 40 + 28 - 1
  dense = ifjax.apply_plan(w, spec, pl)
  monkeypatch.setattr(_fuse, "_SPARSE_PRODUCT", 0)
  sparse = ifjax.apply_plan(w, spec, pl)
  for layer in ("a", "b"):
    np.testing.assert_allclose(sparse["params"][layer]["kernel"], dense["params"][layer]["kernel"], rtol=1e-5,
                               atol=1e-6)


def test_intra_fuse_of_groups_too_large_to_plan_together_equals_one_plan(monkeypatch):
  """Above _STREAM_BYTES intra_fuse plans and applies one group at a time; the result is the one-plan result."""
  rng = np.random.default_rng(0)
  w = {"params": {"a": {"kernel": rng.standard_normal((5, 12)).astype(np.float32)},
                  "b": {"kernel": rng.standard_normal((12, 10)).astype(np.float32)},
                  "c": {"kernel": rng.standard_normal((10, 3)).astype(np.float32)}}}
  spec = ifjax.Spec([ifjax.Group("a", [("params/a/kernel", 1)], [("params/b/kernel", 0)]),
                     ifjax.Group("b", [("params/b/kernel", 1)], [("params/c/kernel", 0)])])
  together = ifjax.intra_fuse(w, spec, 0.4)
  calls = []
  real = _fuse._plan
  monkeypatch.setattr(_fuse, "_STREAM_BYTES", 0)
  monkeypatch.setattr(_fuse, "_plan", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
  apart = ifjax.intra_fuse(w, spec, 0.4)
  assert calls == [{"a": 0.4}, {"b": 0.4}]
  for layer in ("a", "b", "c"):
    np.testing.assert_allclose(apart["params"][layer]["kernel"], together["params"][layer]["kernel"], rtol=1e-5,
                               atol=1e-6)
