"""tools/pilot_d2v2.py: the data2vec 2.0-style targets and loss by hand, the teacher's EMA, resume."""
import json

import pytest
import torch
from conftest import read_log

from model import UserError, load_encoder
from tools import pilot_d2v2
from util.data import JitteredDigits

_DIGITS = {}


@pytest.fixture
def small_digits(monkeypatch):
    """64 jittered digits instead of 10000, so that a run takes a second."""
    def build(data, split, transform=None, labels=True):
        return _DIGITS.setdefault(split, JitteredDigits(split, n=64))
    monkeypatch.setattr(pilot_d2v2, "build_dataset", build)


def settings(out, **kw):
    return pilot_d2v2.Settings(**{**dict(out=str(out), dim=32, depth=3, num_heads=2, dec_dim=16, top_k=2, clones=2,
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
    got = pilot_d2v2.d2v2_targets(blocks)
    assert got.shape == (2, 4, 3) and torch.allclose(got, want, atol=1e-5)
    blocks[0][:, 0] += 100  # the CLS token is no target
    assert torch.allclose(pilot_d2v2.d2v2_targets(blocks), want, atol=1e-5)


def test_loss_is_the_mean_squared_error_over_hidden_patches():
    pred = torch.tensor([[[1.0, 1.0], [5.0, 5.0]], [[0.0, 2.0], [9.0, 9.0]]])  # (B=2, N=2, D=2)
    target = torch.zeros(2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the second patch of each image is visible
    # hidden: image 0 patch 0 -> (1 + 1) / 2 = 1; image 1 patch 0 -> (0 + 4) / 2 = 2; mean 1.5
    assert pilot_d2v2.d2v2_loss(pred, target, mask).item() == pytest.approx(1.5)


def test_ema_moves_the_teacher_towards_the_encoder_only():
    student = pilot_d2v2.pretrain.MAE(16, 1, 1, dim=16, depth=2, heads=2, patch=4, img_size=16)
    teacher = pilot_d2v2.ViT(**student.arch())
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    pilot_d2v2.ema_update(teacher, student, 0.75)
    s = student.state_dict()
    for name, _ in teacher.named_parameters():
        assert torch.allclose(teacher.state_dict()[name], 0.75 * t0[name] + 0.25 * s[name])


def test_resume_is_bit_identical_and_the_encoder_loads(tmp_path, small_digits):
    """Stopped at step 3 and resumed to 6 == 6 steps at once; other settings are refused."""
    pilot_d2v2.main(settings(tmp_path / "a"))
    pilot_d2v2.main(settings(tmp_path / "b", max_steps=3))
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a killed run logged past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    with pytest.raises(UserError, match="other settings"):
        pilot_d2v2.main(settings(tmp_path / "b", top_k=3))
    pilot_d2v2.main(settings(tmp_path / "b"))
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in "ab")
    assert a["step"] == b["step"] == 6
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    vit = load_encoder(str(tmp_path / "a" / "encoder.pth"))
    assert vit.depth == 3 and torch.equal(vit.blocks[0].attn.qkv.weight, a["student"]["blocks.0.attn.qkv.weight"])
