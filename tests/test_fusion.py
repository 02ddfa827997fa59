"""Intra-Fusion end to end: the paper's formulas, function preservation, solvers, BN folding, dtypes.

The reference implementation below follows the paper digest (§1.3-1.7, §2) with
NumPy and ``ot.emd`` only; it shares no code with ``ifjax``.
"""

import copy
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ifjax
import ifjax._transport

RATIOS = (0.1, 0.3, 0.5, 0.7)


# -- small builders -----------------------------------------------------------------
def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _np64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _flat(tree):
  return ifjax._spec.flatten(tree)


def mlp_variables(rng, sizes):
  """Dense_0 .. Dense_{L-1} with kernels (in, out); sizes = [d_in, h_1, ..., d_out]."""
  params = {}
  for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
    params[f"Dense_{i}"] = {"kernel": rng.normal(size=(a, b)) / np.sqrt(a), "bias": 0.3 * rng.normal(size=b)}
  return _f32({"params": params})


def mlp_spec(n_layers):
  return ifjax.Spec(tuple(
      ifjax.Group(f"h{i}", [(f"params/Dense_{i}/kernel", 1), (f"params/Dense_{i}/bias", 0)],
                  [(f"params/Dense_{i + 1}/kernel", 0)]) for i in range(n_layers - 1)))


def mlp_apply(variables, x):
  """Dense -> ReLU -> ... -> Dense, in float64 on the host."""
  p = _np64(variables["params"])
  h = np.asarray(x, np.float64)
  for i in range(len(p)):
    h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
    if i < len(p) - 1:
      h = np.maximum(h, 0.0)
  return h


def conv_variables(rng, c_in, hidden, c_out):
  return _f32({"params": {
      "Conv_0": {"kernel": rng.normal(size=(3, 3, c_in, hidden)) / np.sqrt(9 * c_in),
                 "bias": 0.3 * rng.normal(size=hidden)},
      "Conv_1": {"kernel": rng.normal(size=(3, 3, hidden, c_out)) / np.sqrt(9 * hidden),
                 "bias": 0.3 * rng.normal(size=c_out)},
  }})


CONV_SPEC = ifjax.Spec((ifjax.Group("c", [("params/Conv_0/kernel", 3), ("params/Conv_0/bias", 0)],
                                    [("params/Conv_1/kernel", 2)]),))


class ConvNet(nn.Module):
  """Conv(3x3) [-> BatchNorm] -> ReLU -> Conv(3x3); HWIO kernels."""

  hidden: int
  out: int
  bn: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.hidden, (3, 3), use_bias=not self.bn, precision="highest")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(x)
    return nn.Conv(self.out, (3, 3), precision="highest")(x)


# -- the independent reference (digest §1.3 + §2) --------------------------------------
def _rows(a, axis):
  a = np.moveaxis(np.asarray(a, np.float64), axis, 0)
  return a.reshape(a.shape[0], -1)


def _along(mat, a, axis):
  """``mat @ a`` along ``axis`` of ``a``."""
  a = np.moveaxis(np.asarray(a, np.float64), axis, 0)
  return np.moveaxis(np.tensordot(mat, a, axes=1), 0, axis)


def _cdist(x, y, p):
  diff = np.abs(np.asarray(x, np.float64)[:, None, :] - np.asarray(y, np.float64)[None, :, :])
  return diff.max(-1) if np.isinf(p) else (diff**p).sum(-1) ** (1.0 / p)


def reference_intra_fusion(producers, consumers, ratio, normalization="paper", p=1.0, include_bias=False):
  """producers / consumers: lists of (array, neuron axis). Returns new producers, new consumers, T, keep, importance.

  ``include_bias`` appends the 1-D producer members (biases) to the neuron vectors, as the paper's text says.
  """
  weights = [(a, ax) for a, ax in producers + consumers if np.ndim(a) >= 2]
  a0, ax0 = producers[0]
  n = np.shape(a0)[ax0]
  m = int(n * (1 - ratio))
  imp = np.mean([np.abs(_rows(a, ax)).sum(1) for a, ax in weights], axis=0)
  imp = imp / imp.mean()
  pruned = np.argsort(imp, kind="stable")[:n - m]
  keep = np.setdiff1d(np.arange(n), pruned)
  feats = weights + ([(a, ax) for a, ax in producers if np.ndim(a) == 1] if include_bias else [])
  x = np.concatenate([_rows(a, ax) for a, ax in feats], axis=1)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  cost = _cdist(x, x[keep], p)
  t = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost)
  mt = t.T / t.T.sum(0)  # the authors' code: M[j, i] = T[i, j] / mu_i
  prod = mt if normalization == "paper" else t.T / t.sum(0)[:, None]
  return ([_along(prod, a, ax) for a, ax in producers], [_along(mt, a, ax) for a, ax in consumers], t, keep, imp)


