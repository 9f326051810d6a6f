"""pretrain.py: the MAE objective pinned by hand, training, resume, checkpoint formats, DDP."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import cpu_settings, make_image_folder, make_images, read_log

import model
import pretrain
from model import UserError, load_encoder
from pretrain import MAE, patchify, random_masking
from util import common
from util.data import JitteredDigits

TINY = dict(dim=32, depth=2, heads=2, dec_dim=32, dec_depth=1, dec_heads=2, img_size=16, patch=4)


_DIGITS = {}


@pytest.fixture
def small_digits(monkeypatch):
    """64 jittered digits instead of 10000 (built once per session), so a run takes a second."""
    def build(data, split, transform=None, labels=True):
        if split not in _DIGITS:
            _DIGITS[split] = JitteredDigits(split, n=64)
        return _DIGITS[split]
    monkeypatch.setattr(pretrain, "build_dataset", build)  # the name pretrain.py calls


def settings(out, **kw):
    base = dict(out=str(out), batch_size=16, epochs=3, warmup_epochs=1, base_lr=0.01,
                log_every=1, save_every=100, num_heads=TINY["heads"],
                **{k: v for k, v in TINY.items() if k != "heads"})
    return cpu_settings(pretrain.Settings, **{**base, **kw})


def tiny_mae(seed=0):
    torch.manual_seed(seed)
    return MAE(TINY["dec_dim"], TINY["dec_depth"], TINY["dec_heads"],
               **{k: TINY[k] for k in ("dim", "depth", "heads", "img_size", "patch")})


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (64, 0.75), (16, 0.5)])
def test_masking_keeps_fraction_and_restores(n, ratio):
    torch.manual_seed(1)
    x = torch.randn(3, n, 5)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(n * (1 - ratio))
    assert kept.shape == (3, keep, 5)
    assert (mask.sum(1) == n - keep).all() and set(mask.unique().tolist()) <= {0.0, 1.0}
    ids_shuffle = ids_restore.argsort(1)  # inverse permutation: the first `keep` are visible
    for b in range(3):
        visible = sorted(ids_shuffle[b, :keep].tolist())
        assert visible == [i for i in range(n) if mask[b, i] == 0]
        for j, i in enumerate(ids_shuffle[b, :keep].tolist()):
            assert torch.equal(kept[b, j], x[b, i])
    # un-shuffling [kept, zeros] with ids_restore puts every kept token back in its place
    full = torch.cat([kept, torch.zeros(3, n - keep, 5)], 1).gather(1, ids_restore[..., None].expand(-1, -1, 5))
    assert torch.equal(full, x * (1 - mask)[..., None])


def test_normalised_pixel_loss_by_hand():
    """The MAE loss == MSE to per-patch normalised pixels over the hidden patches, recomputed with loops.

    From the decoder's prediction (captured by a hook) and the mask drawn from the same noise."""
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    pred = {}
    mae.decoder_pred.register_forward_hook(lambda m, i, o: pred.update(p=o[:, 1:]))
    torch.manual_seed(7)
    loss = mae(imgs, 0.75)  # forward_encoder, forward_decoder, forward_loss
    torch.manual_seed(7)
    noise = torch.rand(2, 16)  # what random_masking drew
    p, n_keep, total, count = 4, int(16 * (1 - 0.75)), 0.0, 0  # 16 patches (16 px, patch 4), a quarter visible
    for b in range(2):
        visible = set(noise[b].argsort()[:n_keep].tolist())
        for n in range(16):
            if n in visible:
                continue
            r, c = divmod(n, 4)  # row-major patches; pixels ordered (row, col, channel)
            t = torch.tensor([imgs[b, ch, r * p + i, c * p + j].item()
                              for i in range(p) for j in range(p) for ch in range(3)], dtype=torch.float64)
            t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
            total += ((pred["p"][b, n].double() - t) ** 2).mean().item()
            count += 1
    assert count == 2 * (16 - n_keep)  # 2 images x 12 hidden patches
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert patchify(imgs, 4)[0, 5, :3].tolist() == imgs[0, :, 4, 4].tolist()  # patch (1,1) pixel (0,0)


def test_param_groups_and_schedule():
    mae = tiny_mae()
    groups = common.param_groups(mae, 0.05, prefix="")
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]  # no layer decay in MAE
    no_decay, decay = sorted(groups, key=lambda g: g["weight_decay"])
    names = {id(p): n for n, p in mae.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(mae.parameters()))
    lr = [common.warmup_cosine(s, 20, 4, 1.0, 0.1) for s in range(21)]
    # Eq. (14), 20 steps, 4 of warm-up, peak 1, floor 0.1: (s + 1) / 4, then 0.1 + 0.9 * (1 + cos(pi * t)) / 2
    # with t = (s - 4) / 16; s = 12 is half way (t = 1/2): 0.1 + 0.9 / 2 = 0.55; s = 20 the floor
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0] and lr[4] == 1.0
    assert lr[20] == pytest.approx(0.1) and lr[12] == pytest.approx(0.1 + 0.9 / 2)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))


