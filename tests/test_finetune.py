"""finetune.py (the papers' 1% protocol): layer-wise lr groups, weight decay by size, the head, DDP.

Also data2vec 2.0's head LayerNorm, the fixed CLS position slot, the split file, label smoothing, and two
processes (gloo, DDP) against one on the same global batch."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_settings, make_checkpoint, make_image_folder

import finetune
import model
from model import UserError
from util import common
from util.data import build_dataset, eval_transform


def settings(**kw):
    return cpu_settings(finetune.Settings, **{"epochs": 2, "batch_size": 6, **kw})


def test_param_groups_layer_decay_and_trainable_positions():
    """Eq. (13) with decay 0.75: block j 0.75^(depth+1-j); stem and positions 0.75^(depth+1); final norm and head 1.

    No weight decay on 1-D parameters, the CLS token and the (now trained) positions."""
    net = finetune.Classifier(model.ViT(dim=32, depth=3, patch=4, img_size=32), 5)
    assert isinstance(net.vit.pos_embed, torch.nn.Parameter) and "pos_embed" not in dict(net.vit.named_buffers())
    cfg = settings(weight_decay=0.4)
    groups = common.param_groups(net, cfg.weight_decay, cfg.layer_decay, net.vit.depth)
    seen = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in net.named_parameters():
        if name.startswith("vit.blocks."):
            want = 0.75 ** (3 + 1 - (int(name.split(".")[2]) + 1))
        elif name.startswith(("vit.patch_embed", "vit.cls_token", "vit.pos_embed")):
            want = 0.75 ** 4
        else:
            assert name.startswith(("vit.norm.", "head.")), name
            want = 1.0
        wd = 0.0 if p.ndim == 1 or name in ("vit.cls_token", "vit.pos_embed") else 0.4
        assert seen[id(p)] == (pytest.approx(want), wd), name
    assert len(seen) == len(list(net.parameters()))
    assert net.head.weight.std() < 1e-4 and not net.head.bias.any()  # MAE's head init, std 2e-5


def test_weight_decay_by_size_and_the_flag_wins(tmp_path, monkeypatch, tiny_ckpt):
    """Weight decay as the official 1% templates: 0.05 for ViT-L/16, 0.4 for ViT-H/14, H/16 and 2B/14.

    data2vec 2.0 by its size; what AdamW receives for the matrices, by default and with an explicit --weight-decay."""
    by_size = {n: finetune.default_weight_decay(SimpleNamespace(dim=model.SIZES[n][0])) for n in model.SIZES}
    assert by_size == {"tiny": 0.05, "small": 0.05, "base": 0.05, "large": 0.05, "huge": 0.4, "2b": 0.4}
    assert finetune.default_weight_decay(SimpleNamespace(dim=1280, post_norm=True)) == 0.4  # data2vec 2.0 H/14
    seen, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **k: seen.append(
        {g["weight_decay"] for g in groups}) or real(groups, **k))
    data = make_image_folder(tmp_path / "d", per_class=(2, 1))  # 6 train images
    for given, want in ((None, {0.0, 0.05}), (0.3, {0.0, 0.3})):
        finetune.main(settings(ckpt=tiny_ckpt, data=data, percent=100, epochs=1, weight_decay=given))
        assert seen.pop() == want


def post_norm_classifier(classes=3):
    """A data2vec-2.0-like (post-norm) classifier whose head and head norm are random, not their init."""
    torch.manual_seed(0)
    net = finetune.Classifier(model.ViT(dim=32, depth=2, patch=4, img_size=16, post_norm=True), classes)
    for p in (net.head.weight, net.head_norm.weight, net.head_norm.bias):
        torch.nn.init.normal_(p)
    return net


def test_data2vec_head_layernorm():
    """The head as the official data2vec 2.0 classifier: LayerNorm (eps 1e-6) on the CLS token, then the linear head.

    A pre-norm encoder has its final norm instead, and no extra parameters."""
    net, x = post_norm_classifier(), torch.randn(4, 3, 16, 16)
    cls = net.vit(x)[:, 0]
    want = F.linear(F.layer_norm(cls, (32,), net.head_norm.weight, net.head_norm.bias, 1e-6),
                    net.head.weight, net.head.bias)
    assert torch.allclose(net(x), want, atol=1e-5) and not torch.allclose(net.head(cls), want, atol=1e-2)
    pre = finetune.Classifier(model.ViT(dim=32, depth=2, patch=4, img_size=16), 3)
    assert not any(k.startswith("head_norm") for k in pre.state_dict())
    groups = common.param_groups(net, 0.05, 0.75, 2)
    assert [g["lr_scale"] for g in groups for p in g["params"] if p is net.head_norm.weight] == [1.0]


def test_validation_top1_reads_the_head_norm(tmp_path):
    """accuracy() (features extracted once, then the head) equals the classifier run image by image."""
    data = make_image_folder(tmp_path / "d", per_class=(2, 4), size=16)
    net, d = post_norm_classifier(), common.setup_distributed("cpu")
    val = build_dataset(data, "val", eval_transform(16))
    with torch.no_grad():
        want = sum(int(net(x[None]).argmax()) == y for x, y in val) / len(val)
    assert finetune.accuracy(net, val, settings(), d) == pytest.approx(want)


def test_cls_position_slot_stays_fixed():
    """After AdamW steps the CLS slot of the position table is unchanged, the patch rows have moved."""
    torch.manual_seed(0)
    net = finetune.Classifier(model.ViT(dim=32, depth=2, patch=4, img_size=16), 3)
    before, cls = net.vit.pos_embed.detach().clone(), net.vit.cls_token.detach().clone()
    optim = torch.optim.AdamW(common.param_groups(net, 0.4, 0.75, 2), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(net(torch.randn(4, 3, 16, 16)) * 1e4, torch.tensor([0, 1, 2, 0]))
        optim.zero_grad()
        loss.backward()
        optim.step()
    after = net.vit.pos_embed.detach()
    assert torch.equal(after[:, 0], before[:, 0])
    assert (after[:, 1:] - before[:, 1:]).abs().amax(-1).min() > 0  # every patch row trained
    assert not torch.equal(net.vit.cls_token.detach(), cls)  # the CLS token itself trains


def test_split_file_and_label_smoothing(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "d", per_class=(4, 2))  # 12 train images, 3 classes
    ckpt = str(tmp_path / "e.pth")
    make_checkpoint(ckpt, depth=2)
    names = ["a/a_1.png", "a_3.png", "b_0.png", "b/b_2.png", "c_1.png", "c_2.png"]
    (tmp_path / "split.txt").write_text("\n".join(names) + "\n")
    train = build_dataset(data, "train")
    idx = finetune.labelled_indices(settings(data=data, split_file=str(tmp_path / "split.txt")), train)
    assert sorted(os.path.basename(train.samples[i][0]) for i in idx) == sorted(os.path.basename(n) for n in names)
    seen, real = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: seen.append(k.get("label_smoothing")) or real(*a, **k))
    res = finetune.main(settings(ckpt=ckpt, data=data, split_file=str(tmp_path / "split.txt"), lr=1e-3))
    assert seen == [0.1, 0.1]  # 6 labelled images, batch 6: one step per epoch
    assert [(r["epoch"], r["step"], r["images"]) for r in res["results"]] == [(1, 1, 6), (2, 2, 6)]
    assert sum(r["best"] for r in res["results"]) == 1 and all(0 <= r["top1"] <= 1 for r in res["results"])
    with pytest.raises(UserError, match="larger than the 6 labelled"):
        finetune.main(settings(ckpt=ckpt, data=data, split_file=str(tmp_path / "split.txt"), batch_size=8))


def test_two_processes_equal_one(tmp_path, two_ranks):
    """DDP (gloo) with 2 x 2 images per step equals one process with 4 (--batch-size is the global batch).

    The same images, crops (seeded per image) and averaged gradients, so the same losses and accuracies."""
    data = make_image_folder(tmp_path / "d", per_class=(8, 2))  # 24 train images
    ckpt = str(tmp_path / "e.pth")
    make_checkpoint(ckpt, depth=2)
    kw = dict(ckpt=ckpt, data=data, percent=50, batch_size=4, lr=0.05, warmup_epochs=0.5)
    one = finetune.main(settings(**kw))["results"]
    two_ranks(finetune.main, settings(out=str(tmp_path / "two.json"), **kw))
    two = json.load(open(tmp_path / "two.json"))["results"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 6]  # 12 labelled, global batch 4
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [r["top1"] for r in two] == [r["top1"] for r in one]
    assert one[1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-3)  # it trained
