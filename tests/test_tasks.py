"""The graded tasks of the course assignment (docs/TEACHING.md), one or more tests per task.

Each test is tagged `@pytest.mark.task(N)` (`pytest -m taskN` selects it, conftest.py adds the marker),
calls the one function of its task on small hand-made inputs, and compares with a reference computed
independently here: a plain loop, a hand computation or scipy. No test builds a model or calls another
task's function, so a student copy with any task unsolved still runs every other task's tests. No
fixtures either: tools/selfcheck_assignment.py calls these functions directly.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import cluster
import knn
import model
import probe
import refine
from util import common

EQ = "docs/METHOD.md Eq."


def close(got, want, tol, what):
    """Assert got == want within tol (absolute), with a message saying both and which equation."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: expected\n{want}\ngot\n{got}\n(max error {err:.2e} > tolerance {tol:.0e})"


@pytest.mark.task(1)
def test_sincos_pos_embed():
    dim, gh, gw = 8, 2, 3
    w = [10000 ** (-i / (dim / 4)) for i in range(dim // 4)]
    sc = (math.sin, math.cos)
    want = [[f(c * wi) for f in sc for wi in w] + [f(r * wi) for f in sc for wi in w]
            for r in range(gh) for c in range(gw)]  # row-major: token r * gw + c
    close(model.sincos_pos_embed(dim, gh, gw), want, 1e-6,
          f"{EQ} (1): pos(r, c) = [sin(c w), cos(c w), sin(r w), cos(r w)], rows of the grid one after another")


@pytest.mark.task(2)
def test_attention_forward():
    torch.manual_seed(0)
    B, N, C, H = 2, 5, 8, 2
    attn, x = model.Attention(C, H), torch.randn(B, N, C)
    d = C // H
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).detach().double()  # (B, N, 3C): q | k | v, heads side by side
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        q = qkv[b, i, h * d:(h + 1) * d]
        scores = [float(q @ qkv[b, j, C + h * d:C + (h + 1) * d]) / math.sqrt(d) for j in range(N)]
        e = [math.exp(s - max(scores)) for s in scores]
        out[b, i, h * d:(h + 1) * d] = sum(e[j] / sum(e) * qkv[b, j, 2 * C + h * d:2 * C + (h + 1) * d]
                                           for j in range(N))
    want = out @ attn.proj.weight.T.double() + attn.proj.bias.double()
    close(attn(x).detach(), want.detach(), 1e-5,
          f"{EQ} (2), Attn: per head softmax(q k^T / sqrt(C/heads)) v, heads concatenated, then proj")


def small_queue():
    """A queue of 4 unit vectors in the plane, dataset indices 10..13."""
    q = model.NNQueue(4, dim=2)
    q.z.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]))
    q.idx.copy_(torch.tensor([10, 11, 12, 13]))
    return q


@pytest.mark.task(3)
def test_queue_lookup_top1_excludes_own_image():
    q = small_queue()
    z = torch.tensor([[2.0, 0.1], [2.0, 0.1], [0.0, -3.0]])
    got = q.lookup(z, torch.tensor([0, 10, 11]), k=1)
    # by hand: the first query's nearest is entry 0; the second is image 10 itself, so entry 3 (0.6 * 2 + 0.8 * 0.1
    # beats 0); the third points down: entry 0 and 2 tie at 0, entry 1 (own image 11) excluded, entry 3 is -0.8
    want_rows = [0, 3]
    close(got[:2], q.z[want_rows], 1e-6, f"{EQ} (6): NN(z) = the most similar entry, never the query's own image")
    assert got[2].tolist() in ([1.0, 0.0], [-1.0, 0.0]), f"{EQ} (6): expected entry 0 or 2, got {got[2].tolist()}"


@pytest.mark.task(3)
def test_queue_lookup_topk_draws_among_the_k_best():
    q, z = small_queue(), torch.tensor([[1.0, 0.2]])
    gen = torch.Generator().manual_seed(0)
    seen = {tuple(round(v, 4) for v in q.lookup(z, torch.tensor([99]), k=2, generator=gen)[0].tolist())
            for _ in range(40)}
    want = {(1.0, 0.0), (0.6, 0.8)}  # similarities 1.0, 0.2, -1.0, 0.76 (unnormalised): the top 2 are entries 0, 3
    assert seen == want, f"{EQ} (6) with k=2: expected draws among {want} (both seen in 40 tries), got {seen}"


@pytest.mark.task(4)
def test_queue_enqueue_wraps_around():
    q = model.NNQueue(5, dim=2)
    q.enqueue(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]), torch.tensor([7, 8, 9]))
    q.enqueue(torch.tensor([[0.0, -5.0], [2.0, 0.0], [4.0, 3.0]]), torch.tensor([1, 2, 3]))
    # by hand: slots 0-2 get 7, 8, 9; then slots 3, 4 and (wrapping) 0 get 1, 2, 3; the pointer ends at 1
    assert q.idx.tolist() == [3, 8, 9, 1, 2], f"{EQ} (7): expected indices [3, 8, 9, 1, 2], got {q.idx.tolist()}"
    close(q.z, [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0]], 1e-6,
          f"{EQ} (7): FIFO of L2-normalised projections, oldest overwritten first")
    assert int(q.ptr) == 1, f"{EQ} (7): expected the write pointer at 1 (6 writes into 5 slots), got {int(q.ptr)}"


