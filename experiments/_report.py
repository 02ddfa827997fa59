"""What the experiment scripts share to report their results: CSV files, markdown tables, win rates, plots.

A script imports it as ``import _report``: ``python experiments/x.py`` puts the scripts' folder first on
``sys.path``, and pytest adds it too (``pythonpath`` in pyproject.toml). Importing it loads neither jax nor
matplotlib (split_data.py sets XLA flags before jax starts; matplotlib comes with the first plot).

- ``read_csv(path)``: the rows of a CSV file as string dicts; ``[]`` when the file does not exist.
- ``write_csv(path, fields, rows)``: the whole file, header first.
- ``CsvAppender(path, fields)``: appends rows to a file that a run resumes from, flushed after every ``add``;
  a context manager.
- ``markdown_table(header, rows)``: the lines of a markdown table from already formatted cells.
- ``win_rate(cells, method, baseline="default")``: a :class:`WinRate` (wins, compared cells, mean gain in
  points) of a method over a baseline, each cell a ``{method: accuracy}`` mapping.
- ``plot_curves(panels, path, xlabel=..., reference=...)``: accuracy curves, a small panel per title and a line
  per method, the dense accuracy dotted; a PNG.
- ``pyplot()`` and ``save(fig, path)``: matplotlib on the Agg backend, and a figure written the scripts' way.
"""

from __future__ import annotations

import csv
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


# -- CSV ------------------------------------------------------------------------------------------
def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  """The rows of ``path`` as ``{column: text}``; ``[]`` when the file does not exist (a fresh run)."""
  if not path.exists():
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write_csv(path: pathlib.Path, fields: Sequence[str], rows: Iterable[Mapping]) -> None:
  """Writes ``rows`` (dicts keyed by ``fields``; a missing key is an empty cell) to ``path``, header first."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fields)
    writer.writeheader()
    writer.writerows(rows)


class CsvAppender:
  """Appends rows of ``fields`` to ``path``: the header first when the file is new or empty, and a flush after
  every :meth:`add`, so that a run killed midway leaves the rows it finished for the next run to resume from."""

  def __init__(self, path: pathlib.Path, fields: Sequence[str]):
    new = not path.exists() or path.stat().st_size == 0
    self._file = open(path, "a", newline="")
    self._writer = csv.DictWriter(self._file, fields)
    if new:
      self._writer.writeheader()

  def add(self, *rows: Mapping) -> None:
    """Writes ``rows`` and flushes them to disk."""
    self._writer.writerows(rows)
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> CsvAppender:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- markdown -------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  """The lines of a markdown table: ``| a | b |``, ``|---|---|``, then one line per row of formatted cells."""
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(row) + " |" for row in rows]


# -- win rates ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WinRate:
  """``method`` beat the baseline in ``wins`` of ``cells`` compared cells, by ``mean_gain`` accuracy points on
  average (``nan`` without cells)."""

  wins: int
  cells: int
  mean_gain: float

  def __str__(self) -> str:
    """``wins/cells (+gain)``, or ``""`` without cells (an empty table cell)."""
    return f"{self.wins}/{self.cells} ({self.mean_gain:+.2f})" if self.cells else ""


def win_rate(cells: Iterable[Mapping[str, float]], method: str, baseline: str = "default") -> WinRate:
  """``method`` against ``baseline`` over the cells that hold both, each cell a ``{method: accuracy}`` mapping
  (other keys are ignored); a win is a strictly higher accuracy.

  >>> str(win_rate([{"default": 50.0, "if": 52.5}, {"default": 60.0, "if": 59.5}, {"if": 1.0}], "if"))
  '1/2 (+1.00)'
  """
  diffs = [c[method] - c[baseline] for c in cells if method in c and baseline in c]
  return WinRate(sum(d > 0 for d in diffs), len(diffs), float(np.mean(diffs)) if diffs else math.nan)


# -- plots ----------------------------------------------------------------------------------------
def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on the first plot)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig, path: pathlib.Path, dpi: int = 110) -> None:
  """Lays ``fig`` out tightly, writes it to ``path`` (PNG) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: pathlib.Path, *,
                xlabel: str, reference: float | None = None, cols: int = 6, sharey: bool = True) -> None:
  """Test accuracy (%) against ``xlabel``: one small panel per title of ``panels`` (``cols`` to a row), in it one
  line per method through its ``(x, accuracy)`` points (in the mapping's order; a method without points is
  left out), and a dotted grey line at ``reference`` (the dense model's accuracy). The legend is in the first
  panel."""
  plt = pyplot()
  cols = min(cols, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), sharey=sharey, squeeze=False)
  for ax, (title, curves) in zip(axes.flat, panels.items()):
    for method, points in curves.items():
      if points:
        ax.plot(*zip(*points), marker="o", ms=3, label=method)
    if reference is not None:
      ax.axhline(reference, color="gray", ls=":", lw=1)
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=7)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=6)
  fig.supxlabel(xlabel, fontsize=8)
  fig.supylabel("test accuracy (%)", fontsize=8)
  save(fig, path)
