
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from graphmil.train import evaluate


def test_evaluate_matches_per_bag_forward_and_batch_size(bags, small):
    from graphmil.metrics import bag_metrics, instance_auroc

    m = small().eval()
    ev1 = evaluate(m, bags, batch_size=1)
    ev5 = evaluate(m, bags, batch_size=5)
    for k in ev1:
        assert ev1[k] == pytest.approx(ev5[k], rel=1e-5, nan_ok=True)
    with torch.no_grad():
        logits = torch.cat([m(Batch.from_data_list([b])).bag_logits for b in bags])
        scores = torch.cat([m(Batch.from_data_list([b])).instance_scores for b in bags])
    y = torch.cat([b.y for b in bags])
    ref = bag_metrics(logits, y)
    for k in ref:
        assert ev5[k] == pytest.approx(ref[k])
    yi = torch.cat([b.y_inst for b in bags])
    assert ev5["instance_auroc"] == pytest.approx(instance_auroc(scores, yi))
    np.testing.assert_allclose(np.concatenate([r.instance_scores for r in ev5.predictions]), scores.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert [r.slide_id for r in ev5.predictions] == [b.slide_id for b in bags]
    for r, b in zip(ev5.predictions, bags):  # positions and labels travel with each record
        np.testing.assert_array_equal(r.pos, b.pos.numpy())
        np.testing.assert_array_equal(r.y_inst, b.y_inst.numpy())
        assert r.label == int(b.y)
    np.testing.assert_allclose(np.stack([r.probabilities[1] for r in ev5.predictions]),
                               torch.sigmoid(logits.view(-1)).numpy(), rtol=1e-5)
