"""Every ```python block of the documentation runs, and the API reference covers every module.

Blocks of one Markdown file run in order in one namespace (a page reads like a notebook), in a
temporary working directory, with the default suite's seed. A block is skipped when its fence info
contains ``no-run`` (```` ```python no-run ````) or when the line before it is ``<!-- no-run -->``;
keep that for examples that need the user's own data.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")


def extract_python_blocks(text: str):
    """``[(line, source, skipped)]`` for every fenced python block of a Markdown text.

    ``line`` is the 1-based line of the opening fence; ``skipped`` is True for ``no-run`` blocks.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m.group("indent"), m.group("ticks"), m.group("info").strip()
        start = i
        body = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(ticks[0] * len(ticks)) and close.strip(ticks[0]) == "":
                break
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        words = info.replace("{", " ").replace("}", " ").replace(".", " ").split()
        if not words or words[0] not in ("python", "py"):
            continue
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skipped = "no-run" in words or prev == "<!-- no-run -->"
        blocks.append((start + 1, "\n".join(body) + "\n", skipped))
    return blocks


def _markdown_files():
    files = sorted(DOCS.rglob("*.md"))
    if (ROOT / "README.md").exists():
        files.insert(0, ROOT / "README.md")
    return [f for f in files if any(not s for _, _, s in extract_python_blocks(f.read_text()))]


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def test_extract_python_blocks():
    text = "\n".join([
        "# Title", "```python", "a = 1", "```", "", "```bash", "echo no", "```",
        "<!-- no-run -->", "", "```python", "raise SystemExit", "```",
        "```python no-run", "raise SystemExit", "```",
        "- item", "    ```python", "    b = a + 1", "    ```",
        "````py", "c = '```'", "````",
    ])
    blocks = extract_python_blocks(text)
    assert [(line, skipped) for line, _, skipped in blocks] == [(2, False), (11, True), (14, True), (18, False), (21, False)]
    ns: dict = {}
    for _, src, skipped in blocks:
        if not skipped:
            exec(compile(src, "<test>", "exec"), ns)
    assert ns["b"] == 2 and ns["c"] == "```"


@pytest.mark.parametrize("path", _markdown_files(), ids=_id)
def test_markdown_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    from graphmil.models import registry

    registry.list_models()  # register the built-in models in the real registry first
    # pages may register example models: give each page a copy so that none leaks out
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace: dict = {"__name__": "__docs__"}
    for line, src, skipped in extract_python_blocks(path.read_text()):
        if skipped:
            continue
        code = compile(src, f"{_id(path)}:{line}", "exec")
        try:
            exec(code, namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"{_id(path)}: the python block at line {line} failed: {e!r}") from e


def _public_modules():
    mods = []
    for path in sorted((ROOT / "graphmil").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" or any(p.startswith("_") for p in parts):
            continue
        mods.append(".".join(parts))
    return mods


def test_api_reference_covers_every_public_module():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^:::\s*([\w.]+)\s*$", page.read_text(), flags=re.M))
    missing = sorted(set(_public_modules()) - documented)
    assert not missing, f"modules missing from docs/api (run `python docs/gen_api.py`): {missing}"
    stale = sorted(m for m in documented if m not in set(_public_modules()))
    assert not stale, f"docs/api references modules that do not exist: {stale}"


@pytest.mark.parametrize("module", _public_modules())
def test_public_names_have_docstrings(module):
    """mkdocstrings hides undocumented objects, so an ``__all__`` name without a docstring would be
    missing from the API reference."""
    mod = importlib.import_module(module)
    undocumented = [
        name for name in getattr(mod, "__all__", ())
        if callable(getattr(mod, name, None)) and not (getattr(mod, name).__doc__ or "").strip()
    ]
    assert not undocumented, f"{module}: public names without a docstring: {undocumented}"
