import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.nn import APPNP
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import erdos_renyi_graph, to_dense_adj, to_undirected

from graphmil.nn.conv import SmConv
from graphmil.nn.conv.sm import sm_normalized_adjacency, sparse_cg_solve


def random_graph(n, p=0.2, seed=0, weighted=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ei = erdos_renyi_graph(n, p)
    w = torch.rand(ei.size(1), generator=g, dtype=dtype) + 0.1 if weighted else None
    ei, w = to_undirected(ei, w, num_nodes=n)
    return ei, w


def dense_laplacian(ei, w, n, dtype=torch.float64):
    # PyG flow source -> target: row i of A holds the edges into i (to_dense_adj is source-major)
    A = to_dense_adj(ei, edge_attr=w, max_num_nodes=n)[0].to(dtype).T
    d = A.sum(1)
    dinv = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    Ahat = dinv[:, None] * A * dinv[None, :]
    return torch.eye(n, dtype=dtype) - Ahat, Ahat


def dense_solve(u, ei, w, alpha):
    n = u.size(0)
    L, _ = dense_laplacian(ei, w, n, u.dtype)
    gamma = alpha / (1 - alpha)
    return torch.linalg.solve(torch.eye(n, dtype=u.dtype) + gamma * L, u)


def grid_edges(h, w):
    idx = torch.arange(h * w).view(h, w)
    src, dst = [], []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            r0, r1, c0, c1 = max(0, -di), h - max(0, di), max(0, -dj), w - max(0, dj)
            src.append(idx[r0:r1, c0:c1].flatten())
            dst.append(idx[r0 + di:r1 + di, c0 + dj:c1 + dj].flatten())
    return torch.stack([torch.cat(src), torch.cat(dst)])


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("learn_alpha", [False, True])
def test_approx_large_K_equals_exact_equals_dense_solve(alpha, learn_alpha):
    n = 30
    ei, w = random_graph(n, seed=int(alpha * 10))
    u = torch.randn(n, 6, dtype=torch.float64)
    approx = SmConv(alpha, K=150, learn_alpha=learn_alpha).double()
    exact = SmConv(alpha, learn_alpha=learn_alpha, mode="exact", cg_tol=1e-12).double()
    a = float(approx.alpha_value(torch.float64).detach())  # = alpha up to the float32 rounding of theta
    assert abs(a - alpha) < 1e-6
    ref = dense_solve(u, ei, w, a)
    ga, ge = approx(u, ei, w), exact(u, ei, w)
    torch.testing.assert_close(ga, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ge, ref, atol=1e-9, rtol=1e-9)
    if learn_alpha:
        # the parameter, not the constructor float, drives the operator
        with torch.no_grad():
            approx.theta.fill_(0.3)
            exact.theta.fill_(0.3)
        a2 = float(torch.sigmoid(torch.tensor(0.3, dtype=torch.float64)))
        ref2 = dense_solve(u, ei, w, a2)
        torch.testing.assert_close(approx(u, ei, w), ref2, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(exact(u, ei, w), ref2, atol=1e-9, rtol=1e-9)


def test_approx_is_the_K_step_recursion_and_not_converged():
    n, alpha, K = 25, 0.9, 3
    ei, w = random_graph(n, seed=3)
    u = torch.randn(n, 4, dtype=torch.float64)
    _, Ahat = dense_laplacian(ei, w, n)
    g = u
    for _ in range(K):
        g = alpha * Ahat @ g + (1 - alpha) * u
    out = SmConv(alpha, K=K, learn_alpha=False).double()(u, ei, w)
    torch.testing.assert_close(out, g)
    assert (out - dense_solve(u, ei, w, alpha)).abs().max() > 1e-3  # K=3 is far from converged
    assert torch.equal(SmConv(alpha, K=0).double()(u, ei, w), u)


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_approx_equals_pyg_appnp_on_gcn_norm_weights(alpha):
    n = 50
    ei, w = random_graph(n, seed=5)
    x = torch.randn(n, 8, dtype=torch.float64)
    ei_n, w_n = gcn_norm(ei, w, n, add_self_loops=False)
    ref = APPNP(K=10, alpha=1 - alpha, add_self_loops=False, normalize=False)(x, ei_n, w_n)
    out = SmConv(alpha, K=10, learn_alpha=False).double()(x, ei, w)
    torch.testing.assert_close(out, ref)
    # normalize=False takes the given weights as Â
    out2 = SmConv(alpha, K=10, learn_alpha=False, normalize=False).double()(x, ei_n, w_n)
    torch.testing.assert_close(out2, ref)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_block_diagonal_batch_equals_each_bag_alone(mode):
    bags = []
    for i, n in enumerate([7, 12, 1, 20]):
        ei, w = random_graph(n, p=0.3, seed=i)
        bags.append(Data(x=torch.randn(n, 5, dtype=torch.float64), edge_index=ei, edge_weight=w))
    batch = Batch.from_data_list(bags)
    conv = SmConv(0.6, K=10, mode=mode, cg_tol=1e-12).double()
    out = conv(batch.x, batch.edge_index, batch.edge_weight, batch.batch)
    alone = torch.cat([conv(b.x, b.edge_index, b.edge_weight) for b in bags])
    torch.testing.assert_close(out, alone)


def test_normalisation_is_recomputed_every_call():
    conv = SmConv(0.5, K=10, learn_alpha=False).double()
    u = torch.randn(15, 3, dtype=torch.float64)
    for seed in range(2):
        ei, w = random_graph(15, seed=seed)
        _, Ahat = dense_laplacian(ei, w, 15)
        g = u
        for _ in range(10):
            g = 0.5 * Ahat @ g + 0.5 * u
        torch.testing.assert_close(conv(u, ei, w), g)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_dirichlet_energy_decreases(mode):
    ei = grid_edges(8, 9)
    n = 72
    L, _ = dense_laplacian(ei, None, n)
    u = torch.randn(n, 4, dtype=torch.float64)
    energy = lambda g: torch.trace(g.T @ L @ g)  # noqa: E731
    prev = energy(u)
    for alpha in (0.2, 0.5, 0.9):
        g = SmConv(alpha, mode=mode).double()(u, ei)
        e = energy(g)
        assert e < prev
        prev = e


def test_exact_gradients_match_dense_solve_autograd():
    n = 30
    ei, w = random_graph(n, seed=7)
    u = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    conv = SmConv(0.65, mode="exact", cg_tol=1e-13).double()
    target = torch.randn(n, 3, dtype=torch.float64)
    (conv(u, ei, w) * target).sum().backward()
    gu, gt = u.grad.clone(), conv.theta.grad.clone()

    u2 = u.detach().clone().requires_grad_()
    theta = torch.tensor(float(conv.theta), dtype=torch.float64, requires_grad=True)
    alpha = torch.sigmoid(theta)
    L, _ = dense_laplacian(ei, w, n)
    ref = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + alpha / (1 - alpha) * L, u2)
    (ref * target).sum().backward()
    torch.testing.assert_close(gu, u2.grad, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(gt, theta.grad, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("grads", ["u,w", "u", "alpha only"])
def test_approx_gradients_finite_and_match_dense_recursion(grads):
    n, K = 25, 10
    ei, w = random_graph(n, seed=9)
    w = w.clone().requires_grad_("w" in grads)
    u = torch.randn(n, 3, dtype=torch.float64, requires_grad="u" in grads)
    conv = SmConv(0.5, K=K).double()
    conv(u, ei, w).pow(2).sum().backward()
    for g, name in ((u.grad, "u"), (conv.theta.grad, "alpha"), (w.grad, "w")):
        if name in grads or name == "alpha":
            assert g is not None and torch.isfinite(g).all()

    u2 = u.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    alpha = torch.sigmoid(theta)
    _, Ahat = dense_laplacian(ei, w2, n)
    g = u2
    for _ in range(K):
        g = alpha * Ahat @ g + (1 - alpha) * u2
    g.pow(2).sum().backward()
    torch.testing.assert_close(conv.theta.grad, theta.grad)
    if "u" in grads:
        torch.testing.assert_close(u.grad, u2.grad)
    if "w" in grads:
        torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_isolated_and_one_instance_bags(mode):
    alpha = 0.3
    # nodes 0-2 form a path; node 3 is isolated
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    u = torch.randn(4, 2, dtype=torch.float64)
    out = SmConv(alpha, K=200, mode=mode, cg_tol=1e-12).double()(u, ei)
    torch.testing.assert_close(out[3], (1 - alpha) * u[3])
    ref = dense_solve(u, ei, None, alpha)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out_sl = SmConv(alpha, K=200, mode=mode, self_loops_for_isolated=True, cg_tol=1e-12).double()(u, ei)
    torch.testing.assert_close(out_sl[3], u[3])
    torch.testing.assert_close(out_sl[:3], out[:3])
    # a one-instance bag gets a self-loop (unchanged), with or without a given self-loop edge
    one = torch.randn(1, 5, dtype=torch.float64)
    conv = SmConv(alpha, mode=mode).double()
    torch.testing.assert_close(conv(one, torch.empty(2, 0, dtype=torch.long)), one)
    torch.testing.assert_close(conv(one, torch.zeros(2, 1, dtype=torch.long)), one)
    # in a batch: node 3 is isolated inside bag 0 -> (1 - α) U; node 4 is a one-instance bag -> U
    u5 = torch.randn(5, 2, dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 0, 1])
    out5 = SmConv(alpha, K=200, mode=mode, cg_tol=1e-12).double()(u5, ei, batch=batch)
    torch.testing.assert_close(out5[3], (1 - alpha) * u5[3])
    torch.testing.assert_close(out5[4], u5[4])
    torch.testing.assert_close(out5[:3], dense_solve(u5[:3], ei, None, alpha), atol=1e-6, rtol=1e-6)
    # without the batch vector the 5 nodes are one bag: node 4 is merely isolated
    out5b = SmConv(alpha, K=200, mode=mode, cg_tol=1e-12).double()(u5, ei)
    torch.testing.assert_close(out5b[4], (1 - alpha) * u5[4])


def test_feature_width_one_and_vector_input():
    ei = grid_edges(4, 5)
    u = torch.randn(20, 1)
    conv = SmConv(0.5)
    out = conv(u, ei)
    assert out.shape == (20, 1)
    torch.testing.assert_close(conv(u[:, 0], ei), out[:, 0])
    wide = torch.cat([u, torch.randn(20, 3)], 1)
    torch.testing.assert_close(conv(wide, ei)[:, :1], out)
    # the inference path (fixed alpha, no autograd) agrees with the autograd path
    fixed = SmConv(0.5, learn_alpha=False)
    with torch.no_grad():
        torch.testing.assert_close(fixed(u, ei), out)
        torch.testing.assert_close(fixed(wide, ei), conv(wide, ei))
    torch.testing.assert_close(fixed(u.requires_grad_(), ei), out)


def test_learnable_alpha_stays_in_unit_interval():
    conv = SmConv(0.5)
    with torch.no_grad():
        conv.theta.fill_(50.0)
    assert 0 < float(conv.alpha_value()) < 1
    conv.reset_parameters()
    assert abs(float(conv.alpha_value()) - 0.5) < 1e-7
    assert SmConv(0.5, learn_alpha=False).theta is None
    assert len(list(SmConv(0.5, learn_alpha=False).parameters())) == 0


@pytest.mark.parametrize("theta", [50.0, -50.0, 1e4, -1e4])
def test_saturated_theta_keeps_alpha_strictly_inside_and_everything_finite(theta):
    # float32 sigmoid(50) is exactly 1.0 and sigmoid(-1e4) exactly 0.0: alpha must not be
    assert float(torch.sigmoid(torch.tensor(abs(theta)))) == 1.0
    eps32 = torch.finfo(torch.float32).eps
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        conv = SmConv(0.5)
        with torch.no_grad():
            conv.theta.fill_(theta)
        a = conv.alpha_value(dtype)
        eps = torch.finfo(dtype).eps
        assert a.dtype == dtype and 0 < float(a) < 1 and 0 < float(1 - a) < 1
        assert float(a) == (1 - eps if theta > 0 else eps)  # the bound itself, exactly
    ei = grid_edges(4, 5)
    for mode in ("approx", "exact"):
        for needs_w in (False, True):  # the one-node CPU training path and the generic loop
            conv = SmConv(0.5, K=10, mode=mode, cg_max_iter=50)  # finiteness needs no convergence
            with torch.no_grad():
                conv.theta.fill_(theta)
            u = torch.randn(20, 3, requires_grad=True)
            w = torch.rand(ei.size(1)).add_(0.1).requires_grad_(needs_w and mode == "approx")
            out = conv(u, ei, w)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            (out * torch.randn_like(out)).sum().backward()
            assert torch.isfinite(u.grad).all() and torch.isfinite(conv.theta.grad).all()
            if theta < 0:  # alpha = eps: hardly any smoothing, G = eps A G + (1 - eps) U
                torch.testing.assert_close(out, u.detach(), atol=10 * eps32 * float(u.abs().max()), rtol=0)


def test_alpha_is_sigmoid_exactly_inside_the_bounds_with_a_straight_through_gradient():
    conv = SmConv(0.3)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(conv.alpha_value(dtype), torch.sigmoid(conv.theta.detach().to(dtype)))
    assert abs(float(SmConv(0.3).alpha_value(torch.float64)) - 0.3) < 1e-7  # init: the requested alpha
    # theta = 8: sigmoid = 0.99966, above the float16 bound 1 - 2^-10: clipped, gradient sigma'(8) kept
    conv = SmConv(0.5)
    with torch.no_grad():
        conv.theta.fill_(8.0)
    a = conv.alpha_value(torch.float16)
    assert float(a) == 1 - 2 ** -10
    a.float().backward()
    s = torch.sigmoid(torch.tensor(8.0))
    torch.testing.assert_close(conv.theta.grad, s * (1 - s))
    # a fixed alpha is clipped the same way, per dtype
    fixed = SmConv(1 - 1e-9, learn_alpha=False)
    assert float(fixed.alpha_value(torch.float32)) == 1 - torch.finfo(torch.float32).eps
    assert float(fixed.alpha_value(torch.float64)) == 1 - 1e-9


def test_sparse_cg_solve_matches_scipy():
    scipy = pytest.importorskip("scipy.sparse.linalg")
    n = 20
    M = torch.randn(n, n, dtype=torch.float64)
    S = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, 2, dtype=torch.float64)
    x, it = sparse_cg_solve(lambda v: S @ v, b, tol=1e-12)
    for j in range(2):
        xs, info = scipy.cg(S.numpy(), b[:, j].numpy(), rtol=1e-12)
        assert info == 0
        torch.testing.assert_close(x[:, j], torch.from_numpy(xs), atol=1e-8, rtol=1e-8)
    assert 0 < it <= 100


def test_normalized_adjacency_matches_dense():
    ei, w = random_graph(12, seed=11)
    adj = sm_normalized_adjacency(ei, 12, w)
    _, Ahat = dense_laplacian(ei, w, 12)
    torch.testing.assert_close(adj.to_dense(), Ahat)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="alpha"):
        SmConv(1.0)
    with pytest.raises(ValueError, match="mode"):
        SmConv(mode="fast")
    with pytest.raises(ValueError, match="K"):
        SmConv(K=-1)
    conv = SmConv()
    with pytest.raises(ValueError, match="edge_index"):
        conv(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="edge_index"):
        conv(torch.randn(3, 2), torch.tensor([[0], [5]]))
    with pytest.raises(ValueError, match="batch"):
        conv(torch.randn(3, 2), torch.tensor([[0, 1], [1, 0]]), batch=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="edge_weight"):
        conv(torch.randn(3, 2), torch.tensor([[0, 1], [1, 0]]), torch.ones(3))


