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


@pytest.mark.parametrize("sm_transformer,sm_pool", [(True, True), (False, True), (True, False), (False, False)])
def test_smtap_forward_backward_uneven_bags(sm_transformer, sm_pool):
    batch = Batch.from_data_list([grid_bag(3, 4), grid_bag(1, 1, label=1), grid_bag(2, 5, label=1)])
    model = create_model("smtap", 12, embed_dim=16, hidden_channels=8, heads=4,
                         sm_transformer=sm_transformer, sm_pool=sm_pool)
    out = model(batch)
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (3, 1)
    assert out.instance_scores.shape == out.attention.shape == (23,)
    sum(model.losses(out, batch).values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    out = model(batch)
    alone = torch.cat([model(b).bag_logits for b in batch.to_data_list()])
    torch.testing.assert_close(out.bag_logits, alone, atol=1e-5, rtol=1e-5)
    # permuting the instances of the batch permutes the scores and keeps the bag logits
    perm = torch.randperm(batch.num_nodes)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    pb = Batch(x=batch.x[perm], batch=batch.batch[perm], edge_index=inv[batch.edge_index], y=batch.y)
    pb._num_graphs = 3
    out_p = model(pb)
    torch.testing.assert_close(out_p.bag_logits, out.bag_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.instance_scores, out.instance_scores[perm], atol=1e-5, rtol=1e-5)


def test_smtap_requires_graph():
    model = create_model("smtap", 12, embed_dim=16, hidden_channels=8, heads=4)
    with pytest.raises(ValueError, match="GridGraph"):
        model(Data(x=torch.randn(4, 12)))
