"""The documentation site: `mkdocs build --strict` passes and the API pages cover every public name."""

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
                 "mkdocstrings_handlers.python": "mkdocstrings-python", "mkdocs_jupyter": "mkdocs-jupyter"}
API = ROOT / "docs" / "api"
# names whose section the built site must have, and the API page (docs/api/PAGE.md) they live on
SECTIONS = {"ifjax.plan": "fusion", "ifjax.analysis.loss_plane": "analysis", "ifjax.Spec": "specs"}


def api_entries() -> dict[str, list[str]]:
  """`{NAME: [pages]}` for every `::: ifjax.NAME` line of the API pages under docs/api/."""
  entries: dict[str, list[str]] = {}
  for page in sorted(API.glob("*.md")):
    for name in re.findall(r"^::: ifjax\.(\w+)\s*$", page.read_text(), re.M):
      entries.setdefault(name, []).append(page.name)
  return entries


def test_api_pages_list_every_public_name():
  entries = api_entries()
  documented = set(entries)
  missing = sorted(set(ifjax.__all__) - documented)
  assert not missing, f"docs/api/*.md have no '::: ifjax.NAME' entry for {missing}: add one to the page of its topic"
  unknown = sorted(documented - set(ifjax.__all__) - {"data"})
  assert not unknown, f"docs/api/*.md document {unknown}, which ifjax.__all__ does not export"
  twice = {name: pages for name, pages in entries.items() if len(pages) > 1}
  assert not twice, f"documented more than once (duplicate anchors): {twice}"
  nav = (ROOT / "mkdocs.yml").read_text()
  outside = sorted(page.name for page in API.glob("*.md") if f"api/{page.name}" not in nav)
  assert not outside, f"API pages missing from the nav in mkdocs.yml: {outside}"
  for name, page in SECTIONS.items():
    assert name.split(".")[1] in entries and page + ".md" in entries[name.split(".")[1]], (name, page)


def test_mkdocs_build_strict(tmp_path):
  absent = [pip for mod, pip in DOCS_PACKAGES.items() if importlib.util.find_spec(mod.split(".")[0]) is None
            or importlib.util.find_spec(mod) is None]
  if absent:
    pytest.skip(f"{', '.join(absent)} not installed: the docs build needs `pip install -e \".[docs]\"`")
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
  site = tmp_path / "site"
  for name, page in SECTIONS.items():
    html = (site / "api" / page / "index.html").read_text()
    assert f'id="{name}"' in html, f"the API page api/{page}/ has no section for {name}"
  fusion = (site / "api" / "fusion" / "index.html").read_text()
  assert "array([[1., 0., 1., 0.]," in fusion  # plan's doctest, rendered as code
  # Sphinx roles in docstrings became cross-references (docs/_hooks.py): `:func:`make_step`` in ifjax.train's
  # docstrings links to its section, `:func:`widths`` in plan's to another page; no role is left as text
  training = (site / "api" / "training" / "index.html").read_text()
  assert 'href="#ifjax.train.make_step"' in training, "the role :func:`make_step` is not a link"
  assert 'href="../specs/#ifjax.widths"' in fusion, "no cross-page link from a role"
  for page in sorted((site / "api").glob("*/index.html")):
    assert not re.search(r":(func|class|meth|mod):`", page.read_text()), f"{page}: a Sphinx role left as text"
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # the tutorials, rendered with stored outputs
    html = (site / "notebooks" / notebook.stem / "index.html").read_text()
    assert "jp-OutputArea" in html, f"notebooks/{notebook.stem}: no rendered outputs"
