"""Merging one group's neurons other ways than Intra-Fusion's transport, and repairing merged channels.

Pure NumPy on one group (the host path of :func:`ifjax.plan`); each function returns the (m, n) producer and
consumer maps of a :class:`ifjax.GroupPlan`, or what modifies them:

* :func:`neuron_merging_maps`: Neuron Merging (Kim et al., NeurIPS 2020). The kept neurons keep their input
  weights; each pruned neuron whose producer vector is a near-multiple of a kept one (cosine >= threshold) is
  absorbed by that neuron's consumer column, scaled by the norm ratio. For ReLU, ``relu(s * z) = s * relu(z)``
  (s > 0), so an exact positive multiple is merged without changing the function.
* :func:`folding_maps`: Model Folding (Wang et al., ICLR 2025): k-means clusters of the producer vectors;
  a cluster's producers are averaged and its consumer columns summed.
* :func:`thresholded_transport`: an OT plan restricted to pairs closer than a cosine threshold; sources
  with no such target are pruned.
* :func:`repair_statistics`: data-free REPAIR (Jordan et al., 2023) of merged channels. Averaging k channels
  of correlation rho shrinks the deviation by sqrt((1 + (k - 1) rho) / k); from the BN statistics (each
  channel's mean and deviation) and a correlation estimate, each merged channel is rescaled about its
  predicted mean to the deviation its sources had.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def unit_rows(v: npt.ArrayLike) -> np.ndarray:
  """(n, d) -> rows scaled to unit L2 norm (zero rows stay zero), float64."""
  v = np.asarray(v, np.float64)
  norm = np.linalg.norm(v, axis=1, keepdims=True)
  return v / np.where(norm > 0, norm, 1.0)


def selection(keep: np.ndarray, n: int) -> np.ndarray:
  """(m,) kept indices -> (m, n) float32 rows of one 1 each: the producer map that keeps neurons as they are."""
  out = np.zeros((len(keep), n), np.float32)
  out[np.arange(len(keep)), keep] = 1.0
  return out


def neuron_merging_maps(v: np.ndarray, keep: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Neuron Merging's maps for one group.

  Args:
    v: (n, d) producer vectors (folded input weights and bias of each neuron).
    keep: (m,) kept indices, ascending.
    threshold: the smallest cosine at which a pruned neuron is merged (in [-1, 1]).

  Returns:
    ``(producer_map, consumer_map)``, each (m, n): the producers are the kept rows; consumer row j has a 1 at
    ``keep[j]`` and, for each pruned neuron p merged into it, ``|v_p| / |v_keep[j]|`` at p.
  """
  n = v.shape[0]
  unit = unit_rows(v)
  norms = np.linalg.norm(np.asarray(v, np.float64), axis=1)
  consumer = selection(keep, n)
  pruned = np.setdiff1d(np.arange(n), keep)
  if len(pruned):
    cos = unit[pruned] @ unit[keep].T  # (n - m, m)
    best = np.argmax(cos, axis=1)
    merged = (cos[np.arange(len(pruned)), best] >= threshold) & (norms[keep][best] > 0)
    rows, sources = best[merged], pruned[merged]
    consumer[rows, sources] = (norms[sources] / norms[keep][rows]).astype(np.float32)
  return selection(keep, n), consumer


def folding_maps(v: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Model Folding's maps from a clustering of one group's neurons.

  Args:
    v: (n, d) producer vectors (only their count is used).
    labels: (n,) cluster of each neuron, m distinct values.
    scores: (n,) importance; the most important member represents its cluster (its index is the ``keep``
      entry, e.g. for the BN reset of :func:`ifjax.recalibrate_batchnorm`).

  Returns:
    ``(keep, producer_map, consumer_map)``: keep (m,) the representatives, ascending; producer row j averages
    the members of the cluster of ``keep[j]``, consumer row j sums them.
  """
  n = v.shape[0]
  clusters = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  reps = [int(members[np.argmax(scores[members])]) for members in clusters]
  order = np.argsort(reps)
  keep = np.asarray(reps, np.int32)[order]
  producer, consumer = np.zeros((len(keep), n), np.float32), np.zeros((len(keep), n), np.float32)
  for j, c in enumerate(order):
    producer[j, clusters[c]] = 1.0 / len(clusters[c])
    consumer[j, clusters[c]] = 1.0
  return keep, producer, consumer


def thresholded_transport(t: np.ndarray, unit: np.ndarray, keep: np.ndarray, threshold: float) -> np.ndarray:
  """(n, m) OT plan with every entry from a neuron other than the target itself removed where the two
  neurons' cosine (``unit``: (n, d) unit rows) is below ``threshold``; a source left without mass is pruned."""
  t = np.array(t, np.float32)
  cos = unit @ unit[keep].T
  far = cos < threshold
  far[keep, np.arange(len(keep))] = False  # a kept neuron always stays itself
  t[far] = 0.0
  return t


def repair_statistics(producer_map: npt.ArrayLike, mean: npt.ArrayLike, sd: npt.ArrayLike,
                      corr: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """Data-free REPAIR of merged channels: per-row scale and shift of a producer map.

  Merged channel j is ``z_j = P[j] @ z`` (z: the group's folded pre-activations, mean ``mean``, deviation
  ``sd``, correlation ``corr``). Its predicted mean is ``P[j] @ mean`` and its predicted variance
  ``P[j] (corr * sd sd^T) P[j]^T``; its sources, were they one neuron (correlation 1), would give it the
  deviation ``P[j] @ |sd|``. ``scale * z_j + shift`` has that deviation and keeps the mean. Rows with one source
  are left alone (scale 1, shift 0); so is a row whose predicted deviation is not positive.

  Args:
    producer_map: (m, n).
    mean: (n,) channel means.
    sd: (n,) deviations (>= 0).
    corr: (n, n) correlation estimate.

  Returns:
    ``(scale, shift)``, each (m,) float32.
  """
  p = np.asarray(producer_map, np.float64)
  sd = np.abs(np.asarray(sd, np.float64))
  cov = np.asarray(corr, np.float64) * np.outer(sd, sd)
  predicted = np.sqrt(np.maximum(np.einsum("jn,nk,jk->j", p, cov, p), 0.0))
  target = np.abs(p) @ sd
  single = (p != 0).sum(axis=1) <= 1
  scale = np.where(single | (predicted <= 1e-12 * np.maximum(target, 1e-30)), 1.0,
                   target / np.where(predicted > 0, predicted, 1.0))
  shift = (1.0 - scale) * (p @ np.asarray(mean, np.float64))
  return scale.astype(np.float32), shift.astype(np.float32)
