"""ifjax.analysis: output preservation, the loss-landscape plane and the accuracy grid, on a tiny CNN."""

from __future__ import annotations

import importlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import ifjax
from ifjax import analysis


class TinyCNN(nn.Module):
  """(N, 8, 8, 3) -> (N, 3): conv(6) - BN - relu - conv(8) - BN - relu - mean - dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, c in enumerate((6, 8)):
      x = nn.Conv(c, (3, 3), name=f"conv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
    return nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def tiny():
  module = TinyCNN()
  x = jax.random.normal(jax.random.key(0), (40, 8, 8, 3))
  variables = module.init(jax.random.key(1), x[:1])
  stats = {bn: {"mean": jax.random.uniform(jax.random.key(2 + i), s["mean"].shape, minval=-0.2, maxval=0.2),
                "var": jax.random.uniform(jax.random.key(9 + i), s["var"].shape, minval=0.5, maxval=1.5)}
           for i, (bn, s) in enumerate(variables["batch_stats"].items())}  # BNs that are not identities
  variables = {**variables, "batch_stats": stats}
  apply_fn = lambda v, xb: module.apply(v, xb)
  spec = ifjax.trace_spec(apply_fn, variables, x[:1])
  y = np.array(apply_fn(variables, x).argmax(-1))
  y[::4] = (y[::4] + 1) % 3  # not every label right, so losses and accuracies are not all 0 / 100
  return apply_fn, variables, spec, np.asarray(x), y


def _loss_and_accuracy(apply_fn, variables, x, y):
  out = np.asarray(apply_fn(variables, x), np.float64)
  logp = out - np.log(np.exp(out - out.max(1, keepdims=True)).sum(1, keepdims=True)) - out.max(1, keepdims=True)
  return -logp[np.arange(len(y)), y].mean(), 100.0 * np.mean(out.argmax(1) == y)


def test_distances_zero_for_unpruned_and_grow_with_sparsity(tiny):
  apply_fn, variables, spec, x, _ = tiny
  ref = analysis.logits(apply_fn, variables, x, batch_size=16)
  assert ref.shape == (40, 3)
  np.testing.assert_array_equal(analysis.output_distances(ref, analysis.logits(apply_fn, variables, x)), 0.0)
  d = analysis.output_preservation(apply_fn, variables, spec, [0.0, 0.5], x, batch_size=16)
  assert set(d) == {("default", 0.0), ("IF", 0.0), ("default", 0.5), ("IF", 0.5)}
  for method in ("default", "IF"):
    assert d[method, 0.0].shape == (40,)
    assert d[method, 0.0].max() < 1e-4 * np.abs(ref).max()  # ratio 0 keeps the function (BN folded)
    assert d[method, 0.5].mean() > 1e-2
  # the distances are those of the pruned model at its real, smaller shape
  small = ifjax.prune(variables, spec, 0.5)
  widths = ifjax.widths(small, spec)
  small_module = TinyCNNWidths(tuple(widths[g.name] for g in spec.groups))
  direct = analysis.output_distances(ref, np.asarray(small_module.apply(small, x)))
  np.testing.assert_allclose(d["default", 0.5], direct, rtol=1e-4, atol=1e-4)


class TinyCNNWidths(nn.Module):
  widths: tuple[int, int]

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, c in enumerate(self.widths):
      x = nn.Conv(c, (3, 3), name=f"conv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
    return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_output_distances_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(5, 3\) and \(5, 4\)"):
    analysis.output_distances(np.zeros((5, 3)), np.zeros((5, 4)))


def test_plane_basis_coordinates_reconstruct_the_anchors(rng):
  w = rng.normal(size=(3, 50))
  e1, e2, coords = analysis.plane_basis(*w)
  assert abs(e1 @ e2) < 1e-12 and np.isclose(np.linalg.norm(e1), 1) and np.isclose(np.linalg.norm(e2), 1)
  for k in range(3):
    np.testing.assert_allclose(w[0] + coords[k, 0] * e1 + coords[k, 1] * e2, w[k], atol=1e-12)
  assert coords[2, 1] > 0
  with pytest.raises(ValueError, match="collinear"):
    analysis.plane_basis(w[0], w[1], 2 * w[1] - w[0])
  with pytest.raises(ValueError, match="same point"):
    analysis.plane_basis(w[0], w[0], w[1])


def test_aligned_original_computes_the_original_function(tiny):
  apply_fn, variables, spec, x, _ = tiny
  pl = ifjax.plan(variables, spec, 0.5)
  aligned = analysis.aligned_original(variables, spec, pl)
  np.testing.assert_allclose(apply_fn(aligned, x), apply_fn(variables, x), rtol=1e-5, atol=1e-5)
  # and it is a permutation: kept neurons first, as in the keep_shapes output of default pruning
  kernel = np.asarray(aligned["params"]["conv0"]["kernel"])
  pruned = np.asarray(ifjax.prune(variables, spec, 0.5)["params"]["conv0"]["kernel"])
  np.testing.assert_allclose(kernel[..., :pruned.shape[-1]], pruned, rtol=1e-6)


def test_plane_loss_at_the_anchors_equals_their_direct_loss(tiny):
  apply_fn, variables, spec, x, y = tiny
  triplet = analysis.pruned_triplet(variables, spec, 0.5)
  plane = analysis.loss_plane(apply_fn, triplet, x, y, size=(4, 3), batch_size=16)
  assert plane.loss.shape == plane.accuracy.shape == (3, 4) and plane.u.shape == (4,) and plane.v.shape == (3,)
  direct = [_loss_and_accuracy(apply_fn, v, x, y) for v in triplet]
  np.testing.assert_allclose(plane.anchor_loss, [d[0] for d in direct], rtol=1e-4)
  np.testing.assert_allclose(plane.anchor_accuracy, [d[1] for d in direct])
  # anchor 0 is the original model, and the grid's corner point (margin 0) is exactly an anchor
  assert np.isclose(plane.anchor_loss[0], _loss_and_accuracy(apply_fn, variables, x, y)[0], rtol=1e-4)
  corner = analysis.loss_plane(apply_fn, triplet, x, y, size=2, margin=0.0, batch_size=16)
  j = int(np.argmin(np.abs(corner.u - plane.anchors[1, 0])))
  assert np.isclose(corner.loss[0, j], plane.anchor_loss[1], rtol=1e-4)
  assert len(set(np.round(plane.anchor_loss, 6))) == 3  # three different models


def test_loss_plane_rejects_anchors_of_other_shapes(tiny):
  apply_fn, variables, spec, x, y = tiny
  small = ifjax.prune(variables, spec, 0.5)
  with pytest.raises(ValueError, match="keep_shapes=True"):
    analysis.loss_plane(apply_fn, [variables, small, small], x, y)


def test_pruned_triplet_rejects_centroid_targets(tiny):
  _, variables, spec, *_ = tiny
  with pytest.raises(ValueError, match="most_important"):
    analysis.pruned_triplet(variables, spec, 0.5, target="cluster_centroid")


ROWS = [dict(group="-", group_name="-", sparsity=0.0, method="dense", accuracy=90.0),
        dict(group="all", group_name="all", sparsity=0.5, method="default", accuracy=10.0),
        dict(group="10", group_name="conv0", sparsity=0.5, method="default", accuracy=50.0),
        dict(group="10", group_name="conv0", sparsity=0.3, method="default", accuracy=70.0),
        dict(group="2", group_name="conv9", sparsity=0.3, method="IF", accuracy=80.0)]


def test_accuracy_curves_order_and_duplicates():
  curves = analysis.accuracy_curves(ROWS)
  assert list(curves) == ["2 (conv9)", "10 (conv0)", "all"]
  s, a = curves["10 (conv0)"]["default"]
  np.testing.assert_array_equal(s, [0.3, 0.5])
  np.testing.assert_array_equal(a, [70.0, 50.0])
  with pytest.raises(ValueError, match="one importance"):
    analysis.accuracy_curves(ROWS + [dict(ROWS[2], accuracy=1.0)])


def test_plots_draw_what_they_are_given(tiny, tmp_path):
  apply_fn, variables, spec, x, y = tiny
  d = analysis.output_preservation(apply_fn, variables, spec, [0.3, 0.5], x, batch_size=40)
  fig = analysis.plot_output_distances(d, bins=10, title="tiny")
  assert len(fig.axes) == 2
  assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {
      f"{m} (mean {d[m, 0.3].mean():.2f})" for m in ("default", "IF")}
  plane = analysis.loss_plane(apply_fn, analysis.pruned_triplet(variables, spec, 0.5), x, y, size=3, batch_size=40)
  fig = analysis.plot_plane(plane)
  fig.savefig(tmp_path / "plane.png")
  assert (tmp_path / "plane.png").stat().st_size > 0
  fig = analysis.plot_accuracy_grid(ROWS, cols=2)
  assert [ax.get_title() for ax in fig.axes if ax.axison] == ["2 (conv9)", "10 (conv0)", "all"]
  assert fig.axes[1].get_lines()[-1].get_ydata()[0] == 90.0  # the dense line


def test_import_ifjax_does_not_load_matplotlib():
  code = "import sys, ifjax, ifjax.analysis; assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


def _script(name):
  return importlib.import_module(name)  # experiments/ is on pytest's pythonpath (pyproject.toml)


def test_param_counts_match_the_papers_table_9():
  counts = _script("param_counts").counts
  # Table 9, ResNet18 (conv + linear weights): the same architecture, groups and rounding give the same numbers
  for s, paper in ((0.0, 11_164_352), (0.4, 4_003_668), (0.6, 1_772_832), (0.8, 442_308)):
    assert counts("resnet18", s)[0] == paper


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_analyses_script_on_a_tiny_setting(tmp_path):
  _script("analyses").main(["--limit", "40", "--groups", "0", "--sparsities", "0.3", "--planes", "10:0.5",
                            "--size", "2", "--batch-size", "40", "--out", str(tmp_path)])
  names = {p.name for p in tmp_path.iterdir()}
  assert {"resnet20_output_g0.png", "resnet20_plane_g10_s0.5.png", "resnet20_plane_g10_s0.5.npz",
          "resnet20.md"} <= names
  plane = np.load(tmp_path / "resnet20_plane_g10_s0.5.npz")
  assert plane["loss"].shape == (2, 2) and plane["anchors"].shape == (3, 2)
  report = (tmp_path / "resnet20.md").read_text()
  assert "| 0 (stream3b) | 0.3 |" in report and "| 10 (layer2_0/conv1) | 0.5 | IF |" in report
