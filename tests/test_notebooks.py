"""The notebooks in notebooks/ run top to bottom without errors (nbclient, a fresh kernel each), on small settings.

``IFJAX_NOTEBOOK_IMAGES`` shrinks the test sets the notebooks evaluate on; the committed outputs come from full
runs. Needs ``nbclient`` and ``ipykernel`` (the ``test`` extra); notebooks that read ../shared/data skip without it.
"""

import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NEEDS_DATA = {"01_quickstart.ipynb": ("cifar10-jpeg.zip", "resnet20"),
              "04_budgets.ipynb": ("cifar10-jpeg.zip", "resnet20")}


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  if name in NEEDS_DATA:
    import ifjax
    zip_name, model = NEEDS_DATA[name]
    missing = [p for p in (ifjax.data.data_dir() / zip_name, ifjax.models.checkpoint_path(model)) if not p.exists()]
    if missing:
      pytest.skip(f"{name} needs {[str(p) for p in missing]}: put the shared data there or set IFJAX_DATA")
  monkeypatch.setenv("IFJAX_NOTEBOOK_IMAGES", "200")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
