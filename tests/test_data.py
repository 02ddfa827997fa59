"""ifjax.data: readers of the real data files, caching, preprocessing, batching, TFDS error paths."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ifjax import data

LOSSLESS_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("ifjax-cache")


@pytest.fixture(autouse=True)
def _cache(monkeypatch, session_cache):
  """Decoded arrays go to a per-session temporary cache, never to ~/.cache."""
  monkeypatch.setenv("IFJAX_CACHE", str(session_cache))


def test_data_dir_default_and_env(monkeypatch, tmp_path):
  """$IFJAX_DATA; else a source checkout's ../shared/data where it exists; else the user data directory (an
  installed wheel never looks beside site-packages)."""
  monkeypatch.delenv("IFJAX_DATA", raising=False)
  monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
  shared = Path(data.__file__).resolve().parent.parent.parent / "shared" / "data"
  assert data.data_dir() == (shared if shared.is_dir() else tmp_path / "xdg" / "ifjax")
  checkout = tmp_path / "clone"  # a source checkout with ../shared/data beside it
  (checkout / "ifjax").mkdir(parents=True)
  (checkout / "pyproject.toml").touch()
  (tmp_path / "shared" / "data").mkdir(parents=True)
  monkeypatch.setattr(data, "__file__", str(checkout / "ifjax" / "data.py"))
  assert data.data_dir() == tmp_path / "shared" / "data"
  (checkout / "pyproject.toml").unlink()  # site-packages: no pyproject.toml beside the package
  assert data.data_dir() == tmp_path / "xdg" / "ifjax"
  monkeypatch.delenv("XDG_DATA_HOME")
  assert data.data_dir() == Path.home() / ".local" / "share" / "ifjax"
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  assert data.data_dir() == tmp_path
  monkeypatch.setenv("IFJAX_CACHE", str(tmp_path / "c"))
  assert data.cache_dir() == tmp_path / "c"


def test_import_is_lazy():
  code = ("import sys, ifjax.data\n"
          "bad = [m for m in ('PIL', 'tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.requires_data("cifar10-jpeg.zip")
def test_cifar10_test_split():
  images, labels = data.cifar10_jpeg("test")
  assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 1000))  # sorted member names: class by class
  assert 60 < images.mean() < 180 and images.std() > 30


@pytest.mark.requires_data("cifar10-jpeg.zip")
def test_cifar10_limit_is_balanced_prefix():
  full, full_labels = data.cifar10_jpeg("test")
  images, labels = data.cifar10_jpeg("test", limit=30)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
  np.testing.assert_array_equal(images, full[(np.arange(10)[:, None] * 1000 + np.arange(3)).ravel()])


@pytest.mark.parametrize("kwargs", [dict(split="val"), dict(limit=15), dict(limit=0), dict(limit=10010)])
def test_cifar10_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="split must be|limit must be"):
    data.cifar10_jpeg(**kwargs)


@pytest.mark.requires_data("cifar10-jpeg.zip")
def test_cifar10_cache(monkeypatch, tmp_path):
  zip_path = data.data_dir() / "cifar10-jpeg.zip"
  monkeypatch.setenv("IFJAX_CACHE", str(tmp_path / "cache"))
  first = data.cifar10_jpeg("test")
  assert len(list((tmp_path / "cache").glob("cifar10-jpeg-test-*.npy"))) == 2

  def fail(*args):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(data, "_decode_jpegs", fail)  # the second call must come from the cache
  second = data.cifar10_jpeg("test")
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  # a changed zip (new mtime) is decoded again, not served from the stale cache
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path / "data"))
  (tmp_path / "data").mkdir()
  copy = shutil.copyfile(zip_path, tmp_path / "data" / "cifar10-jpeg.zip")
  monkeypatch.setattr(data, "_decode_jpegs", lambda zf, names, shape: np.zeros((len(names), *shape), np.uint8))
  assert data.cifar10_jpeg("test")[0].max() == 0
  os.utime(copy, ns=(0, 10**18))
  monkeypatch.setattr(data, "_decode_jpegs", fail)
  with pytest.raises(AssertionError, match="decoded although cached"):
    data.cifar10_jpeg("test")


@pytest.mark.slow
@pytest.mark.requires_data("cifar10-jpeg.zip")
def test_cifar10_train_split(monkeypatch, tmp_path):
  monkeypatch.setenv("IFJAX_CACHE", str(tmp_path))
  images, labels = data.cifar10_jpeg("train")
  assert images.shape == (50000, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), [5000] * 10)
  monkeypatch.setattr(data, "_decode_jpegs", lambda *args: pytest.fail("decoded although cached"))
  cached = data.cifar10_jpeg("train")
  np.testing.assert_array_equal(cached[0], images)


@pytest.mark.requires_data("cifar10-lossless-test20", "cifar10-jpeg.zip")
def test_cifar10_lossless_labels_and_jpeg_counterparts():
  images, labels = data.cifar10_lossless()
  assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  assert labels.tolist() == LOSSLESS_LABELS
  jpeg, _ = data.cifar10_jpeg("test")
  for i, c in enumerate(LOSSLESS_LABELS):
    k = LOSSLESS_LABELS[:i].count(c)  # PNG i is test/<class c>/k.jpg
    diff = np.abs(images[i].astype(np.int16) - jpeg[1000 * c + k]).mean()
    assert diff < 10, (i, c, k, diff)


@pytest.mark.requires_data("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz")
def test_mnist_test():
  images, labels = data.mnist_test()
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.int32
  assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert images.max() == 255 and np.median(images) == 0


def _idx_gz(path: Path, header: tuple[int, ...], payload: bytes):
  path.write_bytes(gzip.compress(struct.pack(f">{len(header)}i", *header) + payload))


@pytest.mark.parametrize("which, corruption, message", [
    ("images", "not gzip", "not a readable gzip file"),
    ("images", "magic", "magic number 2049, expected 2051"),
    ("images", "truncated", "data bytes for count 10000"),
    ("labels", "not gzip", "not a readable gzip file"),
    ("labels", "magic", "magic number 2051, expected 2049"),
    ("labels", "truncated", "data bytes for count 10000"),
])
def test_mnist_corrupt(monkeypatch, tmp_path, which, corruption, message):
  (tmp_path / "mnist").mkdir()
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  files = {"images": (tmp_path / "mnist/t10k-images-idx3-ubyte.gz", (2051, 10000, 28, 28), 784),
           "labels": (tmp_path / "mnist/t10k-labels-idx1-ubyte.gz", (2049, 10000), 1)}
  for path, header, size in files.values():
    _idx_gz(path, header, bytes(10000 * size))
  path, header, size = files[which]
  if corruption == "not gzip":
    path.write_bytes(b"this is not gzip data")
  elif corruption == "magic":
    _idx_gz(path, (4100 - header[0], *header[1:]), bytes(10000 * size))
  else:
    _idx_gz(path, header, bytes(9999 * size))
  with pytest.raises(ValueError, match=message) as info:
    data.mnist_test()
  assert str(path) in str(info.value)


@pytest.mark.requires_data("imagenet-sample.zip")
def test_imagenet_sample(monkeypatch):
  zip_path = data.data_dir() / "imagenet-sample.zip"
  images, labels = data.imagenet_sample()
  assert images.shape == (1000, 224, 224, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(np.sort(labels), np.arange(1000))
  with zipfile.ZipFile(zip_path) as zf:
    names = sorted(zf.namelist())
  first = names.index(next(n for n in names if n.startswith("n01440764_")))
  assert labels[first] == 0 and labels[names.index("n15075141_toilet_tissue.JPEG")] == 999
  # cached now; a limited read decodes only its prefix and agrees with the full set
  with monkeypatch.context() as m:
    m.setattr(data, "_resize_crop", lambda *a: pytest.fail("decoded although cached"))
    np.testing.assert_array_equal(data.imagenet_sample()[0], images)
  small, small_labels = data.imagenet_sample(limit=3)
  np.testing.assert_array_equal(small, images[:3])
  np.testing.assert_array_equal(small_labels, labels[:3])


def test_imagenet_bad_arguments():
  with pytest.raises(ValueError, match="0 < size <= resize"):
    data.imagenet_sample(size=300)
  with pytest.raises(ValueError, match=r"limit must be an integer in \[1, 1000\]"):
    data.imagenet_sample(limit=0)


@pytest.mark.parametrize("reader, rel", [
    (lambda: data.cifar10_jpeg("test"), "cifar10-jpeg.zip"),
    (lambda: data.cifar10_jpeg("test", limit=10), "cifar10-jpeg.zip"),
    (data.cifar10_lossless, "cifar10-lossless-test20"),
    (data.mnist_test, "mnist/t10k-images-idx3-ubyte.gz"),
    (data.imagenet_sample, "imagenet-sample.zip"),
])
def test_missing_data(monkeypatch, tmp_path, reader, rel):
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  with pytest.raises(data.DataMissingError) as info:
    reader()
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert str(tmp_path / rel) in message and "IFJAX_DATA" in message and "GitHub" in message


@pytest.mark.parametrize("model, shape, expected", [
    ("resnet20", (5, 28, 28, 1), "(N, 32, 32, 3)"),
    ("resnet56", (5, 32, 32, 1), "(N, 32, 32, 3)"),
    ("resnet110", (5, 3, 32, 32), "(N, 32, 32, 3)"),
    ("resnet20", (32, 32, 3), "(N, 32, 32, 3)"),
    ("lenet5", (5, 28, 28, 3), "(N, 28, 28, 1)"),
    ("efficientnet_lite0", (5, 256, 256, 3), "(N, 224, 224, 3)"),
])
def test_preprocess_rejects_shapes(model, shape, expected):
  with pytest.raises(ValueError) as info:
    data.preprocess(model, np.zeros(shape, np.uint8))
  message = str(info.value)
  assert f"{model} expects images of shape {expected} (NHWC, uint8 " in message and f"got {shape}" in message


def test_preprocess_rejects_model_and_values():
  with pytest.raises(ValueError, match=r"unknown model 'resnet21'; known: \[.*'lenet5'.*'resnet20'"):
    data.preprocess("resnet21", np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"float images in \[0, 255\], got values in \[0.0, 256.0\]"):
    data.preprocess("resnet20", np.linspace(0, 256, 3072).reshape(1, 32, 32, 3))
  with pytest.raises(ValueError, match="got dtype int64"):
    data.preprocess("resnet20", np.zeros((1, 32, 32, 3), np.int64))


def test_preprocess_values():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  out = data.preprocess("resnet20", x)
  assert out.dtype == np.float32 and out.shape == x.shape
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(data.preprocess("resnet20", x.astype(np.float32)), out)
  np.testing.assert_array_equal(data.preprocess("cifar_resnet", x), out)
  digits = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_allclose(data.preprocess("lenet5", digits), digits / 255.0, rtol=1e-6)
  assert set(data.MODEL_PREPROCESS.values()) <= set(data.PREPROCESS)
  for key, cfg in data.PREPROCESS.items():
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["shape"][-1], key


def test_batches():
  images, labels = np.arange(10)[:, None] * np.ones((1, 3)), np.arange(10)
  got = list(data.batches(images, labels, 4))
  assert [len(y) for _, y in got] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), images)
  np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    data.batches(images, labels, 0)
  with pytest.raises(ValueError, match="10 images but 9 labels"):
    data.batches(images, labels[:9], 4)


def test_tfds_errors_and_no_download(tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; supported: \['cifar10', 'cifar100', 'imagenet2"):
    data.tfds_dataset("mnist", "test", data_dir=tmp_path)
  with pytest.raises(ValueError, match="imagenet2012 cannot be downloaded automatically.*manual_dir"):
    data.tfds_dataset("imagenet2012", "validation", data_dir=tmp_path, download=True)
  pytest.importorskip("tensorflow_datasets")
  for name in ("cifar10", "imagenet2012"):
    with pytest.raises(data.DataMissingError, match=f"'{name}' is not prepared in {tmp_path}.*download=True"):
      data.tfds_dataset(name, "test", data_dir=tmp_path)
  assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing was downloaded or written


def test_python_docs_splits_share_no_paragraph_or_sentence():
  import re
  paragraphs = {s: {" ".join(p.split()) for d in data.python_docs(s) for p in re.split(r"\n\s*\n", d)}
                for s in ("calibration", "evaluation")}
  assert len(paragraphs["calibration"]) > 100 and len(paragraphs["evaluation"]) > 300
  assert not paragraphs["calibration"] & paragraphs["evaluation"]
  cal, ev = data.python_docs_sentences("calibration"), data.python_docs_sentences("evaluation")
  assert len(cal) >= 256 and len(ev) >= 256 and not set(cal) & set(ev)
  assert all(s[0].isupper() and s.endswith(".") for s in ev)
  with pytest.raises(ValueError, match="split must be"):
    data.python_docs("train")
