"""torchrun with 2 gloo processes × batch b trains exactly like 1 process × batch 2b."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from graphmil.train.distributed import init_distributed, cleanup_distributed, is_main_process
    from graphmil.train import TrainConfig, fit
    from graphmil.models import create_model
    from graphmil.datasets import SyntheticBags

    info = init_distributed("gloo")
    assert info.is_distributed and info.world_size == 2, info
    bags = list(SyntheticBags(num_bags=16, num_features=8, seed=5, min_instances=5, max_instances=15))
    torch.manual_seed(0)
    model = create_model("abmil", 8, embed_dim=8, attention_dim=4)
    cfg = TrainConfig(epochs=2, batch_size=int(sys.argv[2]), lr=1e-2, scheduler="cosine",
                      aem_lambda=0.1, progress=False, device="cpu", seed=7)
    fit(model, bags, None, cfg)
    if is_main_process():
        torch.save(model.state_dict(), sys.argv[1])
    cleanup_distributed()
""")


def _single(batch_size):
    from graphmil.datasets import SyntheticBags
    from graphmil.models import create_model
    from graphmil.train import TrainConfig, fit

    bags = list(SyntheticBags(num_bags=16, num_features=8, seed=5, min_instances=5, max_instances=15))
    torch.manual_seed(0)
    model = create_model("abmil", 8, embed_dim=8, attention_dim=4)
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=1e-2, scheduler="cosine", aem_lambda=0.1,
                      progress=False, device="cpu", seed=7)
    fit(model, bags, None, cfg)
    return model.state_dict()


def test_two_gloo_processes_equal_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(script), str(out), "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    one = _single(8)  # 2 processes x 4 bags = 1 process x 8 bags
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-4)
    # and it is not trivially equal: a different global batch gives different weights
    other = _single(4)
    assert any(not torch.allclose(other[k], one[k], atol=1e-4) for k in one)


def test_not_distributed_by_default():
    from graphmil.train.distributed import broadcast_object, dist_info, init_distributed, is_main_process

    info = init_distributed() if os.environ.get("WORLD_SIZE", "1") == "1" else dist_info()
    assert not info.is_distributed and info.world_size == 1 and is_main_process()
    assert broadcast_object({"a": 1}) == {"a": 1}