# -- 1. paper-formula equivalence -----------------------------------------------------
@pytest.mark.parametrize("normalization", ["paper", "barycentric"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_matches_independent_numpy_reference(kind, ratio, normalization, rng):
  if kind == "mlp":
    v, spec = mlp_variables(rng, [7, 12, 5]), mlp_spec(2)
    prod, cons = ("Dense_0", 1), ("Dense_1", 0)
  else:
    v, spec = conv_variables(rng, 3, 10, 6), CONV_SPEC
    prod, cons = ("Conv_0", 3), ("Conv_1", 2)
  name = spec.groups[0].name
  pv = v["params"]
  new_prod, new_cons, t, keep, imp = reference_intra_fusion(
      [(pv[prod[0]]["kernel"], prod[1]), (pv[prod[0]]["bias"], 0)], [(pv[cons[0]]["kernel"], cons[1])], ratio,
      normalization)

  out = ifjax.intra_fuse(v, spec, ratio, normalization=normalization)
  po = out["params"]
  np.testing.assert_allclose(po[prod[0]]["kernel"], new_prod[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(po[prod[0]]["bias"], new_prod[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(po[cons[0]]["kernel"], new_cons[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(po[cons[0]]["bias"], pv[cons[0]]["bias"])  # not in the group

  gp = ifjax.plan(v, spec, ratio, normalization=normalization)[name]
  n, m = t.shape
  assert m == int(n * (1 - ratio)) == ifjax.kept_count(n, ratio)
  np.testing.assert_array_equal(np.asarray(gp.keep), keep)
  np.testing.assert_allclose(gp.importance, imp, rtol=1e-5)
  np.testing.assert_allclose(gp.transport, t, atol=1e-6)
  assert bool(gp.converged) and float(gp.marginal_error) < 1e-6
  # Digest §2: every source's mass is fully redistributed (consumer-map columns sum to 1) and, with
  # uniform marginals, every fused neuron has total coefficient n / m under "paper".
  np.testing.assert_allclose(np.sum(gp.consumer_map, 0), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(gp.consumer_map, 1), n / m, rtol=1e-5)
  want_prod_rows = n / m if normalization == "paper" else 1.0
  np.testing.assert_allclose(np.sum(gp.producer_map, 1), want_prod_rows, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_include_bias_matches_reference(ratio):
  rng = np.random.default_rng(5)
  v, spec = mlp_variables(rng, [7, 12, 5]), mlp_spec(2)
  v["params"]["Dense_0"]["bias"] *= 10  # make the bias matter for the cost
  pv = v["params"]
  new_prod, new_cons, t, keep, _ = reference_intra_fusion(
      [(pv["Dense_0"]["kernel"], 1), (pv["Dense_0"]["bias"], 0)], [(pv["Dense_1"]["kernel"], 0)], ratio,
      include_bias=True)
  _, _, t_nobias, _, _ = reference_intra_fusion(
      [(pv["Dense_0"]["kernel"], 1), (pv["Dense_0"]["bias"], 0)], [(pv["Dense_1"]["kernel"], 0)], ratio)
  assert np.abs(t - t_nobias).sum() > 1e-3  # the option changes this problem
  gp = ifjax.plan(v, spec, ratio, include_bias=True)["h0"]
  np.testing.assert_array_equal(gp.keep, keep)
  np.testing.assert_allclose(gp.transport, t, atol=1e-6)
  out = ifjax.intra_fuse(v, spec, ratio, include_bias=True)["params"]
  np.testing.assert_allclose(out["Dense_0"]["kernel"], new_prod[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["Dense_0"]["bias"], new_prod[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["Dense_1"]["kernel"], new_cons[0], rtol=1e-5, atol=1e-5)


def test_exact_plan_keeps_each_kept_neuron_on_itself(rng):
  """Digest §2: with most_important + uniform marginals, each kept neuron's own mass stays on itself."""
  v, spec = mlp_variables(rng, [8, 32, 6]), mlp_spec(2)
  for ratio in RATIOS:
    gp = ifjax.plan(v, spec, ratio)["h0"]
    t, keep = np.asarray(gp.transport), np.asarray(gp.keep)
    n, m = t.shape
    np.testing.assert_allclose(t[keep, np.arange(m)], 1.0 / n, atol=1e-7)
    if ratio == 0.5:  # every fused neuron = kept neuron + one pruned neuron, coefficients 1 and 1
      np.testing.assert_allclose(np.sort(np.asarray(gp.consumer_map), 1)[:, -2:], 1.0, atol=1e-6)
      assert np.count_nonzero(np.asarray(gp.consumer_map) > 1e-6) == n


def test_ratio_zero_is_identity(rng):
  v, spec = mlp_variables(rng, [7, 12, 5]), mlp_spec(2)
  for normalization in ("paper", "barycentric"):
    out = ifjax.intra_fuse(v, spec, 0.0, normalization=normalization)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out, v)


def test_group_plan_sizes(rng):
  """``GroupPlan.n`` / ``.m``: the neuron counts before and after, for pruning, fusion and centroids (no
  ``keep``), and static under ``jit``."""
  v, spec = mlp_variables(rng, [7, 12, 5]), mlp_spec(2)
  for options in (dict(fuse=False), dict(), dict(target="cluster_centroid")):
    gp = ifjax.plan(v, spec, 0.3, **options)["h0"]
    assert (gp.n, gp.m) == (12, ifjax.kept_count(12, 0.3)) == (12, 8), options
  seen = []

  def traced(v):
    gp = ifjax.plan(v, spec, 0.5, solver="sinkhorn")["h0"]
    seen.append((gp.n, gp.m))
    return gp.producer_map

  assert jax.jit(traced)(v).shape == (6, 12) and seen == [(12, 6)]


# -- 2. duplicate neurons: barycentric fusion preserves the function --------------------
def _pairs(rng, k):
  """A random placement of k duplicate pairs on 2k neurons: (perm, pair id per neuron)."""
  perm = rng.permutation(2 * k)
  return perm, np.repeat(np.arange(k), 2)[perm]


def _dup(a, axis, perm):
  """Each of the k entries along ``axis`` twice (identical), placed by ``perm``."""
  return np.take(np.repeat(np.asarray(a, np.float64), 2, axis=axis), perm, axis=axis)


def _split(c, axis, perm, rng, delta):
  """Each entry along ``axis`` split into two halves c/2 +- eps that sum to c, placed by ``perm``."""
  c = np.moveaxis(np.asarray(c, np.float64), axis, 0)
  eps = delta * rng.normal(size=c.shape)
  out = np.empty((2 * c.shape[0],) + c.shape[1:])
  out[0::2], out[1::2] = c / 2 + eps, c / 2 - eps
  return np.moveaxis(out[perm], 0, axis)


def _pair_scores(rng, pair):
  """Importance ranking exactly one (random) member of every pair in the top half."""
  scores = rng.uniform(0.1, 1.0, pair.size)
  for i in range(pair.max() + 1):
    scores[rng.choice(np.flatnonzero(pair == i))] += 2.0
  return scores


def duplicate_mlp(rng, d_in, k, d_out, delta=1e-4):
  perm, pair = _pairs(rng, k)
  v = _f32({"params": {
      "Dense_0": {"kernel": _dup(rng.normal(size=(d_in, k)), 1, perm), "bias": _dup(0.5 * rng.normal(size=k), 0, perm)},
      "Dense_1": {"kernel": _split(rng.normal(size=(k, d_out)), 0, perm, rng, delta), "bias": rng.normal(size=d_out)},
  }})
  return v, _pair_scores(rng, pair), pair


def _check_duplicate_mlp(d_in, k, d_out, seed, rel_err):
  rng = np.random.default_rng(seed)
  v, scores, pair = duplicate_mlp(rng, d_in, k, d_out)
  spec = mlp_spec(2)
  x = rng.normal(size=(16, d_in))
  y = mlp_apply(v, x)
  out = ifjax.intra_fuse(v, spec, 0.5, importance={"h0": scores}, normalization="barycentric")
  assert out["params"]["Dense_0"]["kernel"].shape == (d_in, k)
  assert out["params"]["Dense_1"]["kernel"].shape == (k, d_out)
  assert rel_err(mlp_apply(out, x), y) < 1e-5
  gp = ifjax.plan(v, spec, 0.5, importance={"h0": scores}, normalization="barycentric")["h0"]
  assert sorted(pair[np.asarray(gp.keep)].tolist()) == list(range(k))  # one kept per pair
  return rng, v, scores, x, y


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(d_in=st.integers(2, 5), k=st.integers(2, 6), d_out=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_duplicates_barycentric_exact_preserves_function(d_in, k, d_out, seed):
  rel_err = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  _check_duplicate_mlp(d_in, k, d_out, seed, rel_err)


def test_duplicates_paper_normalization_inflates_and_prune_loses(rel_err):
  rng, v, scores, x, y = _check_duplicate_mlp(4, 6, 3, 123, rel_err)
  spec, b2 = mlp_spec(2), np.asarray(v["params"]["Dense_1"]["bias"], np.float64)
  paper = mlp_apply(ifjax.intra_fuse(v, spec, 0.5, importance={"h0": scores}, normalization="paper"), x)
  assert rel_err(paper, y) > 0.1
  # Digest §2: with paper normalization a merged duplicate pair is ReLU(2z)(c_i + c_j) = 2x the ideal.
  assert rel_err(paper - b2, 2 * (y - b2)) < 1e-5
  pruned = mlp_apply(ifjax.prune(v, spec, 0.5, importance={"h0": scores}), x)
  assert rel_err(pruned, y) > 0.1
  assert rel_err(pruned - b2, 0.5 * (y - b2)) < 1e-2  # one half of each split column survives


def test_duplicates_cluster_centroid_preserves_function(rng, rel_err):
  v, _, pair = duplicate_mlp(rng, 5, 6, 3)
  x = rng.normal(size=(16, 5))
  spec = mlp_spec(2)
  gp = ifjax.plan(v, spec, 0.5, target="cluster_centroid", normalization="barycentric")["h0"]
  assert gp.keep is None and gp.transport.shape == (12, 6)
  t = np.asarray(gp.transport)
  # every centroid collects exactly the two members of one pair
  assert all(len(set(pair[t[:, j] > 1e-6])) == 1 for j in range(6))
  out = ifjax.intra_fuse(v, spec, 0.5, target="cluster_centroid", normalization="barycentric")
  assert rel_err(mlp_apply(out, x), mlp_apply(v, x)) < 1e-5


def test_duplicates_sinkhorn_preserves_function(rng, rel_err):
  v, scores, _ = duplicate_mlp(rng, 4, 5, 3)  # n = 10, m = 5: padded Sinkhorn buckets
  x = rng.normal(size=(16, 4))
  spec = mlp_spec(2)
  kw = dict(importance={"h0": scores}, normalization="barycentric", solver="sinkhorn", fallback="raise")
  gp = ifjax.plan(v, spec, 0.5, **kw)["h0"]
  assert bool(gp.converged) and int(gp.iterations) > 0
  out = ifjax.intra_fuse(v, spec, 0.5, **kw)
  assert rel_err(mlp_apply(out, x), mlp_apply(v, x)) < 1e-5


# -- 3. conv version (optionally with a folded BatchNorm carrying the shift) -------------
@pytest.mark.parametrize("bn", [False, True])
def test_conv_duplicates_preserve_function(bn, rng, rel_err):
  c_in, k, c_out = 3, 5, 4
  perm, pair = _pairs(rng, k)
  params = {"Conv_0": {"kernel": _dup(rng.normal(size=(3, 3, c_in, k)) / 4, 3, perm)},
            "Conv_1": {"kernel": _split(rng.normal(size=(3, 3, k, c_out)) / 4, 2, perm, rng, 1e-4),
                       "bias": rng.normal(size=c_out)}}
  v = {"params": params}
  producers = [("params/Conv_0/kernel", 3)]
  batchnorms = ()
  if bn:  # Conv(bias=False) -> BN: the folded shift lives in the BN bias and is fused as a producer bias
    params["BatchNorm_0"] = {"scale": _dup(rng.uniform(0.5, 2, k), 0, perm), "bias": _dup(rng.normal(size=k), 0, perm)}
    v["batch_stats"] = {"BatchNorm_0": {"mean": _dup(rng.normal(size=k), 0, perm),
                                        "var": _dup(rng.uniform(0.5, 2, k), 0, perm)}}
    batchnorms = (("Conv_0", "BatchNorm_0"),)
  else:
    params["Conv_0"]["bias"] = _dup(0.5 * rng.normal(size=k), 0, perm)
    producers.append(("params/Conv_0/bias", 0))
  v = _f32(v)
  spec = ifjax.Spec((ifjax.Group("c", producers, [("params/Conv_1/kernel", 2)]),), batchnorms)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, c_in)), jnp.float32)
  y = jax.jit(ConvNet(2 * k, c_out, bn).apply)(v, x)
  scores = _pair_scores(rng, pair)
  out = ifjax.intra_fuse(v, spec, 0.5, importance={"c": scores}, normalization="barycentric")
  assert out["params"]["Conv_0"]["kernel"].shape == (3, 3, c_in, k)
  assert out["params"]["Conv_1"]["kernel"].shape == (3, 3, k, c_out)
  if bn:
    for coll, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
      assert out[coll]["BatchNorm_0"][name].shape == (k,)
  small = jax.jit(ConvNet(k, c_out, bn).apply)
  assert rel_err(small(out, x), y) < 1e-5
  paper = ifjax.intra_fuse(v, spec, 0.5, importance={"c": scores})
  assert rel_err(small(paper, x), y) > 0.1


# -- 4. residual group: two producers summed, one map for all members --------------------
def test_residual_group_duplicates(rng, rel_err):
  d_in, k, d_out = 4, 6, 3
  n = 2 * k
  perm, pair = _pairs(rng, k)
  v = _f32({"params": {
      "A": {"kernel": _dup(rng.normal(size=(d_in, k)), 1, perm), "bias": _dup(0.3 * rng.normal(size=k), 0, perm)},
      "B": {"kernel": _dup(rng.normal(size=(d_in, k)), 1, perm), "bias": _dup(0.3 * rng.normal(size=k), 0, perm)},
      "C": {"kernel": _split(rng.normal(size=(k, d_out)), 0, perm, rng, 1e-4), "bias": rng.normal(size=d_out)},
  }})
  spec = ifjax.Spec((ifjax.Group("res", [("params/A/kernel", 1), ("params/A/bias", 0), ("params/B/kernel", 1),
                                         ("params/B/bias", 0)], [("params/C/kernel", 0)]),))

  def apply(var, x):
    p = _np64(var["params"])
    h = np.maximum(x @ p["A"]["kernel"] + p["A"]["bias"] + x @ p["B"]["kernel"] + p["B"]["bias"], 0)
    return h @ p["C"]["kernel"] + p["C"]["bias"]

  x = rng.normal(size=(16, d_in))
  scores = {"res": _pair_scores(rng, pair)}
  pl = ifjax.plan(v, spec, 0.5, importance=scores, normalization="barycentric")
  gp = pl["res"]
  assert gp.transport.shape == (n, k)
  assert gp.producer_map.shape == gp.consumer_map.shape == (k, n)
  out = ifjax.apply_plan(v, spec, pl)
  pm, cm = np.asarray(gp.producer_map, np.float64), np.asarray(gp.consumer_map, np.float64)
  for name in ("A", "B"):  # the same producer map on every producer member
    np.testing.assert_allclose(out["params"][name]["kernel"], v["params"][name]["kernel"] @ pm.T, atol=1e-6)
    np.testing.assert_allclose(out["params"][name]["bias"], pm @ v["params"][name]["bias"], atol=1e-6)
  np.testing.assert_allclose(out["params"]["C"]["kernel"], cm @ v["params"]["C"]["kernel"], atol=1e-6)
  assert rel_err(apply(out, x), apply(v, x)) < 1e-5
  # and it agrees with the reference on the same residual group (paper normalization, L1 importance)
  pv = v["params"]
  ref_p, ref_c, *_ = reference_intra_fusion(
      [(pv["A"]["kernel"], 1), (pv["A"]["bias"], 0), (pv["B"]["kernel"], 1), (pv["B"]["bias"], 0)],
      [(pv["C"]["kernel"], 0)], 0.3)
  got = ifjax.intra_fuse(v, spec, 0.3)["params"]
  for got_arr, want in zip([got["A"]["kernel"], got["A"]["bias"], got["B"]["kernel"], got["B"]["bias"],
                            got["C"]["kernel"]], ref_p + ref_c):
    np.testing.assert_allclose(got_arr, want, rtol=1e-5, atol=1e-5)


# -- 5. Sinkhorn approaches the exact plan -------------------------------------------------
def test_sinkhorn_converges_to_exact_as_epsilon_decreases():
  rng = np.random.default_rng(0)
  v, spec = mlp_variables(rng, [8, 32, 6]), mlp_spec(2)
  ex = ifjax.plan(v, spec, 0.5)["h0"]
  exact = np.asarray(ex.transport, np.float64)
  assert exact.shape == (32, 16)
  pv = v["params"]
  x = np.concatenate([_rows(pv["Dense_0"]["kernel"], 1), _rows(pv["Dense_1"]["kernel"], 0)], 1)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  cost = _cdist(x, x[np.asarray(ex.keep)], 1.0)
  best = float((cost * exact).sum())
  dists, gaps = [], []
  for eps in (1e-1, 1e-2, 1e-3):
    # epsilon = 1e-3 needs ~10^4 iterations here (more than the default 5000)
    gp = ifjax.plan(v, spec, 0.5, solver="sinkhorn", epsilon=eps, max_iterations=20000, fallback="raise")["h0"]
    assert bool(gp.converged) and int(gp.iterations) > 0
    assert float(gp.marginal_error) < 1e-3
    t = np.asarray(gp.transport, np.float64)
    np.testing.assert_allclose(t.sum(1), 1 / 32, atol=1e-3)
    np.testing.assert_allclose(t.sum(0), 1 / 16, atol=1e-3)
    dists.append(float(np.abs(t - exact).sum()))
    gaps.append(abs(float((cost * t).sum()) - best) / best)
  assert dists[0] > dists[1] > dists[2], dists
  assert dists[2] < 0.05, dists
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps


def test_sinkhorn_batched_groups_match_single_solves():
  """Groups sharing a padded bucket are solved in one vmapped call; padding must not change a plan."""
  rng = np.random.default_rng(6)
  v, spec = mlp_variables(rng, [5, 10, 12, 3]), mlp_spec(3)  # n = 10, 12 -> bucket 16; m = 5, 6 -> bucket 8
  kw = dict(solver="sinkhorn", epsilon=1e-2, fallback="raise")
  both = ifjax.plan(v, spec, 0.5, **kw)
  for g in ("h0", "h1"):
    alone = ifjax.plan(v, spec, 0.5, groups=g, **kw)[g]
    np.testing.assert_allclose(both[g].transport, alone.transport, atol=1e-6)
    t = np.asarray(both[g].transport)
    n, m = t.shape
    np.testing.assert_allclose(t.sum(), 1.0, atol=1e-4)  # no mass on the padding
    np.testing.assert_allclose(t.sum(1), 1 / n, atol=1e-3)
    np.testing.assert_allclose(t.sum(0), 1 / m, atol=1e-3)


# -- 6. non-convergence handling --------------------------------------------------------------
def test_sinkhorn_non_convergence_fallbacks():
  rng = np.random.default_rng(2)
  v, spec = mlp_variables(rng, [8, 32, 6]), mlp_spec(2)
  bad = dict(solver="sinkhorn", max_iterations=1, threshold=1e-12)
  exact = ifjax.plan(v, spec, 0.5)["h0"]

  with warnings.catch_warnings():
    warnings.simplefilter("error", ifjax.ConvergenceWarning)
    with pytest.raises(RuntimeError, match="did not converge"):
      ifjax.plan(v, spec, 0.5, fallback="raise", **bad)

  with pytest.warns(ifjax.ConvergenceWarning, match="exact"):
    fb = ifjax.plan(v, spec, 0.5, fallback="exact", **bad)["h0"]
  assert bool(fb.converged)
  np.testing.assert_allclose(fb.transport, exact.transport, atol=1e-7)
  np.testing.assert_allclose(fb.producer_map, exact.producer_map, atol=1e-6)
  with pytest.warns(ifjax.ConvergenceWarning):
    fused = ifjax.intra_fuse(v, spec, 0.5, fallback="exact", **bad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fused, ifjax.intra_fuse(v, spec, 0.5))

  with pytest.warns(ifjax.ConvergenceWarning, match="unconverged"):
    kept = ifjax.plan(v, spec, 0.5, fallback="warn", **bad)["h0"]
  assert not bool(kept.converged)
  t = np.asarray(kept.transport)
  assert np.all(np.isfinite(t))
  assert np.abs(t - np.asarray(exact.transport)).sum() > 1e-2  # not silently the exact plan
  # it is the Sinkhorn plan of the same problem (cost from the reference's neuron vectors)
  pv = v["params"]
  x = np.concatenate([_rows(pv["Dense_0"]["kernel"], 1), _rows(pv["Dense_1"]["kernel"], 0)], 1)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  cost = _cdist(x, x[np.asarray(kept.keep)], 1.0).astype(np.float32)
  direct = ifjax.solve_sinkhorn([(cost, np.full(32, 1 / 32, np.float32), np.full(16, 1 / 16, np.float32))],
                                epsilon=1e-3, threshold=1e-12, max_iterations=1)[0]
  np.testing.assert_allclose(t, direct.matrix, atol=1e-5)  # (float32 costs computed two ways)
  np.testing.assert_allclose(kept.marginal_error, direct.marginal_error, rtol=1e-3, atol=1e-6)


# -- 7. jit, and the chunked cost ---------------------------------------------------------------
class BNConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), use_bias=False)(x)))
    x = jnp.mean(x, axis=(1, 2))
    return nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x))


BN_PAIRS = (("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Dense_0", "BatchNorm_2"))
BN_GROUPS = (
    ifjax.Group("c0", [("params/Conv_0/kernel", 3), ("params/Conv_0/bias", 0)], [("params/Conv_1/kernel", 2)]),
    ifjax.Group("c1", [("params/Conv_1/kernel", 3)], [("params/Dense_0/kernel", 0)]),
)


def bn_variables(rng, model=None, shape=(1, 6, 6, 3)):
  """Random float32 NumPy variables for ``model`` (shapes from ``eval_shape``: no slow init) with non-trivial BNs."""
  shapes = jax.eval_shape((model or BNConvNet()).init, jax.random.key(0), jnp.zeros(shape))
  v = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1)).astype(np.float32),
                   shapes)
  for name, bn in v["batch_stats"].items():
    c = bn["mean"].shape[0]
    bn["mean"][:] = rng.normal(size=c)
    bn["var"][:] = rng.uniform(0.3, 3.0, size=c)
    v["params"][name]["scale"][:] = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1, 1], size=c)
    v["params"][name]["bias"][:] = rng.normal(size=c)
  for name, layer in v["params"].items():
    if "bias" in layer and not name.startswith("BatchNorm"):
      layer["bias"][:] = 0.3 * rng.normal(size=layer["bias"].shape)
  return v


