"""Layering: graphmil.ops sits under nn and transforms; no private names cross modules."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "graphmil"

# Known violation, owned elsewhere: nn/anchor.py imports kd_partition from graphmil.transforms.regions
# inside a function. Delete this entry once it reads `from graphmil.ops.partition import kd_partition`.
KNOWN: set = set()  # (file, module) pairs allowed to break the layering: none


def _imports(path: pathlib.Path):
    """``(module imported, names)`` for every import statement of a file (also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _files(sub: str):
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("sub,forbidden", [
    ("transforms", ("graphmil.nn",)),
    ("nn", ("graphmil.transforms",)),
    ("ops", ("graphmil.nn", "graphmil.transforms", "graphmil.datasets", "graphmil.models", "graphmil.train",
             "graphmil.io", "graphmil.data", "graphmil.losses", "graphmil.metrics", "graphmil.viz", "graphmil.cli")),
])
def test_no_upward_imports(sub, forbidden):
    bad = []
    for f in _files(sub):
        rel = str(f.relative_to(ROOT))
        for mod, _ in _imports(f):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden) and (rel, mod) not in KNOWN:
                bad.append(f"{rel}: imports {mod}")
    assert not bad, "\n".join(bad)


def test_ops_modules_are_found():
    # the scan above must see the files it checks (a wrong path would make it pass vacuously)
    names = {f.name for f in _files("ops")}
    assert {"geometry.py", "partition.py", "masking.py", "batching.py"} <= names
    assert any(mod.startswith("graphmil.ops") for f in _files("transforms") for mod, _ in _imports(f))


def test_no_private_names_imported_across_modules():
    bad = []
    for f in sorted(PKG.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        for mod, names in _imports(f):
            if mod.split(".")[0] != "graphmil":
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{f.relative_to(ROOT)}: from {mod} import {name}")
    assert not bad, "\n".join(bad)


def test_old_import_paths_re_export_the_moved_names():
    import graphmil.nn.masking as nn_masking
    import graphmil.ops as ops
    import graphmil.ops.geometry as geometry
    import graphmil.ops.masking as ops_masking
    import graphmil.ops.partition as partition
    import graphmil.transforms as transforms
    import graphmil.transforms.graph as graph
    import graphmil.transforms.regions as regions

    for name in ops_masking.__all__:
        assert getattr(nn_masking, name) is getattr(ops_masking, name)
    assert regions.kd_partition is partition.kd_partition is transforms.kd_partition
    assert regions.global_region_index is partition.global_region_index is transforms.global_region_index
    assert graph.grid_edges is geometry.grid_edges is ops.grid_edges
    assert graph.infer_grid_step is geometry.infer_grid_step is transforms.infer_grid_step
    assert graph.STEP_RTOL == geometry.STEP_RTOL  # graphmil.io.readers imports it from graph
    assert set(dir(ops)) >= {"grid_edges", "knn_edges", "radius_edges", "kd_partition", "stkim_mask", "bag_index"}
    with pytest.raises(AttributeError):
        ops.no_such_name  # noqa: B018
