"""demo.py: the whole chain (refine twice, extract once, k-NN, probe, low-shot, clustering, summary)
at a reduced size on a tiny encoder and image folder; the summary checked against the stages."""
import importlib.util
import json
import os

import pytest
import torch
from conftest import make_checkpoint, make_image_folder

import demo
import knn
import model
from model import UserError


def test_demo_quick_chain(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", per_class=(8, 2))  # 3 classes: 24 train, 6 val
    ckpt = str(tmp_path / "tiny.pth")
    make_checkpoint(ckpt, depth=3)
    out = str(tmp_path / "demo")
    has_plot = importlib.util.find_spec("matplotlib") is not None
    summary = demo.main(demo.Settings(ckpt=ckpt, data=folder, out=out, quick=True, jobs=3,
                                      plot=has_plot, control=True))

    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert list(summary) == ["mae", "mim-refiner", "mae-ct", "random", "random+mim-refiner", "random+mae-ct"]
    keys = ("knn_top1", "knn_best_block_top1", "probe_top1", "shot1_top1", "shot5_top1",
            "cluster_acc", "cluster_nmi", "cluster_ari")
    for name, s in summary.items():
        assert all(k in s for k in keys), name
        assert all(0.0 <= s[k] <= 1.0 or k == "cluster_ari" for k in keys), (name, s)
        assert list(s["knn_per_block"]) == [1, 2, 3]
        assert s["knn_best_block_top1"] == max(s["knn_per_block"].values()) >= s["knn_top1"]
        assert s["knn_top1"] == s["knn_per_block"][3]
        assert os.path.isfile(os.path.join(out, name, "features.pt"))
    for name in ("mim-refiner", "mae-ct", "random+mim-refiner", "random+mae-ct"):  # each a new encoder
        assert os.path.isfile(os.path.join(out, name, "encoder.pth"))
    # the control starts from fresh weights of the MAE's shape, not from the MAE
    fresh, mae = model.load_encoder(os.path.join(out, "random", "encoder.pth")), model.load_encoder(ckpt)
    assert fresh.arch() == mae.arch()
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    with open(os.path.join(out, "random+mim-refiner", "refine.log")) as f:
        assert os.path.join(out, "random", "encoder.pth") in f.read()
    # the MAE's numbers are what knn.py reports for the checkpoint itself (k = 20, every block)
    ref = knn.main(knn.Settings(ckpt=ckpt, data=folder, blocks="all", k="20", device="cpu", workers=0))
    assert {r["block"]: r["top1"] for r in ref["results"]} == summary["mae"]["knn_per_block"]
    text = capsys.readouterr().out
    assert "mim-refiner" in text and "cluster_acc" in text and "probe_top1" in text
    for picture in ("knn_per_block.png", "neighbours.png", "tsne.png"):
        assert os.path.isfile(os.path.join(out, picture)) == has_plot


def test_demo_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        demo.main(demo.Settings(ckpt=str(tmp_path / "missing.pth"), plot=False))
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {}}, bad)
    with pytest.raises(UserError, match="failed"):  # a stage's error stops the demo, naming the log
        demo.main(demo.Settings(ckpt=bad, out=str(tmp_path / "o"), quick=True, plot=False, jobs=1))
