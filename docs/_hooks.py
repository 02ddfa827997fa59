"""mkdocs hook: docstrings written for doctest and Sphinx habits render as Markdown.

* A doctest block (a paragraph whose first line starts with ``>>>``) becomes a ``pycon`` code block, so
  its output lines are not read as Markdown (``[0, 1]`` would be a link reference).
* Sphinx roles such as ``:func:`plan``` become code spans.

Registered before mkdocstrings configures itself, so the docstrings it renders get the same treatment.
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class DoctestBlocks(Preprocessor):
  """Fences doctest paragraphs (outside existing fences) and turns Sphinx roles into code spans."""

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
      out.append(line if fence is not None else ROLE.sub(r"`\1`", line))
      i += 1
    return out


class DocstringMarkdown(Extension):
  def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
    md.preprocessors.register(DoctestBlocks(md), "ifjax_doctest_blocks", 40)


@event_priority(100)
def on_config(config):
  config.markdown_extensions.append(DocstringMarkdown())
  return config
