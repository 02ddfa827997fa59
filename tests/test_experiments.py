"""The data-free experiment script end to end on a tiny grid of the real LeNet5 (skips without the data)."""

import csv
import importlib
import json

import numpy as np
import pytest

import ifjax


def _script(name):
  return importlib.import_module(name)  # experiments/ is on pytest's pythonpath (pyproject.toml)


def test_method_names():
  df = _script("data_free")
  assert df.method_options("default") == df.method_options("default+bn") == {"fuse": False}
  assert df.method_options("if_bary+bias+mass") == {"normalization": "barycentric", "include_bias": True,
                                                    "source_mass": "importance", "target_mass": "importance"}
  for bad in ("if_nope", "default+bias", "if_paper+typo"):
    with pytest.raises(ValueError, match="unknown method"):
      df.method_options(bad)


@pytest.mark.requires_data(models=("lenet5",))
def test_grid_writes_results_and_resumes(tmp_path, capsys):
  df = _script("data_free")
  argv = ["--model", "lenet5", "--groups", "0", "--sparsities", "0.5", "--limit", "300", "--out", str(tmp_path)]
  df.main(argv)
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  # dense + (group 0, all groups) x 3 methods
  assert len(rows) == 1 + 2 * 3
  acc = {(r["group"], r["method"]): float(r["accuracy"]) for r in rows}
  assert acc[("-", "dense")] > 95
  assert all(0 <= a <= 100 for a in acc.values())
  small = [int(r["params"]) for r in rows if r["method"] != "dense"]
  assert max(small) < int(rows[0]["params"])
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  assert "| l1 | 0 (linear1) | 0.5 |" in (tmp_path / "results.md").read_text()
  capsys.readouterr()
  df.main(argv)  # resumes: nothing left to do, nothing appended
  assert "resuming: 7 cells" in capsys.readouterr().out
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == len(rows)


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_fine_tune_writes_results_and_resumes(tmp_path, capsys):
  ft = _script("fine_tune")
  argv = ["--model", "resnet20", "--sparsities", "0.3", "--epochs", "1", "--train-limit", "260", "--test-limit", "200",
          "--out", str(tmp_path)]
  ft.main(argv)
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["epoch"]) for r in rows] == [("default", "0"), ("default", "1"), ("if", "0"), ("if", "1")]
  assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
  assert "| 0.3 | if |" in (tmp_path / "results.md").read_text() and (tmp_path / "accuracy.png").is_file()
  ft.main(argv)  # resumes: nothing appended
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 4


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_train_save_then_data_free_grid(tmp_path):
  tc, df = _script("train_cifar"), _script("data_free")
  tc.main(["--model", "resnet20", "--epochs", "1", "--train-limit", "260", "--test-limit", "100",
           "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "final")])
  assert (tmp_path / "ck" / "epoch_1").is_dir() and (tmp_path / "final_history.json").is_file()
  variables, spec, widths, _ = ifjax.restore(tmp_path / "final")
  assert spec.names == ifjax.models.get("resnet20")[1].names
  df.main(["--model", "resnet20", "--checkpoint", str(tmp_path / "final"), "--groups", "0", "--sparsities", "0.5",
           "--methods", "default", "if_paper", "--limit", "100", "--out", str(tmp_path / "grid")])
  with open(tmp_path / "grid" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1 + 2 * 2


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_budget_script_meets_the_flop_budget(tmp_path):
  _script("budget").main(["--model", "resnet20", "--flops", "0.6", "--allocations", "uniform-internal", "global",
                          "--limit", "100", "--out", str(tmp_path)])
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [r["allocation"] for r in rows] == ["dense"] + ["uniform-internal"] * 3 + ["global"] * 3
  assert all(float(r["flops"]) <= 0.6 for r in rows[1:])
  assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
  assert "| global | if_paper |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_budget_script_iterative_and_data_light(tmp_path):
  """The sensitivity allocation, 2 steps, the synthetic and data-light BN resets (one-shot only), then --summarize."""
  budget = _script("budget")
  budget.main(["--model", "resnet20", "--flops", "0.6", "--allocations", "sensitivity-internal", "--methods", "default",
               "if_paper", "--steps", "1", "2", "--modes", "free", "synthetic", "light", "--calib", "20",
               "--limit", "50", "--synthetic", "8", "--synthetic-steps", "2", "--out", str(tmp_path)])
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  cells = [(r["method"], r["steps"], r["mode"]) for r in rows[1:]]
  modes = (("1", "free"), ("1", "synthetic"), ("1", "light"), ("2", "free"))
  assert cells == [(m, s, d) for m in ("default", "if_paper") for s, d in modes]
  assert all(float(r["flops"]) <= 0.6 for r in rows[1:])
  assert np.load(tmp_path / "synthetic_8x2.npy").shape == (8, 32, 32, 3)
  budget.main(["--summarize", "--plot", "--out", str(tmp_path)])
  assert "if_paper, data-light: beats default in" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_budget_script_measured_allocations(tmp_path):
  """Measured allocations probe on the synthetic inputs (curves cached as JSON, reused by a second run) or on the
  --calib images, which only the data-light mode may use."""
  budget = _script("budget")
  common = ["--model", "resnet20", "--flops", "0.6", "--allocations", "measured-internal", "--methods", "default",
            "--limit", "50", "--synthetic", "8", "--synthetic-steps", "2", "--calib", "20"]
  budget.main(common + ["--modes", "synthetic", "--out", str(tmp_path / "s")])
  saved = json.loads((tmp_path / "s" / "curves_default_recal_internal_8x2.json").read_text())
  assert len(saved["loss"]) == 9 and all(len(v) == 5 for v in saved["loss"].values())
  rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
  assert [(r["allocation"], r["mode"]) for r in rows[1:]] == [("measured-internal", "synthetic")]
  assert float(rows[1]["flops"]) <= 0.6
  budget.main(common + ["--modes", "light", "--measure-on", "calib", "--out", str(tmp_path / "c")])
  assert (tmp_path / "c" / "curves_default_recal_internal_calib20.json").exists()
  with pytest.raises(SystemExit):
    budget.main(common + ["--modes", "free", "light", "--measure-on", "calib", "--out", str(tmp_path / "e")])


def test_main_job_prints_the_readme_table(capsys):
  """README command 1 prints exactly the table the README shows: the weights ship with ifjax, so the table
  depends on no training run (CI runs this test again under XLA's AVX2 cap and OpenBLAS's Haswell kernels)."""
  import pathlib
  import re

  readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  blocks = [b for b in re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.S | re.M)
            if b.startswith("loaded the DigitsCNN")]
  assert len(blocks) == 1, "README.md should show the main job's output once, in a plain ``` block"
  _script("digits").main([])
  assert capsys.readouterr().out == blocks[0]


def test_llm_script_prunes_minilm_and_resumes(tmp_path):
  """Two cells of experiments/llm.py on the real MiniLM: calibrated least squares beats plain magnitude pruning."""
  for module in ("safetensors", "tokenizers"):
    pytest.importorskip(module, reason="MiniLM needs the ifjax[llm] extra")
  from ifjax.models._bert import minilm_files
  try:
    minilm_files()
  except (FileNotFoundError, ImportError) as err:
    pytest.skip(f"MiniLM not installed: {err}")
  llm = _script("llm")
  argv = ["--model", "minilm-l6", "--targets", "mlp", "--sparsities", "0.25", "--methods", "default", "act_ls",
          "--calibration", "32", "--eval-sentences", "48", "--out", str(tmp_path)]
  llm.main(argv)
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  cos = {r["method"]: float(r["value"]) for r in rows}
  assert set(cos) == {"default", "act_ls"} and 0 < cos["default"] < cos["act_ls"] <= 1
  assert "act_ls` beats `act` in 0 of 0" in (tmp_path / "results.md").read_text()
  llm.main(argv)  # resumes: nothing appended
  assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 2
  assert json.loads((tmp_path / "meta.json").read_text())["commands"]
