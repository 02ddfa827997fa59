"""The documentation site: `mkdocs build --strict` passes and the API page covers every public name."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import ifjax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS_PACKAGES = {"mkdocs": "mkdocs", "material": "mkdocs-material", "mkdocstrings": "mkdocstrings",
                 "mkdocstrings_handlers.python": "mkdocstrings-python"}


def test_api_page_lists_every_public_name():
  documented = set(re.findall(r"^::: ifjax\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M))
  missing = sorted(set(ifjax.__all__) - documented)
  assert not missing, f"docs/api.md has no '::: ifjax.NAME' entry for {missing}: add one under a fitting heading"
  unknown = sorted(documented - set(ifjax.__all__) - {"data"})
  assert not unknown, f"docs/api.md documents {unknown}, which ifjax.__all__ does not export"


def test_mkdocs_build_strict(tmp_path):
  absent = [pip for mod, pip in DOCS_PACKAGES.items() if importlib.util.find_spec(mod.split(".")[0]) is None
            or importlib.util.find_spec(mod) is None]
  if absent:
    pytest.skip(f"{', '.join(absent)} not installed: the docs build needs `pip install -e \".[docs]\"`")
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
  api = (tmp_path / "site" / "api" / "index.html").read_text()
  for name in ("ifjax.plan", "ifjax.analysis.loss_plane", "ifjax.Spec"):
    assert f'id="{name}"' in api, f"the API page has no section for {name}"
  assert "array([[1., 0., 1., 0.]," in api  # plan's doctest, rendered as code
