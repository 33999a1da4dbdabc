"""Checkpoints: atomic writes, clear errors for unreadable files, the model rebuilt from its spec."""

import os

import pytest
import torch

from graphmil.models import create_model
from graphmil.train import load_checkpoint, read_checkpoint, save_checkpoint


def test_round_trip_and_clear_errors(tmp_path):
    m = create_model("abmil", 6, embed_dim=8, attention_dim=4)
    spec = {"name": "abmil", "in_channels": 6, "num_classes": 1, "kwargs": {"embed_dim": 8, "attention_dim": 4}}
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, m, epoch=3, model_spec=spec)
    assert not os.path.exists(path + ".tmp")
    m2, ck = load_checkpoint(path)
    assert ck["epoch"] == 3 and not m2.training
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pt"))
    for name, data in (("garbage.pt", b"\x80\x04garbage"), ("empty.pt", b""),
                       ("half.pt", open(path, "rb").read()[:200])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"checkpoint '.*{name}' is not readable"):
            load_checkpoint(str(tmp_path / name))
    torch.save({"weights": 1}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a graphmil checkpoint"):
        read_checkpoint(str(tmp_path / "other.pt"))
    save_checkpoint(str(tmp_path / "nospec.pt"), m)
    with pytest.raises(ValueError, match="no 'model_spec'"):
        load_checkpoint(str(tmp_path / "nospec.pt"))
    bad = dict(spec, in_channels=7)
    save_checkpoint(str(tmp_path / "mismatch.pt"), m, model_spec=bad)
    with pytest.raises(ValueError, match="does not fit the model it names"):
        load_checkpoint(str(tmp_path / "mismatch.pt"))
