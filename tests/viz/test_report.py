"""The run report: ``graphmil train`` writes a self-contained ``report.html`` (no script, no link,
every image a PNG that decodes), whose numbers are the run's own (pooled CIs of summary.json, the
confusion matrix of predictions.csv via scikit-learn, an ROC area equal to the pooled AUROC), whose
example slides list the top tiles a direct forward pass of their fold's checkpoint gives;
``graphmil report`` rebuilds it (the same bytes) and touches nothing else; the ROC / reliability
helpers match scikit-learn; and the page opens in headless Chromium with no console error."""

import base64
import csv
import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from graphmil.cli import main
from graphmil.viz.report import (GENERATOR, confusion_counts, pick_slides, reliability_bins, roc_points,
                                 write_report)

CFG = {"model": {"name": "abmil", "kwargs": {"embed_dim": 8, "attention_dim": 4}},
       "data": {"dataset": "synthetic",
                "kwargs": {"num_bags": 16, "num_features": 8, "min_instances": 6, "max_instances": 14,
                           "signal": 2.0}},
       "train": {"epochs": 2, "batch_size": 4, "progress": False, "device": "cpu", "lr": 0.01},
       "cv": {"folds": 2, "seeds": [0], "val_fraction": 0.5}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dict(CFG, out=str(root / "run"))))
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--config", str(cfg)]) == 0
    assert f"report: {root / 'run' / 'report.html'}" in buf.getvalue()
    return root / "run"


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_a_self_contained_report(run):
    from PIL import Image

    text = read(run / "report.html")
    p = Tags()
    p.feed(text)
    names = [t for t, _ in p.tags]
    assert not {"script", "link", "iframe", "object", "embed"} & set(names)
    assert ("meta", {"name": "generator", "content": GENERATOR}) in p.tags
    imgs = [a for t, a in p.tags if t == "img"]
    assert len(imgs) >= 3 + 2  # ROC, reliability, training curves, example slides
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,") and a.get("alt")
        im = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        im.verify()
        assert im.format == "PNG"
    for t, a in p.tags:
        for k in ("src", "href"):
            assert not str(a.get(k, "")).startswith(("http:", "https:", "//", "file:")), (t, a)
    sections = [a["id"] for t, a in p.tags if t == "section"]
    assert sections == ["metrics", "roc", "confusion", "training", "slides", "config"]
    assert "epochs: 2" in text  # the config


def test_report_numbers_are_the_runs(run):
    from sklearn.metrics import confusion_matrix

    text = read(run / "report.html")
    with open(run / "summary.json") as f:
        summary = json.load(f)
    for m, v in summary["pooled_out_of_fold"]["0"].items():
        assert f"{v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" in text, m
    for r in rows(run / "results.csv"):
        assert f"{float(r['auroc']):.4f}" in text
    s = summary["summary"]["auroc"]
    assert f"{s['mean']:.4f} ± {s['std']:.4f}" in text
    test = [r for r in rows(run / "predictions.csv") if r["split"] == "test"]
    cm = confusion_matrix([r["label"] for r in test], [r["prediction"] for r in test], labels=["0", "1"])
    cells = [int(c) for c in re.findall(r'<td class="(?:hit|miss)" data-count="(\d+)">', text)]
    assert cells == cm.ravel().tolist()
    auc = re.search(r"seed 0: AUC ([0-9]+\.[0-9]+)", text).group(1)
    assert float(auc) == pytest.approx(summary["pooled_out_of_fold"]["0"]["auroc"]["value"], abs=5e-4)


def test_example_slides_list_the_top_tiles_of_their_folds_checkpoint(run):
    import torch
    from torch_geometric.data import Batch

    from graphmil.datasets import SyntheticBags
    from graphmil.train.checkpoint import load_checkpoint

    text = read(run / "report.html")
    ds = SyntheticBags(**CFG["data"]["kwargs"])
    bags = {ds[i].slide_id: ds[i] for i in range(len(ds))}
    fold_of = {r["slide_id"]: r["fold"] for r in rows(run / "splits.csv") if r["split"] == "test"}
    blocks = re.findall(r'<div class="slide" data-slide="([^"]+)" data-fold="(\d+)">(.*?)</table>', text, flags=re.S)
    assert len(blocks) == 3
    test_rows = [r for r in rows(run / "predictions.csv") if r["split"] == "test"]
    assert [b[0] for b in blocks] == [s for s, _ in pick_slides(test_rows, ["0", "1"], 3)]
    for sid, fold, body in blocks:
        assert fold == fold_of[sid]  # the fold that held the slide out
        fit = json.load(open(run / f"seed0_fold{fold}" / "fit.json"))
        model, _ = load_checkpoint(str(run / f"seed0_fold{fold}" / "checkpoints" / f"{fit['restored']}.pt"))
        bag = bags[sid]
        with torch.no_grad():
            s = model(Batch.from_data_list([bag])).instance_scores.numpy()
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:5]
        want = [(int(bag.pos[i, 0]), int(bag.pos[i, 1])) for i in order]
        got = [(int(x), int(y)) for x, y in re.findall(r'<tr><td class="l">\d+</td><td>(\d+)</td><td>(\d+)</td>', body)]
        assert got == want


def tree(path, skip=()):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, path)
            if rel not in skip:
                with open(p, "rb") as fh:
                    out[rel] = fh.read()
    return out


