"""Package hygiene: ``import ifjax`` stays light, and the ``requires_data`` marker skips with a message."""

from __future__ import annotations

import pathlib
import subprocess
import sys

pytest_plugins = ["pytester"]

HEAVY = ("tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "torch", "sklearn", "tqdm", "PIL")


def test_import_ifjax_loads_no_heavy_optional_package():
  code = ("import sys, ifjax\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
  assert out.strip() == "[]", f"import ifjax loaded {out.strip()}"


def test_import_ifjax_is_lazy():
  """``import ifjax`` loads no jax until a name is used; every public name then resolves."""
  code = ("import sys, ifjax\nprint('jax' in sys.modules)\n"
          "print(all(getattr(ifjax, n) is not None for n in ifjax.__all__), 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
  assert out == ["False", "True", "True"], out


def test_requires_data_marker_skips_with_the_path_and_the_env_var(pytester, monkeypatch, tmp_path):
  (tmp_path / "present.txt").write_text("x")
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  pytester.makeconftest((pathlib.Path(__file__).parent / "conftest.py").read_text())
  pytester.makeini("[pytest]\nmarkers =\n  requires_data: needs the data folder\n")
  pytester.makepyfile("""
    import pytest

    @pytest.mark.requires_data("present.txt")
    def test_present():
      pass

    @pytest.mark.requires_data("present.txt", "missing.zip")
    def test_missing_file():
      pass

    @pytest.mark.requires_data(models=("resnet20",))
    def test_missing_model():
      pass
  """)
  result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
  result.assert_outcomes(passed=1, skipped=2)
  report = result.stdout.str()
  assert str(tmp_path / "missing.zip") in report and "present.txt not found" not in report
  assert str(tmp_path / "models") in report and report.count("set IFJAX_DATA") == 2
