"""Losses, the queue and the head (docs/METHOD.md Eqs. (5)-(10)) and their 2-process behaviour."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model
from util import common


def test_nna_known_answer():
    # tau 0.5; row 0: positive NN(z0).p0 = 1, negative z0.p1 = 1; row 1: z1.p0 = 0.8, NN(z1).p1 = 0
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    nn_z = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(1.6))) / 2
    assert model.nna_loss(z, nn_z, p, tau=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nnclr_known_answer():
    # row 0: NN(z0).p0 = 1, NN(z0).p1 = 0.6; row 1: NN(z1).p0 = 0.8, NN(z1).p1 = 0
    nn_z = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    expected = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(1.6))) / 2
    assert model.nnclr_loss(nn_z, p, tau=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nna_with_self_as_neighbour_is_infonce():
    torch.manual_seed(0)
    z, p = torch.randn(6, 8), torch.randn(6, 8)
    infonce = F.cross_entropy(F.normalize(z) @ F.normalize(p).T / 0.2, torch.arange(6))
    torch.testing.assert_close(model.nna_loss(z, z, p, 0.2), infonce)
    torch.testing.assert_close(model.nnclr_loss(z, p, 0.2), infonce)


def test_nna_and_nnclr_differ_exactly_where_eqs_8_and_10_say():
    torch.manual_seed(0)
    z, nn_z, p = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    zn, nn_n, pn = F.normalize(z), F.normalize(nn_z), F.normalize(p)
    nna = zn @ pn.T  # off-diagonal from the anchor itself ...
    nna.diagonal().copy_((nn_n * pn).sum(1))  # ... and only the positive from the neighbour
    nnclr = nn_n @ pn.T  # the whole row from the neighbour
    target = torch.arange(5)
    torch.testing.assert_close(model.nna_loss(z, nn_z, p, 0.3), F.cross_entropy(nna / 0.3, target))
    torch.testing.assert_close(model.nnclr_loss(nn_z, p, 0.3), F.cross_entropy(nnclr / 0.3, target))
    assert torch.allclose(nna.diagonal(), nnclr.diagonal()) and not torch.allclose(nna, nnclr)


def test_positive_column_is_offset_by_rank():
    torch.manual_seed(0)
    z, nn_z, p_all = torch.randn(3, 4), torch.randn(3, 4), torch.randn(6, 4)
    # rank 1 of 2: its rows' positives are columns 3..5; rolling p by 3 makes them 0..2
    rolled = torch.cat([p_all[3:], p_all[:3]])
    torch.testing.assert_close(model.nna_loss(z, nn_z, p_all, 0.2, offset=3), model.nna_loss(z, nn_z, rolled, 0.2))
    torch.testing.assert_close(model.nnclr_loss(nn_z, p_all, 0.2, offset=3), model.nnclr_loss(nn_z, rolled, 0.2))


def test_losses_and_lookup_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    z, nn_z, p = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    q = model.NNQueue(16, dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (model.nna_loss(z, nn_z, p.bfloat16(), 0.2), model.nnclr_loss(nn_z, p.bfloat16(), 0.2),
               q.lookup(z.bfloat16(), torch.arange(6), k=1))
    ref_p = p.bfloat16().float()
    torch.testing.assert_close(got[0], model.nna_loss(z, nn_z, ref_p, 0.2))
    torch.testing.assert_close(got[1], model.nnclr_loss(nn_z, ref_p, 0.2))
    assert got[2].dtype == torch.float32


def test_gradient_reaches_only_the_predictions():
    z, nn_z, p = (torch.randn(4, 8, requires_grad=True) for _ in range(3))
    (model.nna_loss(z, nn_z, p, 0.2) + model.nnclr_loss(nn_z, p, 0.2)).backward()
    assert z.grad is None and nn_z.grad is None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Queue

def test_queue_fifo_wraps_around():
    q = model.NNQueue(5, dim=2)
    vecs = F.normalize(torch.randn(7, 2), dim=1)
    q.enqueue(vecs[:3], torch.arange(3))
    q.enqueue(vecs[3:], torch.arange(3, 7))  # 4 more: positions 3, 4, 0, 1
    assert q.idx.tolist() == [5, 6, 2, 3, 4] and q.ptr.item() == 2
    torch.testing.assert_close(q.z[[3, 4, 0, 1]], vecs[3:])


def test_queue_lookup_excludes_the_query_itself():
    q = model.NNQueue(4, dim=2)
    q.enqueue(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), torch.tensor([7, 8, 9, 10]))
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    nn = q.lookup(query, torch.tensor([7, 99]), k=1)
    torch.testing.assert_close(nn, torch.tensor([[0.8, 0.6], [1.0, 0.0]]))  # row 0 may not pick itself


def test_queue_random_pick_only_among_top_k():
    torch.manual_seed(0)
    q = model.NNQueue(50, dim=8)
    query = torch.randn(1, 8)
    top3 = set((F.normalize(query) @ q.z.T).topk(3).indices[0].tolist())
    g = torch.Generator().manual_seed(0)
    picks = [q.lookup(query, torch.tensor([-5]), k=3, generator=g) for _ in range(60)]
    rows = {int((q.z == p).all(1).nonzero()) for p in picks}
    assert rows == top3  # every pick among the top 3, and all three get picked


# ---------------------------------------------------------------------------------------------
# Head

def test_head_shapes_and_layout():
    """MAE-CT's head (ReLU, predictor ends in a Linear) and MIM-Refiner's (GELU, a final BN).

    In both no Linear has a bias, as in the papers' code."""
    h = model.ContrastiveHead(32, proj_hidden=64, proj_dim=16, pred_hidden=48, act="relu", predictor_bn=False)
    z, p = h(torch.randn(5, 32))
    assert z.shape == p.shape == (5, 16)
    kinds = [type(m).__name__ for m in h.projector]
    assert kinds == ["Linear", "SyncBatchNorm1d", "ReLU"] * 2 + ["Linear", "SyncBatchNorm1d"]
    assert [type(m).__name__ for m in h.predictor] == ["Linear", "SyncBatchNorm1d", "ReLU", "Linear"]
    mim = model.ContrastiveHead(32, proj_hidden=64, proj_dim=16, pred_hidden=48)
    assert [type(m).__name__ for m in mim.predictor] == ["Linear", "SyncBatchNorm1d", "GELU", "Linear",
                                                         "SyncBatchNorm1d"]
    for head in (h, mim):
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 5 and all(m.bias is None for m in linears)