def test_report_command_rebuilds_only_its_own_file(run, tmp_path, capsys):
    before = tree(run, skip=("report.html",))
    old = (run / "report.html").read_bytes()
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    assert tree(run, skip=("report.html",)) == before
    assert (run / "report.html").read_bytes() == old  # deterministic: same run, same page
    mine = tmp_path / "copy"
    shutil.copytree(run, mine)
    (mine / "report.html").write_text("<html>my notes</html>")
    assert main(["report", str(mine)]) == 2
    assert "was not written by graphmil" in capsys.readouterr().err
    assert (mine / "report.html").read_text() == "<html>my notes</html>"
    (mine / "report.html").unlink()
    (mine / "summary.json").unlink()
    assert main(["report", str(mine)]) == 2
    assert "not a finished graphmil train run" in capsys.readouterr().err
    assert not (mine / "report.html").exists()


def test_report_without_the_bags_says_why(run, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(run, gone)
    cfg = yaml.safe_load((gone / "config.yaml").read_text())
    cfg["data"] = {"dataset": "folder", "root": str(tmp_path / "nowhere"), "labels": str(tmp_path / "no.csv")}
    (gone / "config.yaml").write_text(yaml.safe_dump(cfg))
    (gone / "report.html").unlink()
    text = read(write_report(str(gone)))
    assert "Heatmaps left out: the bags could not be re-predicted" in text
    assert 'id="roc"' in text


def test_roc_points_and_reliability_against_sklearn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.uniform(size=200) + 0.3 * y, 1)  # ties
    fpr, tpr, auc = roc_points(y, s)
    rf, rt, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(roc_points([1, 1], [0.2, 0.3])[2])
    p = np.clip(rng.beta(2, 2, 300), 0, 1)
    p[:5] = [0.0, 0.1, 0.5, 0.9, 1.0]  # on the bin edges
    o = (rng.uniform(size=300) < p).astype(int)
    rb = reliability_bins(o, p, bins=10)
    pt, pp = calibration_curve(o, p, n_bins=10, strategy="uniform")
    ok = rb["count"] > 0
    np.testing.assert_allclose(rb["observed"][ok], pt)
    np.testing.assert_allclose(rb["mean_predicted"][ok], pp)
    ece, edges = 0.0, np.linspace(0, 1, 11)
    for k in range(10):  # bins [0, .1], (.1, .2], ..., (.9, 1]
        m = (p <= edges[1]) if k == 0 else (p > edges[k]) & (p <= edges[k + 1])
        if m.any():
            ece += m.mean() * abs(o[m].mean() - p[m].mean())
    assert float(rb["ece"]) == pytest.approx(ece)
    assert confusion_counts(["a", "b", "b"], ["b", "b", "a"], ["a", "b"]).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match="class 'c'"):
        confusion_counts(["c"], ["a"], ["a", "b"])


def test_pick_slides_rule():
    def row(sid, label, p):
        return {"slide_id": sid, "label": label, "prob_n": f"{1 - p}", "prob_t": f"{p}",
                "prediction": "t" if p >= 0.5 else "n", "split": "test"}

    rs = [row("a", "t", 0.8), row("b", "t", 0.95), row("c", "n", 0.9), row("d", "n", 0.52), row("e", "n", 0.1),
          {**row("f", "t", 0.99), "split": "val"}]
    picked = pick_slides(rs, ["n", "t"], 4)
    assert [s for s, _ in picked] == ["b", "c", "d", "a"]
    assert "true positive" in picked[0][1] and "error" in picked[1][1] and "least" in picked[2][1]

    def row3(sid, label, p):  # three classes: confidence is the top probability
        names = ["a", "b", "c"]
        return {"slide_id": sid, "label": label, **{f"prob_{n}": f"{v}" for n, v in zip(names, p)},
                "prediction": names[int(np.argmax(p))], "split": "test"}

    rs = [row3("x", "a", [0.7, 0.2, 0.1]), row3("y", "b", [0.9, 0.05, 0.05]), row3("z", "c", [0.3, 0.34, 0.36]),
          row3("w", "c", [0.1, 0.1, 0.8])]
    assert [s for s, _ in pick_slides(rs, ["a", "b", "c"], 3)] == ["w", "y", "z"]


def test_report_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0 and "report.html" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# a real headless browser
# ------------------------------------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _browse(exe, url, tmp, *args):
    """Run headless Chromium on ``url``; ``args`` must make it exit (--screenshot / --dump-dom)."""
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp / 'profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _console(proc):
    return [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.skipif(_chromium() is None, reason="no chromium / chrome binary found (apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_console_errors(run, tmp_path):
    from PIL import Image

    exe = _chromium()
    # the oracle works: a page with an error shows up in the console log
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('graphmil-probe'); nothere();</script></body></html>")
    proc = _browse(exe, bad.as_uri(), tmp_path, "--dump-dom")
    log = _console(proc)
    assert any("graphmil-probe" in ln for ln in log) and any("nothere" in ln for ln in log), proc.stderr[-2000:]
    # the report: no console message at all, and a non-blank screenshot
    shot = tmp_path / "report.png"
    proc = _browse(exe, (run / "report.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,2200")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _console(proc) == []
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (2200, 1280) and img.std() > 10
    # every image decodes in the browser (a broken control image is counted as broken)
    text = read(run / "report.html")
    n_img = text.count("<img ")
    probe = text.replace("</body>", '<img alt="control" src="data:image/png;base64,AAAA"><script>'
                         "window.addEventListener('load',function(){var ok=0,bad=0;"
                         "for(var i=0;i<document.images.length;i++){var m=document.images[i];"
                         "if(m.complete&&m.naturalWidth>0)ok++;else bad++;}"
                         "document.body.setAttribute('data-ok',ok);document.body.setAttribute('data-bad',bad);});"
                         "</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    proc = _browse(exe, page.as_uri(), tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    m = re.search(r'data-ok="(\d+)" data-bad="(\d+)"', proc.stdout)
    assert m, proc.stdout[-500:] + proc.stderr[-1500:]
    assert (int(m.group(1)), int(m.group(2))) == (n_img, 1)