def _tree_allclose(a, b, **kw):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **kw),
               a, b)


def test_apply_plan_jit_matches_eager(rng):
  v = bn_variables(rng)
  spec = ifjax.Spec(BN_GROUPS, BN_PAIRS)
  jitted = jax.jit(ifjax.apply_plan, static_argnums=1)
  plans = [ifjax.plan(v, spec, 0.5),
           ifjax.plan(v, spec, {"c1": 0.5}, normalization="barycentric"),
           ifjax.plan(v, spec, {"c1": 0.5}, target="cluster_centroid"),  # keep is None
           ifjax.plan(v, spec, 0.5, fuse=False)]
  for pl in plans:
    eager = ifjax.apply_plan(v, spec, pl)
    got = jitted(v, spec, pl)
    _tree_allclose(got, eager, rtol=1e-6, atol=1e-6)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: jnp.asarray(a).dtype, eager)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, np.inf])
def test_pairwise_distance_matches_naive_cdist(p, monkeypatch):
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(10, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
  host = ifjax.pairwise_distance(x, y, p=p)  # small NumPy input: the host path
  assert isinstance(host, np.ndarray)
  np.testing.assert_allclose(host, _cdist(x, y, p), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ifjax.pairwise_distance(jnp.asarray(x), jnp.asarray(y), p=p), _cdist(x, y, p),
                             rtol=1e-5, atol=1e-5)
  # the compiled kernel with tiles that do not divide the shapes: (3 x 3) tiles (10 = 3 * 3 + 1) and blocks of
  # 2 steps of 3 features (9 = 6 + 3), zero-padded; a step of 3 features leaves one out of the first pair of its tree
  x2, y2 = rng.normal(size=(10, 9)).astype(np.float32), rng.normal(size=(6, 9)).astype(np.float32)
  monkeypatch.setattr(ifjax._transport, "_TILE", 3)
  monkeypatch.setattr(ifjax._transport, "_STEP_FEATURES", 3)
  monkeypatch.setattr(ifjax._transport, "_BLOCK_STEPS", 2)
  monkeypatch.setattr(ifjax._transport, "_HOST_COST_ELEMENTS", 0)  # NumPy input goes to the kernel too
  ifjax._transport._pairwise_tiled.clear_cache()
  ifjax._transport._tile_kernel.clear_cache()
  try:
    jaxpr = str(jax.make_jaxpr(lambda a, b: ifjax.pairwise_distance(a, b, p=p))(x2, y2))
    assert sorted(re.findall(r"length=(\d+)", jaxpr)) == ["2", "2", "2", "4"], jaxpr  # 2 blocks of 2 steps, 4 x 2 tiles
    np.testing.assert_allclose(ifjax.pairwise_distance(x2, y2, p=p), _cdist(x2, y2, p), rtol=1e-5, atol=1e-5)
    assert ifjax.pairwise_distance(x2, x2[:4], p=p)[np.arange(4), np.arange(4)].max() == 0  # duplicates: exactly 0
  finally:
    monkeypatch.undo()
    ifjax._transport._pairwise_tiled.clear_cache()
    ifjax._transport._tile_kernel.clear_cache()


@pytest.mark.parametrize("p", [1.0, 2.0, np.inf])
def test_pairwise_distance_of_identical_rows_is_zero(p):
  """The most_important target puts each kept neuron at distance 0 from itself (digest §1.4)."""
  for seed in range(6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 14)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # L2-normalised neuron vectors, as in the cost
    d = np.asarray(ifjax.pairwise_distance(x, x[:32], p=p))
    np.testing.assert_allclose(d, _cdist(x, x[:32], p), atol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(np.diag(d[:32]), 0.0, atol=1e-5, err_msg=f"seed {seed}")


# -- 8. BatchNorm folding -----------------------------------------------------------------------
def test_fold_batchnorm_preserves_outputs(rng):
  apply = jax.jit(BNConvNet().apply)
  v = bn_variables(rng)
  before = copy.deepcopy(v)
  spec = ifjax.Spec((), BN_PAIRS)
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 3)), jnp.float32)
  y = apply(v, x)
  f = ifjax.fold_batchnorm(v, spec)
  jax.tree.map(np.testing.assert_array_equal, v, before)  # input untouched
  assert f is not v and f["params"] is not v["params"]
  np.testing.assert_allclose(apply(f, x), y, rtol=1e-5, atol=1e-5)
  eps = 1e-5
  for layer, bn in BN_PAIRS:
    np.testing.assert_array_equal(f["batch_stats"][bn]["mean"], 0.0)
    np.testing.assert_allclose(f["batch_stats"][bn]["var"], np.float32(1.0 - eps), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(f["params"][bn]["scale"], 1.0)
    s = v["params"][bn]["scale"] / np.sqrt(v["batch_stats"][bn]["var"] + eps)
    np.testing.assert_allclose(f["params"][layer]["kernel"], v["params"][layer]["kernel"] * s, rtol=1e-5, atol=1e-6)
    shift = v["params"][bn]["bias"] - v["batch_stats"][bn]["mean"] * s
    if "bias" in v["params"][layer]:  # the shift moves into the layer's bias; the BN bias is zero
      np.testing.assert_allclose(f["params"][layer]["bias"], v["params"][layer]["bias"] * s + shift, rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_array_equal(f["params"][bn]["bias"], 0.0)
    else:  # Conv(bias=False): the shift stays in the BN's own bias
      np.testing.assert_allclose(f["params"][bn]["bias"], shift, rtol=1e-5, atol=1e-5)
  # the folded BN is an identity: folding again changes nothing
  _tree_allclose(ifjax.fold_batchnorm(f, spec), f, rtol=1e-6, atol=1e-6)
  # "params/" / "batch_stats/" prefixes in the spec are stripped
  assert ifjax.Spec((), [("params/Conv_0", "batch_stats/BatchNorm_0")]).batchnorms[0][:2] == ("Conv_0", "BatchNorm_0")


def test_fold_batchnorm_custom_eps(rng):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True, epsilon=1e-1)(nn.Dense(4)(x))

  v = bn_variables(rng, Net(), (1, 3))
  x = rng.normal(size=(5, 3)).astype(np.float32)
  apply = jax.jit(Net().apply)
  y = apply(v, x)
  f = ifjax.fold_batchnorm(v, ifjax.Spec((), [("Dense_0", "BatchNorm_0", 1e-1)]))
  np.testing.assert_allclose(apply(f, x), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f["batch_stats"]["BatchNorm_0"]["var"], 0.9, atol=1e-7)


def test_intra_fuse_on_batchnorm_model_matches_reference_on_folded(rng):
  v = bn_variables(rng)
  spec = ifjax.Spec(BN_GROUPS, BN_PAIRS)
  f = ifjax.fold_batchnorm(v, spec)
  out = ifjax.intra_fuse(v, spec, 0.5, groups="c1")
  pf = f["params"]
  ref_p, ref_c, *_ = reference_intra_fusion([(pf["Conv_1"]["kernel"], 3), (pf["BatchNorm_1"]["bias"], 0)],
                                            [(pf["Dense_0"]["kernel"], 0)], 0.5)
  np.testing.assert_allclose(out["params"]["Conv_1"]["kernel"], ref_p[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["params"]["BatchNorm_1"]["bias"], ref_p[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["params"]["Dense_0"]["kernel"], ref_c[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["params"]["BatchNorm_1"]["scale"], np.ones(4))
  np.testing.assert_array_equal(out["batch_stats"]["BatchNorm_1"]["mean"], np.zeros(4))
  # group c0 was not selected: only BN-folded
  np.testing.assert_array_equal(out["params"]["Conv_0"]["kernel"], f["params"]["Conv_0"]["kernel"])


def test_bn_arrays_listed_in_group_and_in_batchnorms(rng):
  """Torch-Pruning groups contain their BNs. Listing the BN arrays as members as well as in ``spec.batchnorms``
  must either be rejected or give a consistently reduced model, never BN arrays of a third width."""
  v = bn_variables(rng)
  group = ifjax.Group("c1", [("params/Conv_1/kernel", 3), ("params/BatchNorm_1/bias", 0),
                             ("params/BatchNorm_1/scale", 0), ("batch_stats/BatchNorm_1/mean", 0),
                             ("batch_stats/BatchNorm_1/var", 0)],
                      [("params/Dense_0/kernel", 0)])
  spec = ifjax.Spec((group,), BN_PAIRS)
  try:
    out = ifjax.intra_fuse(v, spec, 0.75, normalization="barycentric")
  except ValueError:
    return  # rejected: fine
  shapes = {p: np.shape(a) for p, a in _flat(out).items() if "BatchNorm_1" in p}
  assert out["params"]["Conv_1"]["kernel"].shape[-1] == 2
  assert set(shapes.values()) == {(2,)}, shapes


# -- 9. concatenation offsets -----------------------------------------------------------------
def test_concatenated_groups(rng, rel_err):
  d_in, kA, kB, d_out = 4, 3, 4, 3
  nA, nB = 2 * kA, 2 * kB
  permA, pairA = _pairs(rng, kA)
  permB, pairB = _pairs(rng, kB)
  C = np.concatenate([_split(rng.normal(size=(kA, d_out)), 0, permA, rng, 1e-4),
                      _split(rng.normal(size=(kB, d_out)), 0, permB, rng, 1e-4)])
  v = _f32({"params": {
      "A": {"kernel": _dup(rng.normal(size=(d_in, kA)), 1, permA), "bias": _dup(0.3 * rng.normal(size=kA), 0, permA)},
      "B": {"kernel": _dup(rng.normal(size=(d_in, kB)), 1, permB), "bias": _dup(0.3 * rng.normal(size=kB), 0, permB)},
      "C": {"kernel": C, "bias": rng.normal(size=d_out)},
  }})
  C = v["params"]["C"]["kernel"]
  spec = ifjax.Spec((
      ifjax.Group("A", [("params/A/kernel", 1), ("params/A/bias", 0)], [("params/C/kernel", 0, 0)]),
      ifjax.Group("B", [("params/B/kernel", 1), ("params/B/bias", 0)], [("params/C/kernel", 0, nA)]),
  ))
  assert spec.validate(v) == {"A": nA, "B": nB}

  def apply(var, x):
    p = _np64(var["params"])
    h = np.concatenate([np.maximum(x @ p["A"]["kernel"] + p["A"]["bias"], 0),
                        np.maximum(x @ p["B"]["kernel"] + p["B"]["bias"], 0)], axis=1)
    return h @ p["C"]["kernel"] + p["C"]["bias"]

  x = rng.normal(size=(16, d_in))
  scores = {"A": _pair_scores(rng, pairA), "B": _pair_scores(rng, pairB)}
  pl = ifjax.plan(v, spec, 0.5, importance=scores, normalization="barycentric")
  out = ifjax.apply_plan(v, spec, pl)
  Cn = np.asarray(out["params"]["C"]["kernel"])
  assert Cn.shape == (kA + kB, d_out)
  np.testing.assert_allclose(Cn[:kA], np.asarray(pl["A"].consumer_map) @ C[:nA], atol=1e-6)
  np.testing.assert_allclose(Cn[kA:], np.asarray(pl["B"].consumer_map) @ C[nA:], atol=1e-6)
  assert rel_err(apply(out, x), apply(v, x)) < 1e-5
  # the concat group's neuron vectors use only its own segment: same plan as the reference on that slice
  _, ref_c, t, keep, _ = reference_intra_fusion([(v["params"]["B"]["kernel"], 1)], [(C[nA:], 0)], 0.3)
  gpB = ifjax.plan(v, spec, 0.3, groups="B")["B"]
  np.testing.assert_array_equal(gpB.keep, keep)
  np.testing.assert_allclose(gpB.transport, t, atol=1e-6)

  only_b = ifjax.intra_fuse(v, spec, 0.5, groups="B", importance=scores, normalization="barycentric")
  Cb = np.asarray(only_b["params"]["C"]["kernel"])
  assert Cb.shape == (nA + kB, d_out)
  np.testing.assert_array_equal(Cb[:nA], C[:nA])  # bit for bit
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(only_b["params"]["A"][name], v["params"]["A"][name])
  np.testing.assert_allclose(Cb[nA:], np.asarray(pl["B"].consumer_map) @ C[nA:], atol=1e-6)
  assert rel_err(apply(only_b, x), apply(v, x)) < 1e-5


# -- 10. dtypes and purity ----------------------------------------------------------------------
def test_bfloat16_roundtrip(rng):
  v32 = mlp_variables(rng, [5, 10, 8, 3])
  spec = mlp_spec(3)
  v16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), v32)
  up = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v16)  # the same values in float32
  for fn in (lambda v: ifjax.intra_fuse(v, spec, 0.5, normalization="barycentric"),
             lambda v: ifjax.prune(v, spec, 0.5)):
    o16, o32 = fn(v16), fn(up)
    assert jax.tree.structure(o16) == jax.tree.structure(o32)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(o16))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(o32))
    assert jax.tree.map(jnp.shape, o16) == jax.tree.map(jnp.shape, o32)
    # float32 accumulation, one bf16 rounding at the end
    _tree_allclose(o16, jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), o32), rtol=1e-2, atol=1e-2)
  p16, p32 = ifjax.plan(v16, spec, 0.5), ifjax.plan(up, spec, 0.5)
  for g in spec.names:
    np.testing.assert_array_equal(p16[g].keep, p32[g].keep)
    np.testing.assert_allclose(p16[g].transport, p32[g].transport, atol=1e-7)


