"""refine.py: recipe resolution, lr multipliers, views, losses, both phases, resume, DDP (docs/METHOD.md §4-8)."""
import copy
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, cpu_settings, make_image_folder, make_images, read_log

import model
import recipe
import refine
from util import common


def settings(ckpt, out, **kw):
    """refine.py on 32 images of the embedded data, batch 8 (4 steps an epoch), tiny heads, one local crop."""
    base = dict(ckpt=ckpt, out=str(out), limit_train=32, batch_size=8, proj_hidden=32, proj_dim=16,
                pred_hidden=32, local_crops=1, log_every=1)
    return cpu_settings(refine.Settings, **{**base, **kw})


def losses(out):
    """{step: loss} of OUT/log.jsonl."""
    return {r["step"]: r["loss"] for r in read_log(out)}


def load(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def test_head_placement_by_depth():
    span = lambda a, b: list(range(a, b + 1))  # noqa: E731
    assert recipe.head_blocks("mim-refiner", 1024, 24) == span(17, 24)  # ViT-L/16
    assert recipe.head_blocks("mim-refiner", 1280, 32) == span(21, 32)  # ViT-H/14: 12 heads
    assert recipe.head_blocks("mim-refiner", 2560, 24) == span(17, 24)  # 2B
    assert recipe.head_blocks("mim-refiner", 32, 4) == [3, 4]
    assert recipe.head_blocks("mim-refiner", 192, 12) == span(9, 12)
    assert recipe.head_blocks("mae-ct", 1024, 24) == [24]
    vit = model.ViT(dim=32, depth=4, patch=4, img_size=32)
    cfg = recipe.resolve(refine.Settings(heads="2-3", batch_size=4), vit, 1, 100)
    assert cfg.heads == "2,3"


def test_recipe_by_scale():
    large = SimpleNamespace(dim=1024, depth=24, patch=16, img_size=224, post_norm=False)  # ViT-L/16
    cfg = recipe.resolve(refine.Settings(), large, 8, 1_281_167)
    assert (cfg.batch_size * 8, cfg.epochs, cfg.head_epochs, cfg.temperature) == (1024, 30, 20, 0.2)
    assert (cfg.local_crops, cfg.global_size, cfg.local_size, cfg.queue_size) == (10, 224, 96, 65536)
    assert (cfg.heads, cfg.ema_momentum, cfg.head_warmup_epochs, cfg.warmup_epochs) == (
        ",".join(map(str, range(17, 25))), 0.9999, 4.0, 4.0)
    cfg = recipe.resolve(refine.Settings(method="mae-ct"), large, 8, 1_281_167)
    assert (cfg.views, cfg.local_crops, cfg.freeze_blocks, cfg.heads, cfg.epochs) == ("crop-flip", 0, 12, "24", 20)
    assert (cfg.temperature, cfg.head_temperature) == (0.2, 0.15)
    assert (cfg.head_warmup_epochs, cfg.warmup_epochs) == (0.2 * 20, 0.2 * 20)  # 20% of each phase


def test_recipe_for_other_sizes_scales_with_the_data():
    """Not a paper size: 'small' (ours, CPUs) only for an encoder under 384 wide on under 50k images.

    Else the nearest paper size's recipe with the global batch and the EMA horizon scaled to the data set."""
    vit_s = SimpleNamespace(dim=384, depth=12, patch=16, img_size=224, post_norm=False)  # ViT-S/16
    assert recipe.scale_of(vit_s, 100_000)[0] == "base" and "no paper size" in recipe.scale_of(vit_s, 100_000)[1]
    # 100k images: batch min(1024, 2^floor(log2(100000 // 32))) = 1024; queue whole batches up to half the
    # images, 100000 // 2 // 1024 * 1024 = 48 * 1024 = 49152; EMA m = 1 - 2 / (steps of phase 2), the horizon
    # 1 / (1 - m) half the phase: 100000 // 1024 = 97 steps an epoch, 30 epochs
    cfg = recipe.resolve(refine.Settings(), vit_s, 1, 100_000)
    assert (cfg.batch_size, cfg.head_epochs, cfg.epochs, cfg.queue_size) == (1024, 20, 30, 48 * 1024)
    assert cfg.ema_momentum == pytest.approx(1 - 2 / (30 * (100_000 // 1024))) and cfg.local_crops == 10
    cfg = recipe.resolve(refine.Settings(), vit_s, 1, 10_000)  # fewer images: a smaller batch, a shorter horizon
    # 2^floor(log2(10000 // 32)) = 2^floor(log2(312)) = 256, so at least 32 steps an epoch; 10000 // 256 = 39
    assert cfg.batch_size == 256 and cfg.ema_momentum == pytest.approx(1 - 2 / (30 * (10_000 // 256)))
    tiny = SimpleNamespace(dim=128, depth=6, patch=4, img_size=32, post_norm=False)
    assert recipe.scale_of(tiny, 10_000) == ("small", "ours for CPUs: 128 wide, 6 deep (under 384 wide) on 10000 "
                                                      "images (under 50000)")
    small = recipe.resolve(refine.Settings(), tiny, 1, 10_000)  # the demo's recipe (README deviations table)
    assert small.ema_momentum == 0.95 and (small.layer_decay, small.topk, small.jitter) == (1.0, 5, 2.0)
    assert (small.global_crop_min, small.queue_size, small.lr, small.neighbours) == (0.3, 4096, 4e-3, "refine")
    assert (small.local_crops, small.freeze_blocks, small.epochs) == (0, tiny.depth // 2, 6)
    assert recipe.scale_of(tiny, 1_281_167)[0] == "base"  # a small encoder on much data: not the toy recipe
    large = SimpleNamespace(dim=1024, depth=24, patch=16, img_size=224, post_norm=False)
    assert recipe.resolve(refine.Settings(), large, 8, 1_281_167).ema_momentum == 0.9999  # ImageNet: the paper's


def test_lr_multipliers_and_weight_decay_follow_eq_13():
    for post_norm in (False, True):
        vit = model.ViT(dim=32, depth=4, patch=4, img_size=32, post_norm=post_norm)
        net = refine.Refiner(vit, [3, 4], "cls", proj_hidden=16, proj_dim=8, pred_hidden=16)
        cfg = refine.Settings(layer_decay=0.65)
        name_of = {id(p): n for n, p in net.named_parameters()}
        groups = common.param_groups(net, cfg.weight_decay, cfg.layer_decay, 4, head_weight_decay=cfg.head_weight_decay)
        seen = {name_of[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
        assert len(seen) == sum(len(g["params"]) for g in groups) == len(name_of)
        for name, p in net.named_parameters():
            m = re.match(r"vit\.blocks\.(\d+)\.", name)
            if m:
                want = 0.65 ** (4 + 1 - (int(m.group(1)) + 1))  # block j gets 0.65^(depth+1-j)
            elif name.split(".")[1] in ("patch_embed", "cls_token", "embed_norm"):
                want = 0.65 ** (4 + 1)
            else:
                assert name.startswith(("heads.", "vit.norm.")), name
                want = 1.0
            wd = 0.0 if p.ndim == 1 or "cls_token" in name else 1e-5 if name.startswith("heads.") else 0.05
            assert seen[name] == (pytest.approx(want), wd), name


def test_lr_schedule_warms_up_then_cosine():
    """Eq. (14) with S = 10 steps, S_w = 2, peak 1, floor 0, at known steps.

    (s + 1) / 2 for s < 2, then (1 + cos(pi * (s - 2) / 8)) / 2; the last step, s = 9, is at 7/8 of the cosine."""
    lrs = [common.warmup_cosine(s, 10, 2, 1.0, 0.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # 1/2, 2/2, then cos(0) = 1
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2, abs=1e-3)  # 0.0381


def test_mim_refiner_pairs_every_global_anchor_with_every_other_view(monkeypatch):
    pairs = []
    monkeypatch.setattr(model, "nna_loss", lambda z, nn_z, p, tau, offset: pairs.append((z, p)) or torch.tensor(1.0))
    z, p = [torch.randn(2, 4) for _ in range(2)], [torch.randn(2, 4) for _ in range(5)]
    refine.mim_refiner_loss(z, z, p, 0.2, 0)
    got = sorted((next(i for i in range(2) if a is z[i]), next(v for v in range(5) if b is p[v])) for a, b in pairs)
    assert got == [(i, v) for i in range(2) for v in range(5) if v != i]  # 2 * (1 + 3) terms


def test_official_pairing_has_the_public_codes_22_terms(tiny_ckpt, tmp_path, monkeypatch):
    """--pairing official with 2 global + 10 local views, written out: 22 terms.

    Views 0, 1 global; 2-11 local. Each cross-global pair twice, each global view with its own prediction, and locals
    1-8 (views 2-9); locals 9-10 (views 10, 11) get no term. The loss is the mean of the 22."""
    pairs, value = [], {}
    monkeypatch.setattr(model, "nna_loss", lambda z, nn_z, p, tau, offset: pairs.append((z, p)) or value[len(pairs)])
    z, p = [torch.randn(2, 4) for _ in range(2)], [torch.randn(2, 4) for _ in range(12)]
    value.update({i: torch.tensor(float(i * i)) for i in range(1, 23)})
    loss = refine.mim_refiner_loss(z, z, p, 0.2, 0, "official")
    got = [(next(i for i in range(2) if a is z[i]), next(v for v in range(12) if b is p[v])) for a, b in pairs]
    want = [(0, 1), (1, 0),  # the global loss: each anchor with the other global view
            (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (0, 9),
            (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]
    assert got == want and loss == pytest.approx(sum(i * i for i in range(1, 23)) / 22)
    pairs.clear()
    refine.mim_refiner_loss(z, z, p, 0.2, 0)  # the intended pairing: 2 x 11, every other view once
    assert len(pairs) == 22 and {id(p[10]), id(p[11])} <= {id(b) for _, b in pairs}
    vit = model.ViT(dim=32, depth=4, patch=4, img_size=32)
    with pytest.raises(model.UserError, match="unknown --pairing"):
        recipe.resolve(refine.Settings(pairing="public", batch_size=4), vit, 1, 100)
    used = []  # refine.main hands --pairing to the loss
    monkeypatch.setattr(refine, "mim_refiner_loss", lambda *a: used.append(a[-1]) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        refine.main(settings(tiny_ckpt, tmp_path, pairing="official"))
    assert used == ["official"]


def test_mae_ct_heads_normalise_each_view_alone_mim_refiner_all_views(tiny_ckpt, tmp_path, monkeypatch):
    """MAE-CT's head, and in phase 2 its EMA target projector, run once per view.

    Each BatchNorm sees one view's statistics. MIM-Refiner's heads see all views together. (Two views of different
    statistics, so the joint statistics would give other outputs.)"""
    torch.manual_seed(0)
    vit = model.ViT(dim=32, depth=2, patch=4, img_size=32)
    views = [torch.randn(4, 3, 32, 32), 3 * torch.randn(4, 3, 32, 32) + 1]
    h = torch.cat([vit.final_norm(vit.forward_blocks(v, [2])[0])[:, 0] for v in views])  # (2B, D)
    seen = {}
    zero = torch.tensor(0.0)
    monkeypatch.setattr(refine, "mae_ct_loss", lambda nns, p, *a: seen.update(z=nns, p=p) or zero)
    monkeypatch.setattr(refine, "mim_refiner_loss", lambda z, nns, p, *a, **k: seen.update(z=z, p=p) or zero)
    kw = dict(proj_hidden=16, proj_dim=8, pred_hidden=16)
    for mim in (False, True):
        net = refine.Refiner(vit, [2], "cls", not mim, act="gelu" if mim else "relu", predictor_bn=mim, **kw)
        head = net.heads["2"]
        targets = torch.nn.ModuleDict({"2": copy.deepcopy(head.projector)})
        parts = refine.Parts(net, vit, torch.nn.ModuleDict({"2": model.NNQueue(16, 8)}), targets)
        for phase in refine.PHASES:
            refine.heads_loss(net, parts, views, torch.arange(4), refine.Phase(phase, 0, 1, 0.1, 0, 0.2, 1, False),
                              mim, 0, None, "intended")
            proj = targets["2"] if phase == "refine" and not mim else head.projector
            want_z = torch.cat([proj(x) for x in h.chunk(2)]) if not mim else head(h)[0]
            want_p = torch.cat([head(x)[1] for x in h.chunk(2)]) if not mim else head(h)[1]
            # float32, the encoder's rows computed in a batch of another size: rounding ~1e-7 relative
            torch.testing.assert_close(torch.cat(seen["z"][:2]), want_z.detach(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch.cat(seen["p"]), want_p.detach(), atol=1e-5, rtol=1e-4)
            joint = head(h)[1] if not mim else torch.cat([head(x)[1] for x in h.chunk(2)])
            assert not torch.allclose(torch.cat(seen["p"]), joint, atol=1e-3)  # 100 x the tolerance above
    built = []  # refine.main builds MAE-CT's Refiner per view, MIM-Refiner's not
    monkeypatch.setattr(refine.Refiner, "forward", lambda self, v: built.append(self.per_view) or 1 / 0)
    for method in ("mae-ct", "mim-refiner"):
        with pytest.raises(ZeroDivisionError):
            refine.main(settings(tiny_ckpt, tmp_path / method, method=method, views="crop-flip", local_crops=0))
    assert built == [True, False]


def test_mae_ct_phases_freezing_and_resume(tiny_ckpt, tmp_path):
    original = torch.load(tiny_ckpt, weights_only=True)["model"]
    kw = dict(method="mae-ct", views="crop-flip", head_epochs=1, epochs=1, head_lr=0.05, lr=0.05, save_every=100)
    a, b = tmp_path / "a", tmp_path / "b"
    refine.main(settings(tiny_ckpt, a, max_steps=4, **kw))  # the whole head warm-up (32 images / batch 8 = 4 steps)
    ck = load(a)
    for key in ("encoder", "ema"):  # the encoder is frozen while the heads warm up
        assert all(torch.equal(v, original[k]) for k, v in ck[key].items())
    assert ck["step"] == 4 and ck["phase"] == "heads"
    refine.main(settings(tiny_ckpt, a, max_steps=6, **kw))  # stops inside an epoch
    refine.main(settings(tiny_ckpt, a, max_steps=8, **kw))  # resumes inside it
    refine.main(settings(tiny_ckpt, b, max_steps=8, workers=2, **kw))  # uninterrupted, 2 persistent workers
    ca, cb = load(a), load(b)
    assert ca["step"] == cb["step"] == 8 and losses(a) == losses(b)
    assert "4.predictor.4.weight" not in ca["heads"] and "4.0.weight" in ca["targets"]  # no final BN; EMA projector
    for key in ("encoder", "ema", "heads", "queues", "targets"):
        assert all(torch.equal(v, cb[key][k]) for k, v in ca[key].items()), key
    for s, t in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"])
    enc = ca["encoder"]  # MAE-CT: lower half, patch embedding and CLS never change
    for k, v in enc.items():
        frozen = k.startswith(("blocks.0.", "blocks.1.", "patch_embed.", "cls_token", "pos_embed"))
        assert torch.equal(v, original[k]) == frozen, k
    # the exported EMA encoder loads strictly into timm's VisionTransformer with the same features
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file
    ours = model.load_encoder(str(a / "last.pt"))  # picks the EMA weights
    x = torch.randn(2, 3, 32, 32)
    for sd in (torch.load(a / "encoder.pth", weights_only=True), load_file(a / "encoder.safetensors")):
        ref = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=1, num_classes=0, global_pool="token")
        ref.load_state_dict(sd, strict=True)  # encoder.safetensors: the same keys, strictly
        with torch.no_grad():
            torch.testing.assert_close(ref.eval().forward_features(x), ours.eval()(x), atol=1e-5, rtol=1e-5)
    assert model.load_encoder(str(a / "encoder.safetensors")).arch() == ours.arch()
    assert not torch.equal(ours.blocks[3].mlp.fc1.weight, original["blocks.3.mlp.fc1.weight"])


def test_mae_ct_target_projector_is_copied_when_phase_2_starts(tiny_ckpt, tmp_path):
    """MAE-CT's EMA target projector is not tracked during the warm-up.

    When the encoder starts to train it becomes an exact copy of the projector, so after the first step of phase 2 it
    is m * P + (1 - m) * P' (P, P' the projector before and after that step). Resumed there, as here."""
    kw = dict(method="mae-ct", views="crop-flip", head_epochs=1, epochs=1, head_lr=0.05, lr=0.05,
              target_momentum=0.9)
    refine.main(settings(tiny_ckpt, tmp_path, max_steps=4, **kw))  # the warm-up: 4 steps
    before = load(tmp_path)["heads"]
    refine.main(settings(tiny_ckpt, tmp_path, max_steps=5, **kw))  # the first step of phase 2
    after = load(tmp_path)
    for name, t in after["targets"].items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            p0, p1 = before["4.projector." + name[2:]], after["heads"]["4.projector." + name[2:]]
            assert not torch.equal(p0, p1), name
            # m * P + (1 - m) * P' = P.lerp(P', 1 - m) with m = 0.9; float32 rounding of the saved weights only
            torch.testing.assert_close(t, p0.lerp(p1, 0.1), atol=1e-6, rtol=1e-5, msg=name)


def test_two_processes_equal_one(tiny_ckpt, tmp_path):
    """Same global batch of 8: 2 x 4 under torchrun (gloo) vs 1 x 8, across both phases.

    With top-1 neighbours (the pick is then deterministic)."""
    kw = dict(head_epochs=1, epochs=1, max_steps=6, topk=1, head_warmup_epochs=0, warmup_epochs=0,
              head_lr=0.05, lr=0.05)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "refine.py",
           f"--ckpt={tiny_ckpt}", f"--out={tmp_path / 'two'}", "--limit-train=32", "--batch-size=4",
           "--proj-hidden=32", "--proj-dim=16", "--pred-hidden=32", "--local-crops=1", "--log-every=1",
           "--device=cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    refine.main(settings(tiny_ckpt, tmp_path / "one", **kw))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert list(two) == list(range(1, 7))
    # rel 1e-3: from the second step on, Adam amplifies float noise (below); measured up to 1.4e-4
    assert [two[s] for s in two] == pytest.approx([one[s] for s in two], rel=1e-3)
    c2, c1 = load(tmp_path / "two"), load(tmp_path / "one")
    # Adam turns directions whose gradient is zero up to float noise (key biases, a weight in front of
    # a BatchNorm) into +-lr steps, so after a few steps the runs agree to ~1e-3, not to float
    # precision (after one step the gradients agree to 1e-6). Adam's first moments are running means
    # of the gradients: a missing average over ranks or an unsynchronised rank would differ by O(1).
    m2, m1 = (torch.cat([s["exp_avg"].flatten() for s in c["optimizer"]["state"].values()]) for c in (c2, c1))
    assert (m2 - m1).norm() < 1e-2 * m1.norm()
    w0 = torch.load(tiny_ckpt, weights_only=True)["model"]
    for k, v in c1["encoder"].items():
        if v.ndim >= 2 and k != "pos_embed":
            assert (c2["encoder"][k] - v).norm() <= 0.1 * (v - w0[k]).norm(), k  # frozen: both unchanged
    for k, v in c1["heads"].items():
        if v.ndim >= 2:
            assert (c2["heads"][k] - v).norm() < 1e-2 * v.norm(), k  # measured up to 1.2e-3
    for q in ("3", "4"):  # the same entries, enqueued in another order within each step
        i2, i1 = c2["queues"][q + ".idx"].argsort(), c1["queues"][q + ".idx"].argsort()
        assert torch.equal(c2["queues"][q + ".idx"][i2], c1["queues"][q + ".idx"][i1])
        # unit vectors projected by heads that agree to ~1e-3 (measured above): 1e-2 per coordinate
        torch.testing.assert_close(c2["queues"][q + ".z"][i2], c1["queues"][q + ".z"][i1], atol=1e-2, rtol=0)


def test_loss_falls_on_jittered_digits(tiny_ckpt, tmp_path):
    cfg = settings(tiny_ckpt, tmp_path, limit_train=256, batch_size=32, head_epochs=1, epochs=3,
                   local_crops=0, head_lr=0.01, lr=0.01)
    res = refine.main(cfg)
    curve = list(losses(tmp_path).values())
    assert res["step"] == len(curve) == 256 // 32 * (1 + 3)  # steps an epoch x (head_epochs + epochs)
    # the mean of the last 4 steps against the first 4: measured 7.99 -> 7.50, a drop of 0.49; 0.1 leaves room
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.1, curve


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    calls, real = [], model.nna_loss

    def flaky(*args):
        calls.append(1)
        out = real(*args)
        return out * float("nan") if len(calls) > 2 * 2 * 4 else out  # 2 heads x 4 pairs per step

    monkeypatch.setattr(model, "nna_loss", flaky)
    with pytest.raises(model.UserError, match="not finite at step 3"):
        refine.main(settings(tiny_ckpt, tmp_path, head_epochs=0, epochs=1, save_every=1))
    assert load(tmp_path)["step"] == 2


def test_user_errors(tiny_ckpt, tmp_path):
    with pytest.raises(model.UserError, match="larger than the data set"):
        refine.main(settings(tiny_ckpt, tmp_path, batch_size=64))
    with pytest.raises(model.UserError, match="two views"):
        refine.main(settings(tiny_ckpt, tmp_path, method="mae-ct", views="multicrop"))
    with pytest.raises(model.UserError, match="unknown --method"):
        refine.main(settings(tiny_ckpt, tmp_path, method="simclr"))
    with pytest.raises(model.UserError, match="does not exist"):
        refine.main(settings(str(tmp_path / "missing.pth"), tmp_path))
    refine.main(settings(tiny_ckpt, tmp_path, head_epochs=0, epochs=1, max_steps=1))
    with pytest.raises(model.UserError, match="other settings"):
        refine.main(settings(tiny_ckpt, tmp_path, head_epochs=0, epochs=1, max_steps=2, temperature=0.5))


def test_limit_train_spreads_over_every_class(tmp_path):
    """An ImageFolder is sorted by class: --limit-train takes evenly spaced images, not the first N."""
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=(4, 1), size=8)
    part = refine.train_set(refine.Settings(data=str(tmp_path), limit_train=3))
    assert list(part.indices) == [0, 4, 8] and [part.dataset.targets[i] for i in part.indices] == [0, 1, 2]
    assert len(refine.train_set(refine.Settings(data=str(tmp_path), limit_train=50))) == 12


def test_compile_path_runs_on_cpu_and_matches_eager(tiny_ckpt, tmp_path):
    """--compile (each encoder block through torch.compile / inductor, in place) changes nothing but the speed.

    A compiled block's outputs and gradients equal the eager block's, and refine.py trains with the same losses and
    writes a checkpoint with the same keys."""
    torch.manual_seed(0)
    blk = model.Block(32, 2)
    twin = copy.deepcopy(blk)
    twin.compile()
    x = torch.randn(3, 5, 32, requires_grad=True)
    outs = [(b(x) * torch.arange(32.0)).sum() for b in (blk, twin)]
    grads = [torch.autograd.grad(o, [x, *b.parameters()]) for o, b in zip(outs, (blk, twin))]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    kw = dict(head_epochs=0, epochs=1, max_steps=2)
    refine.main(settings(tiny_ckpt, tmp_path / "eager", **kw))
    refine.main(settings(tiny_ckpt, tmp_path / "compiled", compile=True, **kw))
    # inductor fuses and reorders float32 ops: equal up to rounding (the block: 1e-5, above), not bit for bit
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "compiled"), rel=1e-4)
    assert load(tmp_path / "compiled")["encoder"].keys() == load(tmp_path / "eager")["encoder"].keys()


def test_bf16_precision_autocasts_on_the_cpu(tiny_ckpt, tmp_path, monkeypatch):
    """--precision bf16 runs the heads' forward under CPU autocast (auto and fp32 do not); the losses stay close."""
    seen = []
    real = refine.heads_loss
    monkeypatch.setattr(refine, "heads_loss", lambda *a, **k: (seen.append(torch.is_autocast_enabled("cpu")),
                                                               real(*a, **k))[1])
    kw = dict(head_epochs=0, epochs=1, max_steps=2)
    for p in ("auto", "fp32", "bf16"):
        refine.main(settings(tiny_ckpt, tmp_path / p, precision=p, **kw))
    assert seen == [False] * 4 + [True] * 2
    assert losses(tmp_path / "auto") == losses(tmp_path / "fp32")
    b1, f1 = losses(tmp_path / "bf16")[1], losses(tmp_path / "fp32")[1]
    assert b1 != f1 and b1 == pytest.approx(f1, rel=3e-2)  # step 1: the same weights, bf16 rounding alone (1.1%)


@pytest.mark.parametrize("neighbours", ["all", "refine", "none"])
def test_neighbours_by_phase(tiny_ckpt, tmp_path, monkeypatch, neighbours):
    """--neighbours: where the positive is a queue neighbour; elsewhere each anchor is its own positive.

    So NNA gets nn_z = z (InfoNCE). 'refine': the heads' warm-up (4 steps) without, the refinement with."""
    seen, real_nna = [], model.nna_loss
    monkeypatch.setattr(model, "nna_loss",
                        lambda z, nn_z, *a: seen.append(torch.equal(z, nn_z)) or real_nna(z, nn_z, *a))
    refine.main(settings(tiny_ckpt, tmp_path, head_epochs=1, epochs=1, neighbours=neighbours))
    assert len(seen) == 8 * 2 * 4  # 8 steps x 2 heads x 4 pairs
    warm = 4 * 2 * 4  # the warm-up's calls: 4 steps x 2 heads x 4 pairs
    own = {"all": [False] * 64, "refine": [True] * warm + [False] * warm, "none": [True] * 64}[neighbours]
    assert seen == own


def test_truncated_last_pt_is_survived_with_an_identical_result(tiny_ckpt, tmp_path, capsys):
    kw = dict(head_epochs=1, epochs=1, save_every=2, head_lr=0.05, lr=0.05)
    refine.main(settings(tiny_ckpt, tmp_path / "a", max_steps=8, **kw))
    refine.main(settings(tiny_ckpt, tmp_path / "b", max_steps=6, **kw))  # last.pt at 6 (phase 2), prev at 4
    (tmp_path / "b" / "last.pt").write_bytes(b"")  # a file system that lost the data of a renamed file
    capsys.readouterr()
    refine.main(settings(tiny_ckpt, tmp_path / "b", max_steps=8, **kw))
    assert "resuming from" in capsys.readouterr().err and (tmp_path / "b" / "last.bad.pt").exists()
    ca, cb = load(tmp_path / "a"), load(tmp_path / "b")
    assert ca["step"] == cb["step"] == 8 and losses(tmp_path / "a") == losses(tmp_path / "b")
    for key in ("encoder", "ema", "heads", "queues"):
        assert all(torch.equal(v, cb[key][k]) for k, v in ca[key].items()), key


def test_resume_compares_data_paths_allows_a_moved_folder_and_reports_the_loss(tiny_ckpt, tmp_path, monkeypatch,
                                                                               capsys):
    """--data ./x/ then x: the same folder; x moved to y: a warning; other data: refused.

    A folder of images without classes is data enough. Rerunning a finished run reports its loss, not nan."""
    make_images(tmp_path / "x", 40)
    make_images(tmp_path / "z", 20)
    monkeypatch.chdir(tmp_path)
    kw = dict(head_epochs=1, epochs=0, limit_train=32)
    refine.main(settings(tiny_ckpt, "run", data="./x/", max_steps=1, **kw))
    assert "recipe: small (ours for CPUs" in capsys.readouterr().out
    refine.main(settings(tiny_ckpt, "run", data="x", max_steps=2, **kw))
    os.rename("x", "y")
    res = refine.main(settings(tiny_ckpt, "run", data="y", max_steps=2, **kw))
    assert "taken as the same folder, moved" in capsys.readouterr().err and res["loss"] == losses("run")[2]
    with pytest.raises(model.UserError, match="other settings.*data"):
        refine.main(settings(tiny_ckpt, "run", data="z", max_steps=2, topk=4, queue_size=8, **kw))


def test_multicrop_resume_and_loader_workers_change_nothing(tiny_ckpt, tmp_path):
    """MIM-Refiner's multi-crop views, stopped inside an epoch and resumed, equal an uninterrupted run, bit for bit.

    The views are coloured on the device from parameters drawn in the loader; two persistent loader workers; equal are
    the weights, EMA, queues and losses."""
    kw = dict(head_epochs=1, epochs=1, save_every=100, jitter=1.0)  # 2 global + 1 local view, colour on
    a, b = tmp_path / "a", tmp_path / "b"
    refine.main(settings(tiny_ckpt, a, max_steps=6, **kw))  # stops inside the second epoch
    refine.main(settings(tiny_ckpt, a, max_steps=8, **kw))
    refine.main(settings(tiny_ckpt, b, max_steps=8, workers=2, **kw))
    ca, cb = load(a), load(b)
    assert ca["settings"]["views"] == "multicrop" and losses(a) == losses(b)
    for key in ("encoder", "ema", "heads", "queues"):
        assert all(torch.equal(v, cb[key][k]) for k, v in ca[key].items()), key


@pytest.mark.parametrize("bad, message", [(dict(warmup_epochs=-1.0), "--warmup-epochs -1.0 is negative"),
                                          (dict(head_epochs=-2), "--head-epochs -2 is negative"),
                                          (dict(views="mixed"), "unknown --views 'mixed'"),
                                          (dict(neighbours="some"), "unknown --neighbours 'some'"),
                                          (dict(precision="fp16"), "unknown --precision 'fp16'")])
def test_bad_recipe_settings_are_one_line_errors(bad, message):
    vit = model.ViT(dim=32, depth=4, patch=4, img_size=32)
    with pytest.raises(model.UserError, match=re.escape(message)):
        recipe.resolve(refine.Settings(batch_size=4, **bad), vit, 1, 100)
