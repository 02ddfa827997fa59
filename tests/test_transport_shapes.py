"""The cost path is chosen by the problem's shape: few neurons with long vectors (an attention head group, 12 x 6
neurons of ~200k numbers) go to SciPy's ``cdist`` directly instead of the (256 x 256) compiled tiles, with the
tiles' values to float32 rounding; many neurons keep the tiles."""

import numpy as np
import pytest

import ifjax
from ifjax import _transport


def _rows(n, d, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return np.asarray(_transport.normalize_rows(x))


def test_the_path_follows_the_shape():
  assert _transport.direct_pairs(12, 6, 1.0) and _transport.direct_pairs(12, 6, np.inf)
  assert _transport.direct_pairs(12, 6, 3.0)  # 72 * 128 entries of work < 256 * 256
  assert not _transport.direct_pairs(12, 6, 2.0)  # the matmul form is faster still
  assert not _transport.direct_pairs(256, 128, 1.0) and not _transport.direct_pairs(64, 32, 3.0)
  assert _transport.direct_pairs(64, 32, 1.0) and not _transport.direct_pairs(200, 100, 1.0)


@pytest.mark.parametrize("p", [1.0, 3.0, np.inf])
def test_few_long_neurons_are_the_tiles_values(p, monkeypatch):
  """12 neurons of 2^19 / 12 numbers (above the host threshold): the direct path gives the tiles' values to
  float32 rounding (the tiles sum in float32, cdist in float64), exactly 0 from itself, a symmetric kept block,
  and kept_distance and host_distance agree bit for bit."""
  monkeypatch.setattr(_transport, "_HOST_COST_ELEMENTS", 1 << 16)  # small enough to run fast, large for the rule
  monkeypatch.setattr(_transport, "_DIRECT_CHUNK_BYTES", 8 * 5000 * 5)  # chunks of 5 rows: 12 = 5 + 5 + 2
  x = _rows(12, 5000)
  keep = np.array([0, 2, 3, 7, 9, 11])
  got = _transport.kept_distance(x, keep, p)
  assert isinstance(got, np.ndarray)  # not a PendingCost of the tiles
  np.testing.assert_array_equal(got, _transport.host_distance(x, x[keep], p))
  np.testing.assert_array_equal(got, ifjax.pairwise_distance(x, x[keep], p=p))
  assert np.all(got[keep, np.arange(6)] == 0)
  np.testing.assert_array_equal(got[keep], got[keep].T)
  monkeypatch.setattr(_transport, "_DIRECT_SPEED", {})
  monkeypatch.setattr(_transport, "_DIRECT_SPEED_POWER", np.inf)
  tiles = np.asarray(_transport.kept_distance(x, keep, p))
  np.testing.assert_allclose(got, tiles, rtol=2e-6, atol=0)


def test_exact_plans_are_the_same_on_both_paths(monkeypatch):
  """An exact plan of a head-shaped group (12 neurons, 6 kept) does not depend on the path."""
  rng = np.random.default_rng(1)
  variables = {"params": {"hidden": {"kernel": rng.normal(size=(6000, 12)).astype(np.float32)},
                          "out": {"kernel": rng.normal(size=(12, 3)).astype(np.float32)}}}
  spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
  monkeypatch.setattr(_transport, "_HOST_COST_ELEMENTS", 1 << 16)
  direct = ifjax.plan(variables, spec, 0.5)["hidden"]
  monkeypatch.setattr(_transport, "_DIRECT_SPEED", {})
  tiles = ifjax.plan(variables, spec, 0.5)["hidden"]
  np.testing.assert_array_equal(np.asarray(direct.keep), np.asarray(tiles.keep))
  np.testing.assert_allclose(np.asarray(direct.transport), np.asarray(tiles.transport), atol=1e-7)