# ---------------------------------------------------------------------------------------------
# Two processes (gloo) equal one process on the whole batch: loss, gradients, BN statistics.

def head_loss(head, x, idx_offset, offset):
    z, p = head(x)
    p_all = common.all_gather(p, grad=True)
    nn_z = torch.roll(z.detach(), 1, 0)  # a deterministic stand-in for the queue
    return model.nna_loss(z, nn_z, p_all, 0.2, offset) + model.nnclr_loss(nn_z, p_all, 0.2, offset)


def two_rank_worker(state, x, out_dir):
    """One rank of two (conftest's two_ranks): its half of x through a DDP copy of the head."""
    rank = common.setup_distributed("cpu").rank
    head = model.ContrastiveHead(8, proj_hidden=16, proj_dim=8, pred_hidden=16)
    head.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(head)
    B = len(x) // 2
    loss = head_loss(ddp, x[rank * B:(rank + 1) * B], 0, rank * B)
    loss.backward()  # DDP averages the gradients over ranks
    mean_loss = common.all_gather(loss.detach()[None]).mean()
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": {n: p.grad for n, p in head.named_parameters()},
                    "buffers": dict(head.named_buffers())}, os.path.join(out_dir, "r0.pt"))


def test_two_processes_equal_one_on_the_whole_batch(tmp_path, two_ranks):
    torch.manual_seed(0)
    head = model.ContrastiveHead(8, proj_hidden=16, proj_dim=8, pred_hidden=16)
    x = torch.randn(8, 8)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    two_ranks(two_rank_worker, state, x, str(tmp_path))
    got = torch.load(tmp_path / "r0.pt", weights_only=True)
    # one process: the same loss on each half's rows against all predictions, averaged
    z, p = head(x)
    nn_z = torch.cat([torch.roll(z[:4].detach(), 1, 0), torch.roll(z[4:].detach(), 1, 0)])
    loss = sum(model.nna_loss(z[s], nn_z[s], p, 0.2, s.start) + model.nnclr_loss(nn_z[s], p, 0.2, s.start)
               for s in (slice(0, 4), slice(4, 8))) / 2
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
    for n, p in head.named_parameters():  # float32 sums in another order: ~1e-6 of the largest gradients (~10)
        torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    for n, b in head.named_buffers():  # running BN statistics over the global batch
        torch.testing.assert_close(got["buffers"][n], b, atol=1e-6, rtol=1e-5, msg=n)
