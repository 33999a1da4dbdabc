import torch
from torch_geometric.data import Batch, Data

from graphmil.models import create_model
from graphmil.models.baselines import positive_score


def _batch(D=6):
    g = torch.Generator().manual_seed(1)
    return Batch.from_data_list([Data(x=torch.randn(n, D, generator=g), y=torch.tensor([0]))
                                 for n in (4, 1, 7)])


def test_meanmil_is_mean_of_embeddings_per_bag():
    model = create_model("meanmil", 6, 2, embed_dim=5).eval()
    batch = _batch()
    out = model(batch)
    for k in range(3):
        h = model.embed(batch.x[batch.batch == k])
        torch.testing.assert_close(out.bag_logits[k], model.classifier(h.mean(0)), atol=1e-6, rtol=1e-5)
        # linear classifier: bag logit = mean of instance logits
        inst = model.classifier(h)
        torch.testing.assert_close(out.bag_logits[k], inst.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.instance_scores[batch.batch == k], inst[:, 1] - inst[:, 0],
                                   atol=1e-6, rtol=1e-5)
    assert out.attention is None


def test_maxmil_is_max_of_instance_logits_per_bag():
    model = create_model("maxmil", 6, 1, embed_dim=5).eval()
    batch = _batch()
    out = model(batch)
    for k in range(3):
        inst = model.classifier(model.embed(batch.x[batch.batch == k]))[:, 0]
        torch.testing.assert_close(out.bag_logits[k, 0], inst.max(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.instance_scores[batch.batch == k], inst, atol=1e-6, rtol=1e-5)


def test_positive_score():
    z = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert torch.equal(positive_score(z[:, :1]), z[:, 0])
    assert torch.equal(positive_score(z[:, :2]), torch.tensor([2.0, -1.0]))
    assert torch.equal(positive_score(z), torch.tensor([2.0, 5.0]))
