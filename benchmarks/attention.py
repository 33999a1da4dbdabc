"""Benchmark: ragged bag-local attention (no padding) vs the padded path it replaced.

Workload (the case that motivated the change): one bag of 12,000 instances plus 15 bags of 500,
width D = 64, 4 heads, forward + backward (gradients w.r.t. the input and the weights) of

* ``BagSelfAttention(64, heads=4, out_proj=False)`` (SmTAP's attention): **new** = the package's
  ragged path (:func:`graphmil.nn.ragged.ragged_attention`: PyTorch's fused CPU flash kernel on
  power-of-two size buckets); **old** = a copy of the previous implementation kept in this script
  (``to_dense_batch`` to ``[B, N_max, D]`` and a boolean mask ``[B, 1, N_max, N_max]``), with the
  same weights;
* ``AnchorRegionCorrection(64, heads=4)`` (AINet's ARC; 8 equal consecutive regions per bag, one
  anchor per region, neighbour ``'next'``): new = the package; old = a copy of the previous padded
  implementation (regions padded to ``[R, L_max, D]``, keys ``[R, 2 L_max + A_max, D]``, key mask).

Then the large bag is doubled (24,000): the new path's memory must grow with N (about 2x for the
large bag), not with N_max² (4x). The old bag attention at 24,000 is not run (its
``[B, 1, N_max, N_max]`` mask alone is 4x its measured peak at 12,000); the row says what it would
need and what is available.

Every configuration runs in a **fresh subprocess** with ``torch.set_num_threads(2)``: warm-up
steps, then the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after
``malloc_trim``) minus the resident set before the timed steps (peak over the timed steps), and the
median wall time of the timed steps. The old-path child also runs the new path on the same data
and reports the largest difference of the outputs and input gradients.

``--candidates`` measures the kernels that were considered for the new path on the same workload
(size buckets + fused SDPA, nested jagged tensors + SDPA, ``flex_attention`` with a document mask,
a hand-written blockwise online softmax with a recomputing backward, padding with a key mask).

Timings on a shared 2-core machine are noisy; memory figures are reliable.

Usage::

    python benchmarks/attention.py --quick       # about a minute (smoke test, not a measurement)
    python benchmarks/attention.py               # full, ~5 minutes
    python benchmarks/attention.py --candidates  # the kernel candidates, ~6 minutes
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks" / "attention.md"
D, HEADS = 64, 4


# ----------------------------------------------------------------------------- memory (child)
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- old paths (reference copies)
def padded_bag_attention(att, x, index, dim_size):
    """The previous ``BagSelfAttention.forward``: pad to the largest bag, ``[B, 1, M, M]`` mask."""
    import torch
    import torch.nn.functional as F
    from torch_geometric.utils import to_dense_batch

    dense, mask = to_dense_batch(x, index, batch_size=dim_size)
    B, M, _ = dense.shape
    d = att.channels // att.heads
    q, k, v = att.qkv(dense).view(B, M, 3, att.heads, d).permute(2, 0, 3, 1, 4)
    attn_mask = (mask[:, None, :] | ~mask[:, :, None]).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(B, M, att.channels)[mask]
    return out if att.proj is None else att.proj(out)


def padded_arc(arc, r, region, batch, anchor_index, R, B):
    """The previous ``AnchorRegionCorrection.forward`` (neighbour 'next'): regions padded to the largest."""
    import torch
    import torch.nn.functional as F
    from torch_geometric.utils import scatter, to_dense_batch

    from graphmil.nn.anchor import region_neighbours

    n, Dm = r.shape
    H, d = arc.heads, arc.channels // arc.heads
    region_batch = scatter(batch, region, 0, R, reduce="max")
    nbr, nvalid = region_neighbours(region_batch, B, arc.neighbour)
    q, k, v = arc.lin_q(r), arc.lin_k(r), arc.lin_v(r)
    perm = torch.argsort(region, stable=True)
    rs = region[perm]
    qd, qmask = to_dense_batch(q[perm], rs, batch_size=R)
    kd, _ = to_dense_batch(k[perm], rs, batch_size=R)
    vd, _ = to_dense_batch(v[perm], rs, batch_size=R)
    L = qd.size(1)
    a_batch = batch[anchor_index]
    a_perm = torch.argsort(a_batch, stable=True)
    a_idx = anchor_index[a_perm]
    ka, amask = to_dense_batch(k[a_idx], a_batch[a_perm], batch_size=B)
    va, _ = to_dense_batch(v[a_idx], a_batch[a_perm], batch_size=B)
    Kn = nbr.size(1)
    keys = torch.cat([kd, kd[nbr].reshape(R, Kn * L, Dm), ka[region_batch]], 1)
    vals = torch.cat([vd, vd[nbr].reshape(R, Kn * L, Dm), va[region_batch]], 1)
    kmask = torch.cat([qmask, (qmask[nbr] & nvalid.unsqueeze(-1)).reshape(R, Kn * L), amask[region_batch]], 1)
    T = keys.size(1)
    hd = lambda t, length: t.view(R, length, H, d).transpose(1, 2)  # noqa: E731
    att = F.scaled_dot_product_attention(hd(qd, L), hd(keys, T), hd(vals, T), attn_mask=kmask.view(R, 1, 1, T))
    att = att.transpose(1, 2).reshape(R, L, Dm)[qmask]
    out = torch.empty_like(r)
    out[perm] = arc.lin_out(att)
    return arc.norm(r + out)


# ----------------------------------------------------------------------------- candidate kernels
def _cand_bucket(q, k, v, ptr):
    from graphmil.nn.ragged import ragged_attention

    return ragged_attention(q, k, v, ptr)


def _cand_njt(q, k, v, ptr):
    import torch
    import torch.nn.functional as F

    jag = lambda t: torch.nested.nested_tensor_from_jagged(t, ptr).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(jag(q), jag(k), jag(v)).transpose(1, 2).values()


def _cand_flex(q, k, v, ptr):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.size(0)
    doc = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])
    bm = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, n, n, device="cpu")
    f = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731
    return flex_attention(f(q), f(k), f(v), block_mask=bm)[0].transpose(0, 1)


def _cand_pad_key(q, k, v, ptr):
    import torch
    import torch.nn.functional as F
    from torch_geometric.utils import to_dense_batch

    B = ptr.numel() - 1
    index = torch.repeat_interleave(torch.arange(B), ptr[1:] - ptr[:-1])
    H, d = q.shape[1:]
    (qd, mask), (kd, _), (vd, _) = (to_dense_batch(t.flatten(1), index, batch_size=B) for t in (q, k, v))
    M = qd.size(1)
    f = lambda t: t.view(B, M, H, d).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(f(qd), f(kd), f(vd), attn_mask=mask.view(B, 1, 1, M))
    return o.transpose(1, 2)[mask]


def _blockwise_function():
    """A hand-written blockwise online softmax over the flat sequence (query tiles of 256 rows
    attend to the key tiles their bags span, bag-id mask inside a tile pair), with a flash-style
    recomputing backward: memory O(N·D) + one chunk of tile pairs (8 MiB of scores)."""
    import torch
    import torch.nn.functional as F

    T, budget = 256, 8 << 20

    def tiles(t, NT, pad):
        H, d = t.shape[1:]
        return F.pad(t, (0, 0, 0, 0, 0, pad)).view(NT, T, H, d).transpose(1, 2).contiguous()

    class Blockwise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, seg, ptr):
            n, H, d = q.shape
            NT = (n + T - 1) // T
            pad = NT * T - n
            qt, kt, vt = tiles(q, NT, pad), tiles(k, NT, pad), tiles(v, NT, pad)
            segq = F.pad(seg, (0, pad), value=-1).view(NT, T)
            segk = F.pad(seg, (0, pad), value=-2).view(NT, T)
            last = seg[(torch.arange(NT) * T + T - 1).clamp(max=n - 1)]
            klo, khi = ptr[segq[:, 0]] // T, (ptr[last + 1] - 1) // T
            cnt = khi - klo + 1
            pq = torch.repeat_interleave(torch.arange(NT), cnt)
            pk = torch.arange(pq.numel()) - torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt) + klo[pq]
            m = torch.full((NT, H, T), -1e30)
            l, acc = torch.zeros(NT, H, T), torch.zeros(NT, H, T, d)
            P = max(1, budget // (H * T * T * 4))
            for c in range(0, pq.numel(), P):  # fixed-size chunks of tile pairs
                a, b = pq[c:c + P], pk[c:c + P]
                s = torch.matmul(qt[a], kt[b].transpose(-1, -2)).mul_(d ** -0.5)
                s.masked_fill_(segq[a][:, None, :, None] != segk[b][:, None, None, :], float("-inf"))
                mn = m.index_reduce(0, a, s.amax(-1), "amax")
                alpha = torch.exp(m - mn)
                m = mn
                l.mul_(alpha)
                acc.mul_(alpha[..., None])
                s.sub_(m[a][..., None]).exp_()
                l.index_add_(0, a, s.sum(-1))
                acc.index_add_(0, a, torch.matmul(s, vt[b]))
            o = acc / l.clamp(min=1e-30)[..., None]
            lse = m + torch.log(l.clamp(min=1e-30))
            ctx.save_for_backward(qt, kt, vt, segq, segk, pq, pk, o, lse)
            ctx.n, ctx.P = n, P
            return o.transpose(1, 2).reshape(NT * T, H, d)[:n]

        @staticmethod
        def backward(ctx, go):
            qt, kt, vt, segq, segk, pq, pk, o, lse = ctx.saved_tensors
            n, P, NT = ctx.n, ctx.P, qt.size(0)
            H, d = qt.size(1), qt.size(3)
            gt = tiles(go, NT, NT * T - n)
            Dl = (gt * o).sum(-1)
            dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
            for c in range(0, pq.numel(), P):
                a, b = pq[c:c + P], pk[c:c + P]
                s = torch.matmul(qt[a], kt[b].transpose(-1, -2)).mul_(d ** -0.5)
                s.masked_fill_(segq[a][:, None, :, None] != segk[b][:, None, None, :], float("-inf"))
                p = s.sub_(lse[a][..., None]).exp_()
                ga = gt[a]
                dv.index_add_(0, b, torch.matmul(p.transpose(-1, -2), ga))
                ds = p.mul_(torch.matmul(ga, vt[b].transpose(-1, -2)).sub_(Dl[a][..., None])).mul_(d ** -0.5)
                dq.index_add_(0, a, torch.matmul(ds, kt[b]))
                dk.index_add_(0, b, torch.matmul(ds.transpose(-1, -2), qt[a]))
            un = lambda t: t.transpose(1, 2).reshape(NT * T, H, d)[:n]  # noqa: E731
            return un(dq), un(dk), un(dv), None, None

    return Blockwise


def _cand_blockwise(q, k, v, ptr):
    import torch

    seg = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])
    return _blockwise_function().apply(q, k, v, seg, ptr)


CANDIDATES = {
    "bucket": ("size buckets + fused SDPA (chosen; `ragged_attention`)", _cand_bucket),
    "njt": ("nested jagged tensors + SDPA", _cand_njt),
    "flex": ("`flex_attention`, document mask (eager)", _cand_flex),
    "blockwise": ("hand-written blockwise online softmax, recomputing backward", _cand_blockwise),
    "pad_key": ("pad to N_max + key mask `[B, 1, 1, N_max]`", _cand_pad_key),
}


# ----------------------------------------------------------------------------- one configuration (child)
def child(cfg: dict) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg["threads"])
    sizes = cfg["sizes"]
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    res: dict = {}
    if cfg["kind"] == "bag":
        from graphmil.nn.transformer import BagSelfAttention

        torch.manual_seed(0)
        att = BagSelfAttention(D, heads=HEADS, out_proj=False)
        x = torch.randn(n, D, generator=g, requires_grad=True)
        grad_out = torch.randn(n, D, generator=g)
        params = list(att.parameters())

        def fwd(path):
            return att(x, index, dim_size=len(sizes)) if path == "new" else padded_bag_attention(att, x, index, len(sizes))
    elif cfg["kind"] == "arc":
        from graphmil.nn.anchor import AnchorRegionCorrection

        per = cfg["regions"]
        sz = torch.tensor(sizes)
        # `per` near-equal consecutive regions per bag, global ids ordered by bag
        local = torch.arange(n) - torch.repeat_interleave(sz.cumsum(0) - sz, sz)
        region = index * per + local * per // sz[index]
        R, B = len(sizes) * per, len(sizes)
        rcount = torch.bincount(region, minlength=R)
        anchor_index = (rcount.cumsum(0) - rcount)[rcount > 0]  # one anchor per region (its first row)
        torch.manual_seed(0)
        arc = AnchorRegionCorrection(D, heads=HEADS, neighbour="next")
        x = torch.randn(n, D, generator=g, requires_grad=True)
        grad_out = torch.randn(n, D, generator=g)
        params = list(arc.parameters())

        def fwd(path):
            if path == "new":
                return arc(x, region, index, anchor_index, R, B)
            return padded_arc(arc, x, region, index, anchor_index, R, B)
    else:  # kernel candidate on raw q, k, v
        _, fn = CANDIDATES[cfg["path"]]
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])
        qkv = [torch.randn(n, HEADS, D // HEADS, generator=g, requires_grad=cfg["backward"]) for _ in range(3)]
        x, params = qkv[0], qkv[1:]
        grad_out = torch.randn(n, HEADS, D // HEADS, generator=g)

        def fwd(path):
            return fn(*qkv, ptr)

    def step(path):
        out = fwd(path)
        if cfg.get("backward", True):
            grads = torch.autograd.grad((out * grad_out).sum(), [x] + params)
            return out.detach(), grads[0]
        return out.detach(), None

    try:
        for _ in range(cfg["warmup"]):
            step(cfg["path"])
        mem_ok = _reset_peak()
        before = _status_kb("VmRSS")
        ts = []
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            out, gx = step(cfg["path"])
            ts.append(time.perf_counter() - t0)
        peak = (_status_kb("VmHWM") - before) / 1024 if mem_ok else float("nan")
        res.update(time_s=statistics.median(ts), times=ts, peak_mb=peak)
        if cfg.get("compare"):
            new_out, new_gx = step("new")
            res["max_diff"] = max(float((out - new_out).abs().max()), float((gx - new_gx).abs().max()))
    except (RuntimeError, NotImplementedError, MemoryError) as e:  # report, e.g. a failed allocation
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def run_child(cfg: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": f"child exited with {p.returncode}: {tail[:200]}"}


# ----------------------------------------------------------------------------- page
def _machine(threads: int) -> list:
    import torch

    return [
        f"- machine: `{platform.platform()}`, `{platform.machine()}`, {os.cpu_count()} CPUs, "
        f"`torch.set_num_threads({threads})`, shared with other work (timings noisy; memory reliable)",
        f"- versions: Python {platform.python_version()}, torch `{torch.__version__}`",
        f"- date: {datetime.date.today().isoformat()}",
    ]


def _fmt_mb(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _section(name: str, text: str) -> None:
    begin, end = f"<!-- attention:{name}:begin -->", f"<!-- attention:{name}:end -->"
    page = PAGE.read_text() if PAGE.exists() else "# Ragged bag-local attention\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in page and end in page:
        page = page[:page.index(begin)] + block + page[page.index(end) + len(end):]
    else:
        page = page.rstrip() + "\n\n" + block + "\n"
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)


def _rows_md(rows: list) -> list:
    out = ["| layer | path | sizes | N | peak MB (fwd+bwd) | time s (median) | timed runs | load | note |",
           "|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        times = ", ".join(f"{t:.2f}" for t in r.get("times", []))
        out.append(f"| {r['layer']} | {r['path']} | {r['label']} | {r['n']:,} | {_fmt_mb(r.get('peak_mb'))} | "
                   f"{'—' if 'time_s' not in r else format(r['time_s'], '.2f')} | {times or '—'} | "
                   f"{'—' if 'load' not in r else format(r['load'], '.1f')} | {r.get('note', '')} |")
    return out


def _write_main(rows: list, quick: bool, threads: int, command: str) -> None:
    lines = [f"Generated by `{command}`" + (" (quick mode: smoke test, not a measurement)." if quick else "."), ""]
    lines += _machine(threads)
    lines += [f"- workload: D = {D}, {HEADS} heads, float32, CPU, forward + backward (gradients w.r.t. the input "
              "and the weights); fresh subprocess per row; peak = `VmHWM` − RSS before the timed steps "
              "(default glibc allocator, freed heap trimmed first); load = 1-minute load average when the row "
              "started (2 cores: above ~2 the row shared the CPUs)", ""]
    lines += _rows_md(rows)
    by = {(r["layer"], r["path"], r["label"]): r for r in rows}
    notes = []
    for layer in ("BagSelfAttention", "ARC"):
        small = [r for r in rows if r["layer"] == layer and r.get("big") == 1]
        for r_old in (r for r in small if r["path"] == "old (padded)"):
            r_new = by.get((layer, "new (ragged)", r_old["label"]))
            if r_new and "peak_mb" in r_old and "peak_mb" in r_new and r_new.get("time_s"):
                notes.append(f"- {layer}, {r_old['label']}: new path **{r_old['time_s'] / r_new['time_s']:.1f}×** faster, "
                             f"**{r_old['peak_mb'] / max(r_new['peak_mb'], 1e-9):.0f}×** less peak memory "
                             f"({_fmt_mb(r_new['peak_mb'])} vs {_fmt_mb(r_old['peak_mb'])} MB); outputs and input "
                             f"gradients agree to {r_old.get('max_diff', float('nan')):.1e}")
        news = {r.get("big"): r for r in rows if r["layer"] == layer and r["path"] == "new (ragged)"}
        if 1 in news and 2 in news and "peak_mb" in news[1] and "peak_mb" in news[2]:
            a, b = news[1], news[2]
            notes.append(f"- {layer}, doubling the large bag: new-path peak × **{b['peak_mb'] / a['peak_mb']:.2f}** "
                         f"(N × {b['n'] / a['n']:.2f}; an N_max² term would give × 4), time × {b['time_s'] / a['time_s']:.2f} "
                         f"(the Σ n_b² work of the large bag × 4)")
    if notes:
        lines += [""] + notes
    _section("quick" if quick else "main", "\n".join(lines))


def main_run(quick: bool, threads: int, command: str) -> None:
    big, small, count = (1000, 50, 15) if quick else (12000, 500, 15)
    rows = []

    def add(row):
        rows.append(row)
        _write_main(rows, quick, threads, command)
        print(json.dumps(row), flush=True)

    def cfg(kind, path, sizes, warmup, reps, **kw):
        return dict(kind=kind, path="new" if path.startswith("new") else "old", sizes=sizes, warmup=warmup,
                    reps=reps, threads=threads, backward=True, **kw)

    for layer, kind, extra in (("BagSelfAttention", "bag", {}), ("ARC", "arc", {"regions": 8})):
        for mult in (1, 2):
            n_big = big * mult
            sizes = [n_big] + [small] * count
            label = f"{n_big:,} + {count}×{small}" + (", 8 regions/bag" if kind == "arc" else "")
            base = dict(layer=layer, label=label, n=sum(sizes), big=mult)
            load = os.getloadavg()[0]
            # the new path
            reps = 1 if quick else 3
            r = run_child(cfg(kind, "new", sizes, 1 if mult == 1 else 0, reps, **extra))
            add({**base, "path": "new (ragged)", "load": load, **r, "note": r.get("error", "")})
            # the old padded path: once at the base size (one timed run: it takes minutes), projected
            # at the doubled size
            if mult == 1:
                load = os.getloadavg()[0]
                r = run_child(cfg(kind, "old", sizes, 0, 1, compare=True, **extra))
                add({**base, "path": "old (padded)", "load": load, **r, "note": r.get("error", "one timed run")})
                old_peak = r.get("peak_mb")
            elif kind == "bag":
                need = 4 * old_peak if old_peak else float("nan")
                avail = _available_mb()
                why = "does not fit" if not need < 0.6 * avail else "not run to keep the run short"
                add({**base, "path": "old (padded)",
                     "note": f"{why}: would need ≈ {need / 1024:.1f} GB (4 × its peak at {big:,}: the "
                             f"`[B, 1, N_max, N_max]` mask), {avail / 1024:.1f} GB available"})
    print(f"wrote {PAGE}")


def candidates_run(threads: int, command: str, quick: bool) -> None:
    big, small, count = (1000, 50, 15) if quick else (12000, 500, 15)
    sizes = [big] + [small] * count
    n, H, d = sum(sizes), HEADS, D // HEADS
    rows = []
    b_nmax2 = len(sizes) * big * big * H * 4  # one float32 [B, H, N_max, N_max] tensor
    n2 = n * n * H * 4  # one float32 [1, H, N, N] tensor
    # what the quadratic candidates materialise (a lower bound), against the memory available
    need = {"njt": b_nmax2, "flex": 3 * n2}

    def write():
        lines = [f"Generated by `{command}`" + (" (quick mode)." if quick else "."), ""] + _machine(threads)
        lines += [f"- workload: {big:,} + {count}×{small} instances (N = {n:,}), {H} heads of width {d}, float32; "
                  "attention core only (q, k, v given), forward + backward unless noted; fresh subprocess per row", "",
                  "| candidate | peak MB | time s (median) | timed runs | load | note |", "|---|---:|---:|---|---:|---|"]
        for r in rows:
            times = ", ".join(f"{t:.2f}" for t in r.get("times", []))
            lines.append(f"| {r['name']} | {_fmt_mb(r.get('peak_mb'))} | "
                         f"{'—' if 'time_s' not in r else format(r['time_s'], '.2f')} | {times or '—'} | "
                         f"{'—' if 'load' not in r else format(r['load'], '.1f')} | {r.get('note', '')} |")
        _section("candidates-quick" if quick else "candidates", "\n".join(lines))

    for key, (name, _) in CANDIDATES.items():
        avail = _available_mb() * 1024 * 1024
        backward = key != "flex"
        note = "" if backward else "forward only: no CPU backward (`NotImplementedError`)"
        if key in need and need[key] > 0.6 * avail:
            what = ("one `[B, H, N_max, N_max]` float32 tensor: on CPU it runs the math kernel on padded bags"
                    if key == "njt" else "three `[1, H, N, N]` float32 tensors: eager mode scores the whole sequence")
            r = {"note": f"not run: would allocate ≥ {need[key] / 1e9:.1f} GB ({what}); "
                         f"{avail / 1e9:.1f} GB available"}
        else:
            load = os.getloadavg()[0]
            slow = key in ("pad_key", "njt", "flex")  # one timed run (minutes each); others: median of 3
            r = run_child(dict(kind="kernel", path=key, sizes=sizes, warmup=0 if slow and not quick else 1,
                               reps=1 if slow and not quick else 3, threads=threads, backward=backward))
            if "error" in r:
                note = (note + "; " if note else "") + r["error"]
            r["note"], r["load"] = note, load
        rows.append({"name": name, **r})
        write()
        print(json.dumps(rows[-1]), flush=True)
    print(f"wrote {PAGE}")


def main(argv=None) -> None:
    global PAGE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (< 1 minute; smoke test)")
    p.add_argument("--candidates", action="store_true", help="measure the kernel candidates instead")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=PAGE, help=f"results page (default {PAGE.relative_to(ROOT)})")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    PAGE = args.out
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    command = "python benchmarks/attention.py" + (" --candidates" if args.candidates else "") + \
        (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads != 2 else "")
    if args.candidates:
        candidates_run(args.threads, command, args.quick)
    else:
        main_run(args.quick, args.threads, command)


if __name__ == "__main__":
    main()
