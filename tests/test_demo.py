import math
import os

import pytest

from graphmil.demo import DEMO_MODELS, _filter_kwargs, demo_dataset, format_table, run_demo


def test_demo_models_are_registered_and_their_kwargs_accepted():
    from graphmil.models import create_model, list_models

    assert [s.label for s in DEMO_MODELS] == ["ABMIL", "ABMIL+AEM", "SmAP", "CASii", "AINet"]
    for spec in DEMO_MODELS:
        assert spec.name in list_models()
        kw = _filter_kwargs(spec.name, spec.kwargs)
        assert kw == spec.kwargs, f"{spec.name} ignores demo kwargs {set(spec.kwargs) - set(kw)}"
        create_model(spec.name, 32, 1, **kw)


def test_demo_split_is_stratified_and_disjoint():
    train, val, test, ds = demo_dataset()
    ids = [b.slide_id for part in (train, val, test) for b in part]
    assert len(ids) == len(set(ids)) == len(ds) == 160
    for part in (train, val, test):
        frac = sum(int(b.y) for b in part) / len(part)
        assert 0.4 <= frac <= 0.6


def test_format_table():
    rows = [{"model": "ABMIL", "auroc": 0.9, "accuracy": 0.8, "instance_auroc": float("nan"),
             "epochs": 3, "time_s": 1.25}, {"model": "X", "error": "boom"}]
    t = format_table(rows).splitlines()
    assert t[2].split() == ["ABMIL", "0.900", "0.800", "nan", "3", "1.2"]
    assert "failed: boom" in t[3]


@pytest.mark.slow
def test_default_demo_learns_every_model(tmp_path, request):
    """The full default demo (about 1-2 min on 2 cores): run with ``pytest -m slow``."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the full demo runs only when slow tests are selected (pytest -m slow)")
    res = run_demo(out=str(tmp_path / "demo"), progress=False, echo=lambda *a: None)
    assert len(res["rows"]) == 5
    for r in res["rows"]:
        assert not r.get("error"), r
        assert r["auroc"] >= 0.8, r
        assert not math.isnan(r["instance_auroc"]) and r["instance_auroc"] > 0.6, r
    assert sorted(os.listdir(tmp_path / "demo" / "heatmaps")) == sorted(
        f"{s.label.replace('+', '_')}.png" for s in DEMO_MODELS)
