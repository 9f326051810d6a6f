"""demo.py: the whole chain at a reduced size on a tiny encoder and image folder.

The chain: refine twice, extract once, k-NN, probe, low-shot, clustering, summary; the summary checked against the
stages."""
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
from util.data import build_dataset, eval_transform


def test_demo_quick_chain(tmp_path, capsys):
    """Every encoder's row (baselines, two seeds of each refinement, own view, control) is what its stages wrote."""
    folder = make_image_folder(tmp_path / "data", per_class=(8, 2))  # 3 classes: 24 train, 6 val
    ckpt = str(tmp_path / "tiny.pth")
    make_checkpoint(ckpt, depth=3)
    out = str(tmp_path / "demo")
    has_plot = importlib.util.find_spec("matplotlib") is not None
    summary = demo.main(demo.Settings(ckpt=ckpt, data=folder, out=out, quick=True, jobs=3, seeds=2,
                                      plot=has_plot, own_view="mim-refiner,mae-ct"))

    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    enc = summary["encoders"]
    assert summary["split"] == folder and summary["seeds"] == [0, 1]
    assert list(enc) == ["pixels", "pixels, per-image", "random", "mae", "mim-refiner", "mae-ct",
                         "mim-refiner, own view", "mae-ct, own view"]
    keys = ("knn_top1", "knn_plain_top1", "probe_top1", "shot1_top1", "shot5_top1", "cluster_acc", "cluster_nmi")
    for name, s in enc.items():
        n = 1 if name in ("pixels", "pixels, per-image", "random", "mae") else 2  # one value per refinement seed
        assert all(len(s[k]) == n and all(0.0 <= v <= 1.0 for v in s[k]) for k in keys), (name, s)
        if not name.startswith("pixels"):  # an encoder: a k-NN per block, the last one is knn_top1
            assert list(s["knn_per_block"]) == ["1", "2", "3"] and s["knn_top1"] == s["knn_per_block"]["3"]
            assert s["knn_best_block_top1"] == [max(v[i] for v in s["knn_per_block"].values()) for i in range(n)]
    for name in ("mim-refiner", "mae-ct, own view"):  # each seed a new encoder
        a, b = (model.load_encoder(os.path.join(out, name, f"seed{s}", "encoder.pth")) for s in (0, 1))
        assert not torch.equal(a.blocks[-1].mlp.fc1.weight, b.blocks[-1].mlp.fc1.weight), name
    ck = torch.load(os.path.join(out, "mae-ct, own view", "seed1", "last.pt"), weights_only=True)
    assert ck["settings"]["neighbours"] == "none" and ck["settings"]["seed"] == 1
    # the random baseline: fresh weights of the MAE's shape, not the MAE
    fresh, mae = model.load_encoder(os.path.join(out, "random", "encoder.pth")), model.load_encoder(ckpt)
    assert fresh.arch() == mae.arch()
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    # the MAE's numbers are what knn.py reports for the checkpoint itself (k = 20, every block)
    ref = knn.main(knn.Settings(ckpt=ckpt, data=folder, blocks="all", k="20", device="cpu", workers=0))
    assert {str(r["block"]): [r["top1"]] for r in ref["results"]} == enc["mae"]["knn_per_block"]
    # the pixel baseline is knn.py on the flattened evaluation-transform pixels, by hand
    ds = {s: build_dataset(folder, s, eval_transform(32)) for s in ("train", "val")}
    x = {s: torch.stack([ds[s][i][0] for i in range(len(ds[s]))]).flatten(1) for s in ds}
    y = {s: torch.as_tensor(ds[s].targets) for s in ds}
    tr, va = knn.standardize(x["train"], x["val"])
    assert enc["pixels"]["knn_top1"] == [float((knn.knn_predict(tr, y["train"], va, 20) == y["val"]).float().mean())]
    text = capsys.readouterr().out
    assert "mim-refiner, own view" in text and "k-means ACC" in text and " ± " in text
    for picture in ("knn_per_block.png", "neighbours.png", "tsne.png"):
        assert os.path.isfile(os.path.join(out, picture)) == has_plot


def test_refine_flags_of_the_ablations():
    """The own view replaces the swap and nothing else; the control refines the random encoder, all of it."""
    cfg = demo.Settings(mae_ct_args="--epochs 2")
    assert demo.refine_flags(cfg, "mae-ct") == ["--method", "mae-ct", "--epochs", "2"]
    assert demo.refine_flags(cfg, "mae-ct, own view") == ["--method", "mae-ct", "--epochs", "2", "--neighbours", "none"]
    assert demo.refine_flags(cfg, "random+mim-refiner") == ["--method", "mim-refiner", "--freeze-blocks", "0"]


def test_table_cells_are_mean_and_sample_sd():
    """Two seeds 0.5 and 0.7: mean 60.0, sample SD 14.1 (sqrt(0.02) = 0.1414)."""
    assert demo.cell([0.5, 0.7]) == "60.0 ± 14.1" and demo.cell([0.123]) == "12.3"


def test_demo_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        demo.main(demo.Settings(ckpt=str(tmp_path / "missing.pth"), plot=False))
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {}}, bad)
    with pytest.raises(UserError, match="failed"):  # a stage's error stops the demo, naming the log
        demo.main(demo.Settings(ckpt=bad, out=str(tmp_path / "o"), quick=True, plot=False, jobs=1))
