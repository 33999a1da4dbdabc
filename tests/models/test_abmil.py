import pytest
import torch
from torch_geometric.data import Batch, Data

from graphmil.models import create_model
from graphmil.models.abmil import ABMIL


def _batch(sizes=(3, 1, 6), D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch.from_data_list([Data(x=torch.randn(n, D, generator=g), y=torch.tensor([i % 2]))
                                 for i, n in enumerate(sizes)])


@pytest.mark.parametrize("gated", [True, False])
def test_matches_hand_formula_per_bag(gated):
    model = create_model("abmil", 8, 2, embed_dim=16, attention_dim=4, gated=gated).eval()
    batch = _batch()
    out = model(batch)
    W, b = model.embed[0].weight, model.embed[0].bias
    V, U, w = model.pool.V, model.pool.U, model.pool.w.weight
    for k in range(batch.num_graphs):  # independent per-bag loop
        x = batch.x[batch.batch == k]
        h = torch.relu(x @ W.T + b)
        e = torch.tanh(V(h))
        if gated:
            e = e * torch.sigmoid(U(h))
        e = (e @ w.T).squeeze(-1)
        a = torch.softmax(e, 0)
        z = (a[:, None] * h).sum(0)
        logits = model.classifier(z)
        torch.testing.assert_close(out.bag_logits[k], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.instance_scores[batch.batch == k], e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.attention[batch.batch == k], a, atol=1e-6, rtol=1e-5)
    assert (model.pool.U is not None) == gated


def test_permutation_of_bags_in_batch():
    model = create_model("abmil", 8, embed_dim=16).eval()
    data = _batch().to_data_list()
    a = model(Batch.from_data_list(data)).bag_logits
    b = model(Batch.from_data_list(data[::-1])).bag_logits
    torch.testing.assert_close(a, b.flip(0), atol=1e-6, rtol=1e-5)


def test_single_data_and_multilayer_embedding():
    model = ABMIL(8, embed_dim=[32, 16, 8], dropout=0.5).eval()
    assert [m.out_features for m in model.embed if isinstance(m, torch.nn.Linear)] == [32, 16, 8]
    bag = Data(x=torch.randn(5, 8))
    out = model(bag)
    assert out.bag_logits.shape == (1, 1) and torch.equal(out.batch, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


def test_repr_and_args():
    m = ABMIL(8, 3, embed_dim=16, attention_dim=4, gated=False)
    r = repr(m)
    assert "embed_dim=16" in r and "attention_dim=4" in r and "gated=False" in r
    assert (m.in_channels, m.num_classes, m.embed_dim, m.attention_dim, m.gated) == (8, 3, 16, 4, False)
    with pytest.raises(ValueError, match="dropout"):
        ABMIL(8, dropout=1.5)
    with pytest.raises(ValueError, match="embed_dim"):
        ABMIL(8, embed_dim=[])