def loss_inputs():
    """B = 2 anchors of rank 1 of 3 (offset 2), 6 predictions, width 3."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(6, 3, generator=g), 0.5, 2)


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def cross_entropy(logits, target):
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(v - m) for v in logits)))


@pytest.mark.task(5)
def test_nna_loss():
    z, nn_z, p, tau, off = loss_inputs()
    zs, ns, ps = [unit(r) for r in z.tolist()], [unit(r) for r in nn_z.tolist()], [unit(r) for r in p.tolist()]
    want = sum(cross_entropy([dot(ns[j] if k == off + j else zs[j], ps[k]) / tau for k in range(6)], off + j)
               for j in range(2)) / 2
    close(model.nna_loss(z, nn_z, p, tau, off), want, 1e-5,
          f"{EQ} (8): negatives z_j . p_k / tau, the positive NN(z_j) . p_(offset+j) / tau, cross-entropy, mean")


@pytest.mark.task(6)
def test_nnclr_loss():
    _, nn_z, p, tau, off = loss_inputs()
    ns, ps = [unit(r) for r in nn_z.tolist()], [unit(r) for r in p.tolist()]
    want = sum(cross_entropy([dot(ns[j], ps[k]) / tau for k in range(6)], off + j) for j in range(2)) / 2
    close(model.nnclr_loss(nn_z, p, tau, off), want, 1e-5,
          f"{EQ} (10): logits NN(z_j) . p_k / tau for every k, target offset + j, mean cross-entropy")


@pytest.mark.task(7)
def test_ema_update():
    torch.manual_seed(0)
    ema, online = nn.Linear(3, 2), nn.Linear(3, 2)
    before, theirs = [p.detach().clone() for p in ema.parameters()], [p.detach().clone() for p in online.parameters()]
    refine.ema_update(ema, online, 0.9)
    for got, e, o in zip(ema.parameters(), before, theirs):
        close(got.detach(), 0.9 * e + 0.1 * o, 1e-6, f"{EQ} (12): ema <- 0.9 * ema + 0.1 * online")
    for got, o in zip(online.parameters(), theirs):
        close(got.detach(), o, 0.0, f"{EQ} (12): the online network must stay as it is")


@pytest.mark.task(8)
def test_lr_scale():
    depth, lam = 4, 0.5
    cases = {"blocks.0.attn.qkv.weight": lam ** 4, "blocks.3.mlp.fc2.bias": lam ** 1,
             "patch_embed.proj.weight": lam ** 5, "cls_token": lam ** 5, "pos_embed": lam ** 5,
             "norm.weight": 1.0}  # block j = stored index + 1
    for name, want in cases.items():
        got = common.lr_scale(name, depth, lam)
        assert math.isclose(got, want, rel_tol=1e-12), \
            f"{EQ} (13): lr_scale({name!r}, depth 4, decay 0.5): expected {want} = 0.5^(L+1-j), got {got}"


@pytest.mark.task(9)
def test_warmup_cosine():
    # by hand, 10 steps, 2 of warm-up, peak 1, floor 0.1: 0.5, 1 (warm-up); then 0.1 + 0.9 * (1 + cos(pi t)) / 2
    want = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.55, 10: 0.1, 4: 0.1 + 0.45 * (1 + math.cos(math.pi / 4))}
    for step, w in want.items():
        got = common.warmup_cosine(step, 10, 2, 1.0, 0.1)
        assert math.isclose(got, w, abs_tol=1e-12), \
            f"{EQ} (14): warmup_cosine(step {step}, 10 steps, 2 warm-up, peak 1, floor 0.1): expected {w}, got {got}"


@pytest.mark.task(10)
def test_knn_vote():
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.3]])
    labels = torch.tensor([[1, 0, 1], [2, 2, 2]])
    want = [[math.exp(5), math.exp(9) + math.exp(1), 0.0], [0.0, 0.0, 2 * math.exp(2) + math.exp(3)]]
    close(knn.knn_vote(sims, labels, 3, 0.1), want, 0.05,  # float32 scores up to e^9 ~ 8103
          f"{EQ} (17): score(c) = sum over the neighbours of class c of exp(sim / T), T = 0.1")


def brute_force_accuracy(y_true, y_pred):
    """Best accuracy over every one-to-one map of clusters to classes, by enumeration."""
    clusters, classes = sorted(set(y_pred)), sorted(set(y_true))
    best = 0
    for perm in itertools.permutations(classes + [None] * max(0, len(clusters) - len(classes)), len(clusters)):
        m = dict(zip(clusters, perm))
        best = max(best, sum(m[p] == t for t, p in zip(y_true, y_pred)))
    return best / len(y_true)


@pytest.mark.task(11)
def test_cluster_accuracy():
    got = cluster.cluster_accuracy([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 3, 7])
    assert math.isclose(got, 5 / 6), f"{EQ} (25): expected 5/6 (5 -> 0, 3 -> 1, 7 -> 2), got {got}"
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, c = rng.integers(0, 3, 12).tolist(), rng.integers(0, 4, 12).tolist()  # more clusters than classes
        want = brute_force_accuracy(y, c)
        got = cluster.cluster_accuracy(y, c)
        assert math.isclose(got, want), f"{EQ} (25): labels {y}, clusters {c}: expected {want}, got {got}"


@pytest.mark.task(12)
def test_grid_loss():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(2, 3, 4, generator=g), torch.tensor([0, 3, 1])  # (G, B, C)
    want = sum(sum(cross_entropy(logits[k, b].tolist(), int(y[b])) for b in range(3)) / 3 for k in range(2))
    close(probe.grid_loss(logits, y), want, 1e-5,
          f"{EQ} (19): the sum over the probes of each probe's mean cross-entropy")
