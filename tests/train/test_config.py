import dataclasses

import pytest
import yaml

from graphmil.train.config import (ExperimentConfig, TrainConfig, config_from_dict, dump_config,
                                   load_config)


def test_round_trip_through_a_file(tmp_path):
    cfg = config_from_dict({"model": {"name": "smap", "kwargs": {"embed_dim": 64, "where": "late"}},
                            "data": {"dataset": "synthetic", "kwargs": {"num_bags": 12}},
                            "train": {"epochs": 3, "aem_lambda": 0.005, "class_weights": [1.0, 2.0],
                                      "patience": 2},
                            "cv": {"folds": 3, "seeds": [0, 1]}, "out": "runs/x", "name": "x"})
    p = tmp_path / "a.yaml"
    dump_config(cfg, str(p))
    again = load_config(str(p))
    assert again == cfg
    p2 = tmp_path / "b.yaml"
    dump_config(again, str(p2))
    assert p.read_text() == p2.read_text()
    assert again.train.class_weights == [1.0, 2.0] and again.cv.seeds == [0, 1]


def test_defaults_round_trip():
    cfg = ExperimentConfig()
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert dataclasses.asdict(cfg)["train"] == dataclasses.asdict(TrainConfig())


@pytest.mark.parametrize("d, key, hint", [
    ({"train": {"epoch": 3}}, "train.epoch", "epochs"),
    ({"trian": {}}, "trian", "train"),
    ({"model": {"nam": "abmil"}}, "model.nam", "name"),
    ({"cv": {"fold": 2}}, "cv.fold", "folds"),
])
def test_unknown_key_names_it_with_a_hint(tmp_path, d, key, hint):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    before = sorted(x.name for x in tmp_path.iterdir())
    with pytest.raises(ValueError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert f"unknown key '{key}'" in msg and f"Did you mean '{hint}'" in msg and str(p) in msg
    assert sorted(x.name for x in tmp_path.iterdir()) == before


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="class_weights"):
        TrainConfig(class_weights="auto")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    existing = tmp_path / "exists.yaml"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError):
        dump_config(ExperimentConfig(), str(existing))
    assert existing.read_text() == "keep me"