def test_inputs_never_mutated_and_output_is_new(rng):
  v = mlp_variables(rng, [5, 10, 8, 3])
  spec = mlp_spec(3)
  before = copy.deepcopy(v)
  leaves_before = [id(a) for a in jax.tree.leaves(v)]
  outs = [ifjax.intra_fuse(v, spec, 0.5), ifjax.intra_fuse(v, spec, 0.5, normalization="barycentric"),
          ifjax.prune(v, spec, 0.5), ifjax.intra_fuse(v, spec, 0.5, groups="h0"), ifjax.fold_batchnorm(v, spec)]
  jax.tree.map(np.testing.assert_array_equal, v, before)
  assert [id(a) for a in jax.tree.leaves(v)] == leaves_before
  vb = bn_variables(rng)  # NumPy arrays with BatchNorms: folding must not write into them
  bb = copy.deepcopy(vb)
  spec_b = ifjax.Spec(BN_GROUPS, BN_PAIRS)
  outs_b = [ifjax.intra_fuse(vb, spec_b, 0.5), ifjax.fold_batchnorm(vb, spec_b)]
  jax.tree.map(np.testing.assert_array_equal, vb, bb)
  for src, out in [(v, o) for o in outs] + [(vb, o) for o in outs_b]:
    assert out is not src
    for coll in src:
      assert out[coll] is not src[coll]
      assert all(out[coll][k] is not src[coll][k] for k in src[coll])


