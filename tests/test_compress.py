"""``ifjax.compress``: the recipe runs on what the data allows, meets the budget, opens no image without data, and
names the argument it refuses."""

from __future__ import annotations

import gzip
import zipfile

import numpy as np
import pytest

import ifjax

FAST = dict(calibration=32, synthetic_steps=3, allocation="uniform", progress=False)


@pytest.fixture(scope="module")
def digits():
  _, spec, variables = ifjax.models.pretrained("digits_cnn")
  return spec, variables


def test_data_free_opens_no_image_file(digits, tmp_path, monkeypatch):
  """data=None: nothing but the weights (which ship with ifjax; the data folder holds nothing)."""
  spec, variables = digits
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))

  def refuse(*args, **kwargs):
    raise AssertionError(f"compress(data=None) opened data: {args[:1]}")

  import PIL.Image
  import sklearn.datasets

  for owner, name in ((zipfile, "ZipFile"), (gzip, "open"), (PIL.Image, "open"), (ifjax.data, "digits"),
                      (ifjax.data, "cifar10_jpeg"), (ifjax.data, "mnist_test"), (sklearn.datasets, "load_digits")):
    monkeypatch.setattr(owner, name, refuse)
  result = ifjax.compress("digits_cnn", variables, spec, target_flops=0.5, data=None, distill_steps=2, **FAST)
  report = result.report
  assert report["synthetic_images"] == 32 and report["real_images"] == 0 and report["distill_steps"] == 2
  assert [s["stage"] for s in report["stages"]] == ["synthesize inputs", "allocate", "plan (if)",
                                                    "re-estimate BatchNorms", "distill"]
  assert report["cost"] <= 0.5 * report["dense_cost"]
  assert result.spec.validate(result.variables) == result.widths
  x = np.zeros((2, 8, 8, 1), np.float32)
  assert result.module.apply(result.variables, x).shape == (2, 10)


@pytest.mark.parametrize("target", ["target_flops", "target_params"])
def test_budget_is_met_to_one_neuron_per_group(digits, target):
  spec, variables = digits
  result = ifjax.compress("digits_cnn", variables, spec, data=None, **{target: 0.4}, **FAST)
  report = result.report
  assert report["cost"] <= 0.4 * report["dense_cost"]
  module, _ = ifjax.models.get("digits_cnn", widths={g: w + 1 for g, w in result.widths.items()})
  x = np.zeros((1, 8, 8, 1), np.float32)
  bigger = module.init(__import__("jax").random.key(0), x)
  cost = (ifjax.flops(module.apply, bigger, x, train=False) if target == "target_flops"
          else ifjax.param_count(bigger))
  assert cost > 0.4 * report["dense_cost"]  # one more neuron in every group: over the budget


def test_unlabelled_and_labelled_data(digits):
  spec, variables = digits
  xtr, ytr = ifjax.data.digits("train")
  images = ifjax.data.preprocess("digits_cnn", xtr[:128])
  unlabelled = ifjax.compress("digits_cnn", variables, spec, target_flops=0.5, data=images, distill_steps=2, **FAST)
  assert unlabelled.report["real_images"] == 32 and unlabelled.report["synthetic_images"] == 0
  labelled = ifjax.compress("digits_cnn", variables, spec, target_flops=0.5, data=(images, ytr[:128]),
                            finetune_epochs=1, batch_size=32, **FAST)
  assert labelled.report["finetune_epochs"] == 1 and labelled.report["real_images"] == 128
  assert labelled.report["stages"][-1]["stage"] == "fine-tune"


def test_bad_inputs_name_the_argument(digits):
  spec, variables = digits
  call = lambda **kw: ifjax.compress("digits_cnn", variables, spec, **{**FAST, **kw})
  for bad in (0, 1.5, float("nan")):
    with pytest.raises(ValueError, match="target_flops is a fraction"):
      call(target_flops=bad)
  with pytest.raises(ValueError, match="exactly one of target_flops= or target_params="):
    call()
  with pytest.raises(ValueError, match="exactly one of"):
    call(target_flops=0.5, target_params=0.5)
  with pytest.raises(ValueError, match="data holds no images"):
    call(target_flops=0.5, data=np.zeros((0, 8, 8, 1), np.float32))
  images = np.zeros((16, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"data=\(images, labels\) expected, got a tuple of 3"):
    call(target_flops=0.5, data=(images, np.zeros(16, np.int32), None))
  with pytest.raises(ValueError, match=r"labels must be integers of shape \(16,\)"):
    call(target_flops=0.5, data=(images, np.zeros((16, 10), np.int32)))
  with pytest.raises(ValueError, match="finetune_epochs needs labelled data"):
    call(target_flops=0.5, data=images, finetune_epochs=1)
  with pytest.raises(ValueError, match="compress: distill_steps must be an integer >= 0"):
    call(target_flops=0.5, distill_steps=-1)
  with pytest.raises(ValueError, match="unknown zoo model"):
    ifjax.compress("resnet21", variables, spec, target_flops=0.5)
  module, mlp_spec = ifjax.models.get("mlp")
  v = module.init(__import__("jax").random.key(0), np.zeros((1, 20), np.float32))
  with pytest.raises(ValueError, match="repair=True re-estimates BatchNorm statistics, and this spec has no BatchNorm"):
    ifjax.compress("mlp", v, mlp_spec, target_params=0.5, data=np.zeros((8, 20), np.float32), **FAST)
