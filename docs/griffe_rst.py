"""Griffe extension used by the docs build: turn the reST bits of graphmil's docstrings into Markdown.

graphmil's docstrings are Google style with a few reStructuredText constructs that read well in a
terminal (``help()``) and in Sphinx: ``.. math::`` blocks, ``:math:`...``` and cross-reference roles
(``:class:`~torch_geometric.data.Data```).  mkdocstrings renders Markdown, so before parsing each
docstring this extension rewrites

- a ``.. math::`` block into a ``$$ ... $$`` display block (``pymdownx.arithmatex``), wrapped in
  ``aligned`` when it uses ``&`` or ``\\`` (reST math blocks are implicitly aligned);
- ``:math:`x``` into ``$x$``;
- ``:class:`~a.b.C``` (any role) into inline code ``C`` (``a.b.C`` without the ``~``).

Loaded from ``mkdocs.yml`` (``extensions: [docs/griffe_rst.py]``); not part of the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc|const|ref|doc|paramref):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _role(m: re.Match) -> str:
    tilde, target = m.group(1), m.group(2).strip()
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        target = target.split("<", 1)[0].strip()
    if tilde:
        target = target.split(".")[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_markdown(text: str) -> str:
    """Rewrite the reST constructs of one docstring (see the module docstring)."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        base = m.group(1)
        body = [m.group(2)] if m.group(2).strip() else []
        i += 1
        block_indent = None
        while i < len(lines):
            line = lines[i]
            if line.strip() == "":
                body.append("")
                i += 1
                continue
            if _indent(line) <= len(base):
                break
            if block_indent is None:
                block_indent = _indent(line)
            body.append(line[min(block_indent, _indent(line)):])
            i += 1
        while body and body[-1] == "":
            body.pop()
        while body and body[0] == "":
            body.pop(0)
        src = "\n".join(body)
        aligned = "&" in src or "\\\\" in src
        if out and out[-1].strip():
            out.append("")
        out.append(f"{base}$$")
        if aligned:
            out.append(f"{base}\\begin{{aligned}}")
        out.extend(f"{base}{b}" if b else "" for b in body)
        if aligned:
            out.append(f"{base}\\end{{aligned}}")
        out.append(f"{base}$$")
        out.append("")
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(_role, text)
    return text


class RstToMarkdown(griffe.Extension):
    """Apply :func:`rst_to_markdown` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None and obj.docstring.value:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