# -- 11. ratio semantics and group selection -------------------------------------------------------
def test_kept_count():
  assert ifjax.kept_count(512, 0.3) == 358
  for n in (1, 7, 64, 100, 256, 512, 2048):
    for r in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):
      assert ifjax.kept_count(n, r) == int(n * (1 - r))


def test_ratio_dict_and_group_selection(rng):
  v, spec = mlp_variables(rng, [5, 10, 8, 3]), mlp_spec(3)  # network order h0, h1; paper index 0 == h1
  assert spec.paper_index("h1") == 0 and spec.paper_index("h0") == 1

  def widths(out):
    return ifjax.widths(out, spec)

  assert widths(v) == {"h0": 10, "h1": 8}
  assert widths(ifjax.intra_fuse(v, spec, 0.3)) == {"h0": 7, "h1": 5}
  assert widths(ifjax.intra_fuse(v, spec, {"h0": 0.5})) == {"h0": 5, "h1": 8}
  assert widths(ifjax.intra_fuse(v, spec, {0: 0.5})) == {"h0": 10, "h1": 4}
  assert widths(ifjax.intra_fuse(v, spec, {1: 0.3, "h1": 0.75})) == {"h0": 7, "h1": 2}
  assert widths(ifjax.intra_fuse(v, spec, 0.5, groups=0)) == {"h0": 10, "h1": 4}
  assert widths(ifjax.intra_fuse(v, spec, 0.5, groups="h0")) == {"h0": 5, "h1": 8}
  assert widths(ifjax.prune(v, spec, 0.5, groups=[1])) == {"h0": 5, "h1": 8}
  assert list(ifjax.plan(v, spec, 0.5, groups=0)) == ["h1"]
  assert list(ifjax.plan(v, spec, 0.5, groups=[0, "h0"])) == ["h0", "h1"]  # network order
  assert list(ifjax.plan(v, spec, {0: 0.5}, groups=["h0"])) == []  # ratio dict and selection intersect

  # a group left alone is bit-identical; only its consumer/producer neighbours change shape
  out = ifjax.intra_fuse(v, spec, {"h1": 0.5})
  np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(out["params"]["Dense_0"]["bias"], v["params"]["Dense_0"]["bias"])
  assert out["params"]["Dense_1"]["kernel"].shape == (10, 4)
  np.testing.assert_array_equal(out["params"]["Dense_2"]["bias"], v["params"]["Dense_2"]["bias"])

  with pytest.raises(ValueError):
    ifjax.intra_fuse(v, spec, 1.0)
  with pytest.raises(ValueError):
    ifjax.intra_fuse(v, spec, -0.1)
  with pytest.raises(ValueError, match="at least one"):
    ifjax.intra_fuse(v, spec, {"h1": 0.9})  # floor(8 * 0.1) = 0
  with pytest.raises(ValueError):
    ifjax.intra_fuse(v, spec, 0.5, groups=2)
  with pytest.raises(ValueError):
    ifjax.intra_fuse(v, spec, {"nope": 0.5})


