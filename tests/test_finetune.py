"""finetune.py (the papers' 1% protocol): layer-wise lr groups, the split file, label smoothing, and DDP.

DDP: two processes (gloo) against one on the same global batch."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_settings, make_checkpoint, make_image_folder

import finetune
import model
from model import UserError
from util import common
from util.data import build_dataset


def settings(**kw):
    return cpu_settings(finetune.Settings, **{"epochs": 2, "batch_size": 6, **kw})


def test_param_groups_layer_decay_and_trainable_positions():
    """Eq. (13) with decay 0.75: block j 0.75^(depth+1-j); stem and positions 0.75^(depth+1); final norm and head 1.

    No weight decay on 1-D parameters, the CLS token and the (now trained) positions."""
    net = finetune.Classifier(model.ViT(dim=32, depth=3, patch=4, img_size=32), 5)
    assert isinstance(net.vit.pos_embed, torch.nn.Parameter) and "pos_embed" not in dict(net.vit.named_buffers())
    cfg = settings()
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