def test_repr():
    r = repr(SmConv(0.3, K=5, mode="exact"))
    assert "alpha=0.3" in r and "K=5" in r and "mode='exact'" in r


@pytest.mark.slow
def test_torch_compile():
    conv = SmConv(0.5, K=4)
    ei = grid_edges(5, 5)
    u = torch.randn(25, 3)
    ref = conv(u, ei)
    try:
        compiled = torch.compile(conv)
        out = compiled(u, ei)
    except Exception as e:  # pragma: no cover - depends on the torch/PyG/compiler stack
        pytest.skip(f"torch.compile of sparse CSR SpMM not supported here: {type(e).__name__}")
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_cuda_matches_cpu(mode):
    ei, w = random_graph(30, seed=2, dtype=torch.float32)
    u = torch.randn(30, 4, requires_grad=True)
    conv = SmConv(0.5, mode=mode)
    ref = conv(u, ei, w)
    ref.sum().backward()
    conv_c = SmConv(0.5, mode=mode).cuda()
    uc = u.detach().cuda().requires_grad_()
    out = conv_c(uc, ei.cuda(), w.cuda())
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(uc.grad.cpu(), u.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normalize", [True, False])
def test_approx_on_directed_graph_matches_dense_recursion_with_input_gradient(normalize):
    # directed edges and weights: checks the flow (source -> target) and the transposed backward
    n, K, alpha = 20, 6, 0.7
    ei = torch.randint(0, n, (2, 60))
    ei = ei[:, ei[0] != ei[1]]
    w = torch.rand(ei.size(1), dtype=torch.float64)
    u = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, 3, dtype=torch.float64)
    conv = SmConv(alpha, K=K, learn_alpha=False, normalize=normalize).double()
    (conv(u, ei, w) * target).sum().backward()

    u2 = u.detach().clone().requires_grad_()
    A = torch.zeros(n, n, dtype=torch.float64).index_put_((ei[1], ei[0]), w, accumulate=True)  # A[target, source]
    if normalize:
        deg = A.sum(1)
        dinv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
        A = dinv[None, :] * A * dinv[:, None]
    g = u2
    for _ in range(K):
        g = alpha * A @ g + (1 - alpha) * u2
    (g * target).sum().backward()
    torch.testing.assert_close(conv(u.detach(), ei, w), g.detach())
    torch.testing.assert_close(u.grad, u2.grad)