# -- 12. importance masses --------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_importance_marginals(solver, rng):
  v, spec = mlp_variables(rng, [8, 32, 6]), mlp_spec(2)
  tol = 1e-6 if solver == "exact" else 1e-3
  eps = 1e-3 if solver == "exact" else 1e-2  # (Sinkhorn at 1e-2 converges within the default 5000 iterations)
  for source_mass, target_mass in (("importance", "importance"), ("importance", "uniform"), ("uniform", "importance")):
    gp = ifjax.plan(v, spec, 0.3, solver=solver, source_mass=source_mass, target_mass=target_mass,
                    epsilon=eps, fallback="raise")["h0"]
    imp, keep, t = np.asarray(gp.importance, np.float64), np.asarray(gp.keep), np.asarray(gp.transport, np.float64)
    n, m = t.shape
    a = imp / imp.sum() if source_mass == "importance" else np.full(n, 1 / n)
    b = imp[keep] / imp[keep].sum() if target_mass == "importance" else np.full(m, 1 / m)
    np.testing.assert_allclose(t.sum(1), a, atol=tol)
    np.testing.assert_allclose(t.sum(0), b, atol=tol)
    assert float(gp.marginal_error) <= tol
    # consumer map still redistributes every source fully; barycentric producer rows are averages
    np.testing.assert_allclose(np.sum(gp.consumer_map, 0), 1.0, atol=1e-4)
  gp = ifjax.plan(v, spec, 0.3, solver=solver, source_mass="importance", normalization="barycentric",
                  epsilon=eps, fallback="raise")["h0"]
  np.testing.assert_allclose(np.sum(gp.producer_map, 1), 1.0, atol=1e-4)