def test_loss_falls(tmp_path, small_digits):
    res = pretrain.main(settings(tmp_path, epochs=6))
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == res["step"] == 64 // 16 * 6  # steps an epoch x epochs
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])  # measured 0.58 x: 0.8 leaves room


def state(path):
    ck = torch.load(path, weights_only=True)
    return ck["model"], ck["optimizer"]["state"], ck["rng"], ck["step"]


def test_resume_is_bit_identical(tmp_path, small_digits):
    """Stopped at step 3 (inside epoch 0) and resumed to 6 (inside epoch 1) == 6 steps at once."""
    pretrain.main(settings(tmp_path / "a", max_steps=6))
    pretrain.main(settings(tmp_path / "b", max_steps=3))
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a killed run logged past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n{torn")
    pretrain.main(settings(tmp_path / "b", max_steps=6))
    (ma, oa, ra, sa), (mb, ob, rb, sb) = state(tmp_path / "a" / "last.pt"), state(tmp_path / "b" / "last.pt")
    assert sa == sb == 6
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert torch.equal(ra[0]["torch"], rb[0]["torch"])
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in log_b] == list(range(1, 7))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_checkpoints_load_as_encoder_and_in_timm(tmp_path, small_digits):
    timm = pytest.importorskip("timm")
    export = tmp_path / "slim.pth"
    pretrain.main(settings(tmp_path, max_steps=2, export=str(export)))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "arch", "decoder", "optimizer", "step", "settings", "rng"} <= set(ck)
    assert any(k.startswith("decoder_") for k in ck["model"]) and "blocks.1.mlp.fc2.weight" in ck["model"]
    slim = torch.load(export, weights_only=True)
    assert "optimizer" not in slim and "rng" not in slim and slim["arch"] == ck["arch"]
    mae = MAE(**ck["decoder"], **ck["arch"])
    mae.load_state_dict(slim["model"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = mae(x)  # the encoder's final-normed tokens
        for path in (tmp_path / "last.pt", export, tmp_path / "encoder.pth", tmp_path / "encoder.safetensors"):
            vit = load_encoder(str(path))  # --num-heads 2, not the width's 1: every file stores it
            assert type(vit) is model.ViT and vit.arch() == ck["arch"] and vit.heads == 2
            assert torch.equal(vit(x), want)
            assert torch.equal(vit.forward_blocks(x, [1])[0], mae.forward_blocks(x, [1])[0])
        from safetensors.torch import load_file
        pth = torch.load(tmp_path / "encoder.pth", weights_only=True)
        for sd in (pth, load_file(tmp_path / "encoder.safetensors")):  # the same keys, strictly
            net = timm.models.vision_transformer.VisionTransformer(
                img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="token")
            net.load_state_dict(sd, strict=True)
            torch.testing.assert_close(net.eval().forward_features(x), want, atol=1e-5, rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, small_digits, monkeypatch):
    calls, real = [], MAE.forward_loss

    def poisoned(self, *args):
        calls.append(1)
        loss = real(self, *args)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(MAE, "forward_loss", poisoned)
    with pytest.raises(UserError, match="not finite at step 3"):
        pretrain.main(settings(tmp_path, save_every=1))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_user_errors(tmp_path, small_digits):
    with pytest.raises(UserError, match="batch-size"):
        pretrain.main(settings(tmp_path, batch_size=128))
    pretrain.main(settings(tmp_path, max_steps=1))
    with pytest.raises(UserError, match="another model"):
        pretrain.main(settings(tmp_path, max_steps=2, dim=64))
    with pytest.raises(UserError, match="mask-ratio"):
        pretrain.main(settings(tmp_path, mask_ratio=1.0))


def test_two_process_gloo_run(tmp_path, two_ranks):
    """2 gloo processes on an ImageFolder: trains, keeps one RNG state per rank, writes an encoder that loads.

    Each rank masks its own way; and a resume refuses another world size."""
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=(8, 8), size=20)
    cfg = settings(tmp_path / "run", data=str(tmp_path / "data"), batch_size=4, epochs=2, max_steps=3)
    two_ranks(pretrain.main, cfg)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 3 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    assert np.isfinite(ck["loss"])
    assert load_encoder(str(tmp_path / "run" / "encoder.pth"), heads=2).arch() == ck["arch"]
    with pytest.raises(UserError, match="2 process"):
        pretrain.main(settings(tmp_path / "run", data=str(tmp_path / "data"), batch_size=4, epochs=2))


def test_truncated_last_pt_is_survived_with_an_identical_result(tmp_path, small_digits, capsys):
    """last.pt cut short (a full disk, a crash of the file system): the run resumes from last.prev.pt.

    With a one-line warning, and ends equal to an uninterrupted run; the bad file is kept as last.bad.pt."""
    pretrain.main(settings(tmp_path / "a", max_steps=10))
    pretrain.main(settings(tmp_path / "b", max_steps=6, save_every=2))  # last.pt at 6, last.prev.pt at 4
    last = tmp_path / "b" / "last.pt"
    cut = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(cut)
    capsys.readouterr()
    pretrain.main(settings(tmp_path / "b", max_steps=10, save_every=2))
    err = capsys.readouterr().err
    assert "warning:" in err and "resuming from" in err and "last.prev.pt (step 4)" in err
    (ma, oa, _, sa), (mb, ob, _, sb) = state(tmp_path / "a" / "last.pt"), state(last)
    assert sa == sb == 10 and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and [r["step"] for r in log_b] == list(range(1, 11))
    assert (tmp_path / "b" / "last.bad.pt").read_bytes() == cut  # kept, not deleted


def test_ctrl_c_checkpoints_after_the_step_and_the_rerun_resumes(tmp_path, small_digits, monkeypatch, capsys):
    """SIGINT (Ctrl-C) as SIGTERM: the step finishes, last.pt is written, exit code 3.

    Rerunning equals an uninterrupted run, the mean loss of a log line spanning the stop included."""
    pretrain.main(settings(tmp_path / "a", max_steps=6, log_every=4))
    calls, real = [], MAE.forward_loss

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)
    monkeypatch.setattr(MAE, "forward_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        pretrain.main(settings(tmp_path / "b", max_steps=6, log_every=4))
    assert e.value.code == 3 and "stopped after step 3 by SIGINT" in capsys.readouterr().err
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(MAE, "forward_loss", real)
    again = pretrain.main(settings(tmp_path / "b", max_steps=6, log_every=4))
    assert again["step"] == 6 and np.isfinite(again["loss"])
    (ma, oa, ra, _), (mb, ob, rb, _) = state(tmp_path / "a" / "last.pt"), state(tmp_path / "b" / "last.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma) and torch.equal(ra[0]["torch"], rb[0]["torch"])
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [(r["step"], r["loss"]) for r in log_a] == [(r["step"], r["loss"]) for r in log_b]
    finished = pretrain.main(settings(tmp_path / "b", max_steps=6, log_every=4))  # nothing left to do
    assert finished["step"] == 6 and finished["loss"] == again["loss"]


def _signalled(cfg):
    """pretrain.main, but rank 1 (of conftest's two_ranks) gets SIGUSR1 while it computes its third step's loss."""
    rank, calls, real = int(os.environ["RANK"]), [], MAE.forward_loss

    def forward_loss(self, *args):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *args)
    MAE.forward_loss = forward_loss  # in this forked process only
    pretrain.main(cfg)


def test_two_ranks_stop_after_the_same_step(tmp_path, small_digits, two_ranks):
    """A signal to one rank stops every rank after the same step, with its checkpoint, exit code 3."""
    cfg = settings(tmp_path / "run", batch_size=4, epochs=2)
    with pytest.raises(torch.multiprocessing.ProcessExitedException) as e:
        two_ranks(_signalled, cfg)
    assert e.value.exit_code == 3
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and not (tmp_path / "run" / "run.lock").exists()


def test_folder_of_unlabelled_images_and_num_heads(tmp_path):
    """--data: a folder of images, no train/ and no classes; --num-heads (not --heads: refine.py's blocks)."""
    make_images(tmp_path / "photos", 16, size=20, ext="jpg")
    res = pretrain.main(settings(tmp_path / "run", data=str(tmp_path / "photos"), max_steps=2, num_heads=4))
    assert res["step"] == 2 and load_encoder(str(tmp_path / "run" / "encoder.safetensors")).heads == 4
    assert common.parse_settings(pretrain.Settings, ["--num-heads", "4"]).num_heads == 4
    with pytest.raises(SystemExit):
        common.parse_settings(pretrain.Settings, ["--heads", "4"])
    assert "--export checkpoints/" not in pretrain.__doc__  # its commands never overwrite the committed file
