"""Known answers for refine.py's parts: the EMA update, what Refiner.forward feeds each head, the target projector.

The EMA update (Eq. (12) of docs/METHOD.md) by hand and in closed form, what Refiner.forward feeds each head (Eq. (4)),
and MAE-CT's EMA target projector (§6) through build, start_phase and refine_step. Every expected value is computed
here from the formula quoted beside it, with torch's plain operations, never by calling the function under test a
second time."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
import recipe
import refine
from util import common

CPU = common.Dist(0, 1, torch.device("cpu"))


# --- ema_update: e <- m * e + (1 - m) * o, parameters only (Eq. (12)) ----------------------------

def hand_set(first: float, stat: float) -> nn.Module:
    """Linear(2, 2) then BatchNorm1d(2), its parameters and statistics set to known values.

    Its 10 parameters first, first + 1/2, ..., first + 9/2 in parameters() order; its running mean and variance `stat`,
    `stat` + 1, batches tracked 7."""
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        nn.utils.vector_to_parameters(first + 0.5 * torch.arange(10.0), net.parameters())
        net[1].running_mean.fill_(stat)
        net[1].running_var.fill_(stat + 1)
        net[1].num_batches_tracked.fill_(7)
    return net


def flat(net) -> list:
    return nn.utils.parameters_to_vector(net.parameters()).tolist()


# m = 3/4 and parameters that are multiples of 1/2 below 10 in magnitude: after k updates every value is a
# multiple of 2^-1 * 4^-k, so up to the 8 updates below 4 + 17 = 21 significant bits, within float32's 24. Each
# value is exact, and the update must equal the hand computation (in Python's float64) to the last bit.
M = 0.75


def test_ema_update_once_by_hand():
    """One update: e' = m * e + (1 - m) * o for each parameter; e.g. the first, 3/4 * 1 + 1/4 * 5 = 2."""
    ema, online = hand_set(1.0, stat=3.0), hand_set(5.0, stat=-1.0)
    ema.requires_grad_(False)  # as Parts.ema: averaging needs no gradient
    online[0].weight.requires_grad_(False)  # a frozen online parameter (MAE-CT's lower blocks) is averaged too
    e0, o, online_state = flat(ema), flat(online), copy.deepcopy(online.state_dict())
    refine.ema_update(ema, online, M)
    assert flat(ema) == [M * e + (1 - M) * x for e, x in zip(e0, o)]
    assert flat(ema)[0] == 0.75 * 1.0 + 0.25 * 5.0 == 2.0
    # buffers are not averaged: the EMA keeps its own running statistics and count
    assert ema[1].running_mean.tolist() == [3.0, 3.0] and ema[1].running_var.tolist() == [4.0, 4.0]
    assert ema[1].num_batches_tracked.item() == 7
    assert all(torch.equal(v, online_state[k]) for k, v in online.state_dict().items())  # online untouched


def test_ema_update_several_times_by_hand_and_in_closed_form():
    """Three updates towards a changing online o_1, o_2, o_3: e_k = m * e_(k-1) + (1 - m) * o_k, step by step.

    Then n updates towards a fixed o: e_k - o = m * (e_(k-1) - o), so e_n = o + m^n * (e_0 - o)."""
    ema = hand_set(1.0, stat=3.0)
    want = flat(ema)
    for first in (5.0, -3.0, 2.5):  # o_1, o_2, o_3
        online = hand_set(first, stat=-1.0)
        refine.ema_update(ema, online, M)
        want = [M * e + (1 - M) * x for e, x in zip(want, flat(online))]
        assert flat(ema) == want
    e0, online, n = flat(ema), hand_set(-2.0, stat=-1.0), 5
    for _ in range(n):
        refine.ema_update(ema, online, M)
    assert flat(ema) == [x + M ** n * (e - x) for e, x in zip(e0, flat(online))]
    assert ema[1].running_mean.tolist() == [3.0, 3.0] and ema[1].num_batches_tracked.item() == 7


# --- Refiner.forward: Eq. (4), then the heads on all views (MIM-Refiner) or view by view (MAE-CT) ----

def features_by_hand(vit, views, blocks, feature):
    """Eq. (4) one view and one block at a time.

    Block b's output, through the final norm when b is the last block, then its CLS token or the mean of its patch
    tokens; the views' rows one after the other."""
    out = {b: [] for b in blocks}
    with torch.no_grad():
        for v in views:
            for b in blocks:
                t = vit.forward_blocks(v, [b])[0]  # (B, 1+N, D)
                t = vit.final_norm(t) if b == vit.depth else t
                out[b].append(t[:, 0] if feature == "cls" else t[:, 1:].mean(1))
    return {b: torch.cat(f) for b, f in out.items()}  # (V*B, D)


