import pytest
import torch
from torch_geometric.data import Batch, Data

from graphmil.models import MILOutput, create_model


def grid_bag(h, w, F=12, label=0):
    idx = torch.arange(h * w).view(h, w)
    src, dst = [], []
    for di, dj in [(0, 1), (1, 0), (1, 1), (1, -1)]:
        r0, r1, c0, c1 = 0, h - di, max(0, -dj), w - max(0, dj)
        a = idx[r0:r1, c0:c1].flatten()
        b = idx[r0 + di:r1 + di, c0 + dj:c1 + dj].flatten()
        src += [a, b]
        dst += [b, a]
    ei = torch.stack([torch.cat(src), torch.cat(dst)]) if h * w > 1 else torch.zeros(2, 1, dtype=torch.long)
    return Data(x=torch.randn(h * w, F), edge_index=ei, y=torch.tensor([label]))


@pytest.mark.parametrize("where", ["early", "mid", "late"])
def test_smap_forward_backward_uneven_bags(where):
    batch = Batch.from_data_list([grid_bag(3, 4), grid_bag(1, 1, label=1), grid_bag(2, 5, label=1)])
    model = create_model("smap", 12, embed_dim=16, hidden_channels=8, where=where)
    out = model(batch)
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (3, 1)
    assert out.instance_scores.shape == out.attention.shape == (23,)
    assert torch.equal(out.batch, batch.batch)
    loss = sum(model.losses(out, batch).values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # batched == one bag at a time
    model.eval()
    out = model(batch)
    alone = torch.cat([model(b).bag_logits for b in batch.to_data_list()])
    torch.testing.assert_close(out.bag_logits, alone, atol=1e-5, rtol=1e-5)


def test_smap_requires_graph():
    model = create_model("smap", 12, embed_dim=16, hidden_channels=8)
    with pytest.raises(ValueError, match="GridGraph"):
        model(Data(x=torch.randn(4, 12)))
