"""Real pretrained weights read without torch: reference logits, accuracy on the real test sets, bad checkpoints.

Needs ../shared/data (or IFJAX_DATA); skips with a message when it is absent.
The full-test-set accuracy checks are marked slow (``pytest -m slow``).
"""

import jax
import numpy as np
import pytest

import ifjax
from ifjax import data
from ifjax._checkpoint import CheckpointError, CheckpointMismatchError

# reference logits of ../shared/data/README.md (cifar10_00_3.png; MNIST test image 0)
REFERENCE = {
    "resnet20": [-5.3097, -0.4958, 0.8773, 23.7305, -4.1050, 4.4637, -0.2343, -5.4179, -3.7118, -9.8822],
    "resnet56": [-5.5256, -1.5469, -0.7158, 19.4394, -5.0977, 3.0219, -1.5109, -0.9350, -1.7958, -5.4049],
    "lenet5": [-4.9248, -1.6787, 1.7533, 2.3358, -7.6406, -3.2882, -22.0243, 14.6021, -1.9173, 2.2584],
}


def _accuracy(module, variables, x, y, batch=1000):
  predict = jax.jit(lambda v, xb: module.apply(v, xb).argmax(-1))
  correct = sum(int((np.asarray(predict(variables, xb)) == yb).sum()) for xb, yb in data.batches(x, y, batch))
  return 100.0 * correct / len(y)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.requires_data("cifar10-lossless-test20", models=("resnet20", "resnet56"))
def test_cifar_resnet_reference_logits_and_lossless_images(name):
  module, spec, v = ifjax.models.pretrained(name)
  x, y = data.cifar10_lossless()
  logits = np.asarray(module.apply(v, data.preprocess(name, x)))
  np.testing.assert_allclose(logits[0], REFERENCE[name], atol=2e-3)
  assert (logits.argmax(-1) == y).sum() == 20
  spec.validate(v)


@pytest.mark.requires_data("mnist", models=("lenet5",))
def test_lenet5_reference_logits_and_mnist_accuracy():
  module, spec, v = ifjax.models.pretrained("lenet5")
  x, y = data.mnist_test()
  x = data.preprocess("lenet5", x)
  np.testing.assert_allclose(np.asarray(module.apply(v, x[:1]))[0], REFERENCE["lenet5"], atol=2e-3)
  assert abs(_accuracy(module, v, x, y) - 98.9) <= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("name,target", [("resnet20", 81.0), ("resnet56", 83.2)])
@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20", "resnet56"))
def test_cifar_resnet_accuracy_on_the_jpeg_test_set(name, target):
  module, _, v = ifjax.models.pretrained(name)
  x, y = data.cifar10_jpeg("test")
  assert abs(_accuracy(module, v, data.preprocess(name, x), y) - target) <= 0.3


@pytest.mark.requires_data("cifar10-lossless-test20", models=("resnet20",))
def test_fusion_of_a_real_model_keeps_the_lossless_images():
  """Intra-Fusion of one internal group of the real ResNet20 at 30% still classifies most of the 20 images,
  and the folded dense model is the same function as the original."""
  module, spec, v = ifjax.models.pretrained("resnet20")
  x, y = data.cifar10_lossless()
  x = data.preprocess("resnet20", x)
  np.testing.assert_allclose(module.apply(ifjax.fold_batchnorm(v, spec), x), module.apply(v, x), atol=1e-3)
  pl = ifjax.plan(v, spec, 0.3, groups=["layer3_2/conv1"])
  small, _ = ifjax.models.get("resnet20", widths=ifjax.widths(v, spec, pl))
  logits = small.apply(ifjax.apply_plan(v, spec, pl), x)
  assert (np.asarray(logits).argmax(-1) == y).sum() >= 18


@pytest.mark.requires_data(models=("resnet20", "lenet5"))
def test_checkpoint_of_another_architecture_lists_the_differences():
  with pytest.raises(CheckpointMismatchError) as e:
    ifjax.models.pretrained("resnet56", ifjax.models.checkpoint_path("resnet20"))
  assert "layer1.3.conv1.weight" in e.value.missing and "180 key(s) missing" in str(e.value)
  with pytest.raises(CheckpointMismatchError) as e:
    ifjax.models.pretrained("resnet20", ifjax.models.checkpoint_path("lenet5"))
  assert "unexpected" in str(e.value) and "linear1.weight" in str(e.value)


@pytest.mark.requires_data(models=("resnet20",))
def test_missing_or_corrupt_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"resnet20-12fca82f\.th.*IFJAX_DATA"):
    ifjax.models.pretrained("resnet20")
  src = ifjax.models.checkpoint_path("resnet20")
  monkeypatch.delenv("IFJAX_DATA")
  real = ifjax.models.checkpoint_path("resnet20")
  src.parent.mkdir(parents=True)
  src.write_bytes(real.read_bytes()[:50_000])
  with pytest.raises(CheckpointError, match="truncated"):
    ifjax.models.pretrained("resnet20", src)


# Cells of docs/results/resnet20_l1 (2,000 class-balanced JPEG test images, exact solver). Performance
# work must not move them: (paper group index, sparsity, plan options, accuracy %).
PINNED_RESNET20_CELLS = [
    (13, 0.7, dict(fuse=False), 75.90),
    (13, 0.7, dict(normalization="paper"), 72.30),
    (13, 0.7, dict(normalization="barycentric"), 77.45),
    (5, 0.5, dict(normalization="paper"), 71.90),
    (5, 0.7, dict(normalization="barycentric"), 36.50),
    (2, 0.5, dict(normalization="paper"), 64.60),
]


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_resnet20_grid_cells_are_pinned():
  module, spec, v = ifjax.models.pretrained("resnet20")
  x, y = data.cifar10_jpeg("test", limit=2000)
  x = data.preprocess("resnet20", x)
  predict = jax.jit(lambda v, xb: module.apply(v, xb).argmax(-1))
  for group, s, options, expected in PINNED_RESNET20_CELLS:
    pl = ifjax.plan(v, spec, s, groups=group, **options)
    fused = ifjax.apply_plan(v, spec, pl, keep_shapes=True)  # one compiled model for every cell
    hits = sum(int((np.asarray(predict(fused, xb)) == yb).sum()) for xb, yb in data.batches(x, y, 1000))
    assert abs(100.0 * hits / len(y) - expected) < 0.01, (group, s, options)


def test_shipped_digits_cnn_prints_the_readme_table():
  """The main job's weights ship with ifjax, so its table depends on no training run: the dense model and the
  README's "all groups at 0.3" row, as counts of the 450 held-out digits (argmaxes, the same under XLA's AVX2
  and SSE4.2 caps and OpenBLAS's Haswell kernels)."""
  import digits  # experiments/ is on pytest's pythonpath (pyproject.toml)

  module, spec, variables = ifjax.models.pretrained("digits_cnn")
  assert ifjax.models.checkpoint_path("digits_cnn").is_file()
  _, x, _, y = digits.load_digits()

  def correct(v):
    small, _ = ifjax.models.get("digits_cnn", widths=ifjax.widths(v, spec))
    return int(np.sum(np.argmax(small.apply(v, x, train=False), -1) == y))

  assert correct(variables) == 449
  assert correct(ifjax.prune(variables, spec, 0.3)) == 177  # 39.33%
  assert correct(ifjax.intra_fuse(variables, spec, 0.3)) == 413  # 91.78%
  assert correct(ifjax.intra_fuse(variables, spec, 0.3, normalization="barycentric")) == 336  # 74.67%