# The same float32 arithmetic on batches of B rows here and 2B rows in the Refiner: a kernel may sum in
# another order, ~1e-7 relative; a wrong feature, row order or head batch is off by O(0.1).
CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature", ["cls", "mean"])
def test_refiner_forward_equals_the_features_and_heads_by_hand(feature, monkeypatch):
    """Heads on blocks 1 and 2 of a 2-block ViT; two global 32 px views and two local 16 px ones.

    Each view has its own statistics. The encoder runs once per resolution; h[b] is Eq. (4) by hand, rows in view
    order; the heads' (z, p) are head(h) on all V*B rows (MIM-Refiner) or head(h_v) per view (MAE-CT,
    per_view=True)."""
    torch.manual_seed(0)
    vit = model.ViT(dim=16, depth=2, heads=2, patch=4, img_size=32)
    B, blocks = 3, [1, 2]
    views = [torch.randn(B, 3, 32, 32), 2 * torch.randn(B, 3, 32, 32) + 1,
             torch.randn(B, 3, 16, 16) - 1, 0.5 * torch.randn(B, 3, 16, 16)]
    want_h = features_by_hand(vit, views, blocks, feature)
    calls, real = [], vit.forward_blocks
    monkeypatch.setattr(vit, "forward_blocks", lambda x, b: calls.append(tuple(x.shape)) or real(x, b))
    out = {}
    for per_view in (False, True):
        torch.manual_seed(1)  # the same head weights both ways
        net = refine.Refiner(vit, blocks, feature, per_view, proj_hidden=16, proj_dim=8, pred_hidden=16)
        calls.clear()
        h, zp = net(views)
        assert calls == [(2 * B, 3, 32, 32), (2 * B, 3, 16, 16)]  # one encoder pass per resolution
        for b in blocks:
            assert h[b].shape == (4 * B, 16)
            torch.testing.assert_close(h[b], want_h[b], **CLOSE)
            head = net.heads[str(b)]
            with torch.no_grad():  # training mode: each BatchNorm normalises with the rows it is given
                want = head(want_h[b]) if not per_view else [torch.cat(t) for t in zip(*map(head, want_h[b].chunk(4)))]
            for got, w in zip(zp[b], want):  # z, then p
                assert got.shape == (4 * B, 8)
                torch.testing.assert_close(got, w, **CLOSE)
        out[per_view] = zp
    for b in blocks:  # the two ways differ (by 1000 x CLOSE): views of other statistics, other BatchNorm statistics
        assert not torch.allclose(out[False][b][0], out[True][b][0], atol=1e-2)


# --- MAE-CT's EMA target projector (§6) through build, start_phase and refine_step -------------------

B = 4


def mae_ct_parts():
    """A 2-block ViT and MAE-CT's parts by the small recipe on 64 images, batch 4.

    One head on block 2, block 1 frozen in phase 2, a queue of 32 (= 64 // 2 // 4 * 4); EMA momentum m = 1/2, target
    momentum m_t = 3/4."""
    torch.manual_seed(0)
    vit = model.ViT(dim=16, depth=2, heads=2, patch=4, img_size=32)
    settings = refine.Settings(method="mae-ct", views="crop-flip", batch_size=B, proj_hidden=16, proj_dim=8,
                               pred_hidden=16, ema_momentum=0.5, target_momentum=0.75)
    cfg = recipe.resolve(settings, vit, 1, 64)
    assert (cfg.heads, cfg.freeze_blocks, cfg.queue_size) == ("2", 1, 32)
    return cfg, refine.build(cfg, vit)


def phase(index):
    """The heads' warm-up (index 0) or the refinement (1) as a Phase, at a fixed lr 0.05.

    Large enough that one AdamW step (each parameter moves by about the lr) stands far above float32 rounding."""
    return refine.Phase(refine.PHASES[index], first=2 * index, steps=2, peak_lr=0.05, warmup=0, tau=0.15, topk=1,
                        neighbours=True)


def views_of(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(B, 3, 32, 32, generator=g), 2 * torch.randn(B, 3, 32, 32, generator=g) + 1]


def idx_of(step):
    return torch.arange(B) + 10 * (step + 1)  # data set indices, new at each step


def first_view_h(vit, view):
    """Eq. (4) for the head on the last block, one view: the final-normed CLS token (B, D)."""
    with torch.no_grad():
        return vit.final_norm(vit.forward_blocks(view, [vit.depth])[0])[:, 0]


