"""tools/pilot_mim.py: the data2vec 2.0-style targets and loss by hand, SimMIM's input masking, the EMA, resume."""
import json

import pytest
import torch
from conftest import read_log

from model import UserError, load_encoder
from tools import pilot_mim
from util.data import JitteredDigits

_DIGITS = {}


@pytest.fixture
def small_digits(monkeypatch):
    """64 jittered digits instead of 10000, so that a run takes a second."""
    def build(data, split, transform=None, labels=True):
        return _DIGITS.setdefault(split, JitteredDigits(split, n=64))
    monkeypatch.setattr(pilot_mim, "build_dataset", build)


def settings(out, **kw):
    return pilot_mim.Settings(**{**dict(out=str(out), dim=32, depth=3, num_heads=2, dec_dim=16, top_k=2, clones=2,
                                         batch_size=8, steps=6, warmup_steps=2, save_every=100, log_every=1,
                                         precision="fp32"), **kw})


def test_targets_by_hand():
    """Per block: each channel standardised over the patches (not the CLS token); averaged; each token standardised."""
    torch.manual_seed(0)
    blocks = [torch.randn(2, 5, 3) * 4 + 1, torch.randn(2, 5, 3) - 2]  # (B, 1+N, D), N = 4
    want = 0
    for t in blocks:
        x = t[:, 1:]
        mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        want = want + (x - mean) / (var + 1e-5).sqrt() / 2
    mean, var = want.mean(2, keepdim=True), want.var(2, unbiased=False, keepdim=True)
    want = (want - mean) / (var + 1e-5).sqrt()
    got = pilot_mim.d2v2_targets(blocks)
    assert got.shape == (2, 4, 3) and torch.allclose(got, want, atol=1e-5)
    blocks[0][:, 0] += 100  # the CLS token is no target
    assert torch.allclose(pilot_mim.d2v2_targets(blocks), want, atol=1e-5)


def test_loss_is_the_mean_squared_error_over_hidden_patches():
    pred = torch.tensor([[[1.0, 1.0], [5.0, 5.0]], [[0.0, 2.0], [9.0, 9.0]]])  # (B=2, N=2, D=2)
    target = torch.zeros(2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the second patch of each image is visible
    # hidden: image 0 patch 0 -> (1 + 1) / 2 = 1; image 1 patch 0 -> (0 + 4) / 2 = 2; mean 1.5
    assert pilot_mim.d2v2_loss(pred, target, mask).item() == pytest.approx(1.5)


def test_ema_moves_the_teacher_towards_the_encoder_only():
    student = pilot_mim.pretrain.MAE(16, 1, 1, dim=16, depth=2, heads=2, patch=4, img_size=16)
    teacher = pilot_mim.ViT(**student.arch())
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    pilot_mim.refine.ema_update(teacher, student, 0.75)  # what the pilot calls
    s = student.state_dict()
    for name, _ in teacher.named_parameters():
        assert torch.allclose(teacher.state_dict()[name], 0.75 * t0[name] + 0.25 * s[name])


def test_simmim_hides_exactly_the_masked_patches_from_the_encoder(monkeypatch):
    """SimMIM hides N - floor(N (1 - r)) patches per image: a hidden patch's pixels change no prediction.

    A visible patch's pixels do; the loss is pretrain.py's normalised-pixel MSE over the hidden patches."""
    torch.manual_seed(0)
    net = pilot_mim.SimMIM(dim=16, depth=2, heads=2, patch=4, img_size=16)
    imgs = torch.randn(3, 3, 16, 16)
    seen = []
    real = pilot_mim.pretrain.MAE.forward_loss
    monkeypatch.setattr(pilot_mim.pretrain.MAE, "forward_loss",
                        lambda self, i, pred, mask: (seen.append((pred, mask)), real(self, i, pred, mask))[1])
    torch.manual_seed(1)
    loss = net.forward_loss(imgs, 0.6)
    pred, mask = seen[-1]
    assert mask.shape == (3, 16) and (mask.sum(1) == 16 - int(16 * 0.4)).all()
    hidden, visible = mask[0].nonzero()[0].item(), (1 - mask[0]).nonzero()[0].item()
    for patch, changes in ((hidden, False), (visible, True)):
        other = imgs.clone()
        r, c = divmod(patch, 4)
        other[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
        torch.manual_seed(1)  # the same masks
        net.forward_loss(other, 0.6)
        assert torch.equal(seen[-1][1], mask) and torch.equal(seen[-1][0], pred) != changes
    target = pilot_mim.pretrain.patchify(imgs, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert loss.item() == pytest.approx((((pred - target) ** 2).mean(-1) * mask).sum().item() / mask.sum().item(),
                                        rel=1e-5)


def test_resume_is_bit_identical_and_the_encoder_loads(tmp_path, small_digits):
    """Stopped at step 3 and resumed to 6 == 6 steps at once; other settings are refused."""
    pilot_mim.main(settings(tmp_path / "a"))
    pilot_mim.main(settings(tmp_path / "b", max_steps=3))
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a killed run logged past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    with pytest.raises(UserError, match="other settings"):
        pilot_mim.main(settings(tmp_path / "b", top_k=3))
    pilot_mim.main(settings(tmp_path / "b"))
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in "ab")
    assert a["step"] == b["step"] == 6
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    vit = load_encoder(str(tmp_path / "a" / "encoder.pth"))
    assert vit.depth == 3 and torch.equal(vit.blocks[0].attn.qkv.weight, a["student"]["blocks.0.attn.qkv.weight"])


def test_simmim_run_trains_and_exports_the_bare_encoder(tmp_path, small_digits):
    pilot_mim.main(settings(tmp_path, objective="simmim", clones=1, mask_ratio=0.6, steps=12, warmup_steps=1))
    log = [r["loss"] for r in read_log(tmp_path)]
    assert len(log) == 12 and sum(log[-3:]) < sum(log[:3])
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "mask_token" in ck["student"] and "decoder_pred.weight" in ck["student"]
    vit = load_encoder(str(tmp_path / "encoder.pth"))  # strict: neither key is in the file
    assert torch.equal(vit.norm.weight, ck["student"]["norm.weight"])
    with pytest.raises(UserError, match="unknown --objective"):
        pilot_mim.main(settings(tmp_path / "x", objective="beit"))
