"""mkdocs hook: docstrings written for doctest and Sphinx habits render as Markdown, and the notebooks join the site.

* A doctest block (a paragraph whose first line starts with ``>>>``) becomes a ``pycon`` code block, so
  its output lines are not read as Markdown (``[0, 1]`` would be a link reference).
* Sphinx roles such as ``:func:`plan``` become cross-references: the name is resolved against ifjax's public
  API (``plan`` -> ``ifjax.plan``, ``make_step`` -> ``ifjax.train.make_step``, ``Spec.validate`` ->
  ``ifjax.Spec.validate``) and written as an *optional* autorefs reference, which mkdocs-autorefs turns into a
  link when the API reference has a heading for it and into plain code when it does not (a private helper, an
  undocumented member), so ``mkdocs build --strict`` never fails on a role. Names that resolve to nothing, or to
  more than one object, stay plain code.
* The notebooks in ``notebooks/`` are added to the site as ``notebooks/*.ipynb`` (rendered by mkdocs-jupyter
  with their stored outputs, never executed), so they live in one place only; ``docs/notebooks/index.md`` is
  the Tutorials page that introduces them.

Registered before mkdocstrings configures itself, so the docstrings it renders get the same treatment.
"""

from __future__ import annotations

import functools
import html
import importlib
import inspect
import pathlib
import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
# the submodules the API reference renders with `::: ifjax.NAME` (their public members get headings)
SUBMODULES = ("importance", "models", "data", "train", "finetune", "split_data", "analysis")


def _public(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is not None:
    return list(names)
  return [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]


@functools.cache
def known_identifiers() -> frozenset[str]:
  """Full identifiers of the public API: ``ifjax.NAME``, ``ifjax.SUB.NAME`` and public methods of their classes."""
  import ifjax  # noqa: PLC0415 (only when a docstring has a role)

  known: set[str] = set()
  modules = [("ifjax", ifjax, list(ifjax.__all__))]
  for sub in SUBMODULES:
    module = importlib.import_module(f"ifjax.{sub}")
    known.add(f"ifjax.{sub}")
    modules.append((f"ifjax.{sub}", module, _public(module)))
  for prefix, module, names in modules:
    for name in names:
      obj = getattr(module, name, None)
      if obj is None:
        continue
      known.add(f"{prefix}.{name}")
      if inspect.isclass(obj):
        known.update(f"{prefix}.{name}.{m}" for m in vars(obj) if not m.startswith("_"))
  return frozenset(known)


@functools.cache
def resolve(target: str) -> str | None:
  """The full identifier a role's target names, or None when it names nothing public or is ambiguous."""
  known = known_identifiers()
  if target.startswith("ifjax."):
    return target if target in known else None
  if f"ifjax.{target}" in known:  # top-level names win (`plan`, `Spec.validate`)
    return f"ifjax.{target}"
  matches = sorted(k for k in known if k.endswith(f".{target}"))
  return matches[0] if len(matches) == 1 else None


def role_to_ref(match: re.Match) -> str:
  tilde, target = match.group(1), match.group(2)
  text = target.rsplit(".", 1)[-1] if tilde else target
  identifier = resolve(target)
  if identifier is None:
    return f"`{text}`"
  return f'<autoref identifier="{html.escape(identifier)}" optional>`{text}`</autoref>'


class DoctestBlocks(Preprocessor):
  """Fences doctest paragraphs (outside existing fences) and turns Sphinx roles into cross-references."""

  def run(self, lines: list[str]) -> list[str]:
    out, fence, i = [], None, 0
    while i < len(lines):
      line = lines[i]
      stripped = line.lstrip()
      if fence is None and stripped.startswith(("```", "~~~")):
        fence = stripped[:3]
      elif fence is not None and stripped.startswith(fence):
        fence = None
      elif fence is None and stripped.startswith(">>>"):
        indent = line[:len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():
          block.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
          i += 1
        out += ["", f"{indent}```pycon", *(indent + b for b in block), f"{indent}```", ""]
        continue
      out.append(line if fence is not None else ROLE.sub(role_to_ref, line))
      i += 1
    return out


class DocstringMarkdown(Extension):
  def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
    md.preprocessors.register(DoctestBlocks(md), "ifjax_doctest_blocks", 40)


@event_priority(100)
def on_config(config):
  config.markdown_extensions.append(DocstringMarkdown())
  return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which picks the notebooks up
def on_files(files, config):
  # src_dir is the repository root, so notebooks/NAME.ipynb is read where it lies and published as notebooks/NAME/
  # (a File.generated would lose its path inside mkdocs-jupyter's wrapper)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    files.append(File(f"notebooks/{notebook.name}", src_dir=str(ROOT), dest_dir=config.site_dir,
                      use_directory_urls=config.use_directory_urls))
  return files