def projected(projector, h):
    """What the queue stores of `projector` on one view's rows: the projection in training mode, L2-normalised.

    Training mode: BatchNorm statistics of these B rows, as heads_loss runs MAE-CT's projectors view by view;
    L2-normalised as NNQueue.z."""
    with torch.no_grad():
        return F.normalize(copy.deepcopy(projector)(h), dim=1)  # a copy: its running statistics are not ours


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# Eq. (12) checked in float32 at its default tolerance (atol 1e-5): one lerp rounds at ~1e-7, while a momentum off
# by 0.01 would move a parameter by ~0.01 * lr = 5e-4.

def test_mae_ct_target_projector_and_queue_through_both_phases():
    """Phase 1 and 2 of MAE-CT's target projector, the EMA encoder and the queue, against Eq. (12).

    Phase 1 (index 0): the target projector and the EMA encoder stay as built, and the queue takes the online
    projector's projections of view 0. start_phase of phase 2 copies the projector into its target, weights and
    BatchNorm statistics. Each phase 2 step then moves the target by Eq. (12), target = m_t * old target + (1 - m_t) *
    new projector, and the EMA encoder likewise with m; the queue takes the *target's* projections. Resumed inside
    phase 2, start_phase leaves the target as it is."""
    cfg, parts = mae_ct_parts()
    head, target, queue, vit = parts.refiner.heads["2"], parts.targets["2"], parts.queues["2"], parts.refiner.vit
    built_target, built_ema = state(target), state(parts.ema)
    net, optim = refine.start_phase(parts, cfg, phase(0), CPU, None)
    for step in (0, 1):
        h0 = first_view_h(vit, views_of(step)[0])
        online_z, target_z = projected(head.projector, h0), projected(target, h0)
        refine.refine_step(net, optim, parts, views_of(step), idx_of(step), phase(0), step, cfg)
        rows = slice(step * B, (step + 1) * B)  # Eq. (7): the write pointer advances B rows a step
        torch.testing.assert_close(queue.z[rows], online_z, **CLOSE)
        assert torch.equal(queue.idx[rows], idx_of(step))
        if step == 1:  # the projector has trained a step, the target not: the rows are the projector's
            assert not torch.allclose(queue.z[rows], target_z, atol=1e-3)  # 100 x CLOSE
        assert all(torch.equal(v, built_target[k]) for k, v in target.state_dict().items())  # not run, not moved
        assert all(torch.equal(v, built_ema[k]) for k, v in parts.ema.state_dict().items())
    moved = state(head.projector)  # the warm-up trained the projector and moved its BatchNorm statistics
    assert not torch.equal(moved["0.weight"], built_target["0.weight"])
    assert not torch.equal(moved["1.running_mean"], built_target["1.running_mean"])

    net, optim = refine.start_phase(parts, cfg, phase(1), CPU, None)
    assert target.state_dict().keys() == moved.keys()
    assert all(torch.equal(v, moved[k]) for k, v in target.state_dict().items())  # an exact copy

    for step in (2, 3):
        old_target, old_ema, old_projector = state(target), state(parts.ema), state(head.projector)
        h0 = first_view_h(vit, views_of(step)[0])
        online_z, target_z = projected(head.projector, h0), projected(target, h0)
        refine.refine_step(net, optim, parts, views_of(step), idx_of(step), phase(1), step, cfg)
        rows = slice(step * B, (step + 1) * B)
        torch.testing.assert_close(queue.z[rows], target_z, **CLOSE)
        assert torch.equal(queue.idx[rows], idx_of(step))
        if step == 3:  # after a phase 2 step the target lags the projector: the rows are the target's
            assert not torch.allclose(queue.z[rows], online_z, atol=1e-3)  # 100 x CLOSE
        new_projector = dict(head.projector.named_parameters())
        for name, t in target.named_parameters():  # Eq. (12) with m_t = 3/4
            assert (new_projector[name] - old_projector[name]).abs().max() > 1e-3, name  # moved, by ~lr = 0.05
            torch.testing.assert_close(t, 0.75 * old_target[name] + 0.25 * new_projector[name], msg=name)
        online = dict(vit.named_parameters())
        for name, e in parts.ema.named_parameters():  # Eq. (12) with m = 1/2; the frozen block 1: both unchanged
            torch.testing.assert_close(e, 0.5 * old_ema[name] + 0.5 * online[name], msg=name)

    kept = state(target)
    refine.start_phase(parts, cfg, phase(1), CPU, {"phase": "refine", "optimizer": optim.state_dict()})  # a resume
    assert all(torch.equal(v, kept[k]) for k, v in target.state_dict().items())
    assert not torch.equal(kept["0.weight"], head.projector[0].weight)