# -- depthwise: expand conv -> BN -> ReLU6 -> depthwise conv -> BN -> ReLU6 -> project conv ----------------
class _MBConv(nn.Module):
  inner: int

  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(use_running_average=True, epsilon=1e-3, name=name)
    y = nn.relu6(bn("expand_bn")(nn.Conv(self.inner, (1, 1), use_bias=False, name="expand")(x)))
    y = nn.relu6(bn("dw_bn")(nn.Conv(self.inner, (3, 3), feature_group_count=self.inner, use_bias=False,
                                      name="dw")(y)))
    return nn.Conv(4, (1, 1), name="project")(y)


def test_depthwise_duplicates_preserve_function(rng, rel_err):
  """The depthwise kernel is fused with the same map as its channels: merging exact duplicate channels
  through expand -> depthwise -> project keeps the function (barycentric); selecting the depthwise
  kernels only, as the authors' code does, would be the same here, but not for non-duplicates."""
  c_in, k = 3, 4
  perm, pair = _pairs(rng, k)
  dup = lambda a, axis: _dup(a, axis, perm)
  v = _f32({"params": {
      "expand": {"kernel": dup(rng.normal(size=(1, 1, c_in, k)), 3)},
      "expand_bn": {"scale": dup(rng.uniform(0.5, 1.5, k), 0), "bias": dup(rng.normal(size=k), 0)},
      "dw": {"kernel": dup(rng.normal(size=(3, 3, 1, k)), 3)},
      "dw_bn": {"scale": dup(rng.uniform(0.5, 1.5, k), 0), "bias": dup(rng.normal(size=k), 0)},
      "project": {"kernel": _split(rng.normal(size=(1, 1, k, 4)), 2, perm, rng, 1e-4), "bias": rng.normal(size=4)}},
      "batch_stats": {"expand_bn": {"mean": dup(0.3 * rng.normal(size=k), 0), "var": dup(rng.uniform(0.5, 2, k), 0)},
                      "dw_bn": {"mean": dup(0.3 * rng.normal(size=k), 0), "var": dup(rng.uniform(0.5, 2, k), 0)}}})
  x = jnp.asarray(rng.normal(size=(2, 6, 6, c_in)), jnp.float32)
  spec = ifjax.trace_spec(_MBConv(2 * k).apply, v, x)
  (g,) = spec.groups
  assert ("params/dw/kernel", 3, 0) in g.producers
  assert set(spec.batchnorms) == {("expand", "expand_bn", 1e-3), ("dw", "dw_bn", 1e-3)}
  out = ifjax.intra_fuse(v, spec, 0.5, importance={g.name: _pair_scores(rng, pair)}, normalization="barycentric")
  assert out["params"]["dw"]["kernel"].shape == (3, 3, 1, k)
  assert rel_err(_MBConv(k).apply(out, x), _MBConv(2 * k).apply(v, x)) < 1e-5
