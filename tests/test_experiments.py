"""The data-free experiment script end to end on a tiny grid of the real LeNet5 (skips without the data)."""

import csv
import importlib.util
import pathlib

import pytest

import ifjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_method_names():
  df = _script("data_free")
  assert df.method_options("default") == df.method_options("default+bn") == {"fuse": False}
  assert df.method_options("if_bary+bias+mass") == {"normalization": "barycentric", "include_bias": True,
                                                    "source_mass": "importance", "target_mass": "importance"}
  for bad in ("if_nope", "default+bias", "if_paper+typo"):
    with pytest.raises(ValueError, match="unknown method"):
      df.method_options(bad)


def test_grid_writes_results_and_resumes(tmp_path, capsys):
  if not ifjax.models.checkpoint_path("lenet5").is_file():
    pytest.skip("LeNet5 checkpoint not found; set IFJAX_DATA (see ../shared/data/README.md)")
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
