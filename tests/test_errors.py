"""Bad input: one line `error: ...` naming the problem and the fix, exit code 2, no traceback."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_checkpoint, make_image_folder, make_images

import cluster
import knn
import model
import pretrain
import probe
import refine
from util import common


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder of good and bad inputs: checkpoints, feature files, image folders."""
    d = tmp_path_factory.mktemp("bad")
    vit = make_checkpoint(d / "mae.pth", depth=2)
    torch.save({**model.export_encoder(vit), "fc.weight": torch.zeros(3)}, d / "other.pth")
    (d / "notes.txt").write_text("not a checkpoint")
    torch.save({"train_features": torch.zeros(2, 3)}, d / "feats.pt")
    x, y = torch.randn(4, 3).half(), torch.tensor([0, 1, 0, 1], dtype=torch.int8)  # the four tensors, nothing else
    four = {"train_features": x, "train_labels": y, "val_features": x, "val_labels": y}
    for name, bad in [("nan", {"val_features": x.index_fill(1, torch.tensor([2]), float("nan"))}),
                      ("inf", {"train_features": {3: x.index_fill(0, torch.tensor([1]), float("-inf"))},
                               "val_features": {3: x}}),
                      ("wide", {"val_features": x[:, :2]}), ("rows", {"val_labels": y[:3]}),
                      ("floaty", {"train_labels": y.float()})]:
        torch.save({**four, **bad}, d / f"{name}.pt")
    make_image_folder(d / "ok", classes=("a", "b"), per_class=(2, 2))
    for split, classes in (("train", "ab"), ("val", "a")):  # val/ lacks a class: every later label would shift
        for c in classes:
            make_images(d / "oneless" / split / c, 1)
    torch.save({"model": model.export_encoder(vit), "args": __import__("argparse").Namespace(lr=0.1),
                "scaler": {"scale": np.float64(65536.0)}}, d / "foreign.pth")  # numpy: not weights-only
    (d / "noval" / "train" / "a").mkdir(parents=True)
    (d / "empty" / "train" / "a").mkdir(parents=True)
    (d / "empty" / "val" / "a").mkdir(parents=True)
    (d / "ok" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    return d


CASES = [  # (script, flags, what the one line must say)
    (knn, "--ckpt {d}/missing.pth", "does not exist"),
    (knn, "--ckpt {d}/notes.txt", "not a readable weights-only checkpoint"),
    (knn, "--ckpt {d}/other.pth", "unexpected keys ['fc.weight']"),
    (knn, "--ckpt {d}/mae.pth --data {d}/nowhere", "data folder"),
    (knn, "--ckpt {d}/mae.pth --data {d}/noval", "has no val/ folder"),
    (probe, "--ckpt {d}/mae.pth --data {d}/empty", "needs at least one image"),
    (knn, "--ckpt {d}/mae.pth --data {d}/ok --workers 0", "cannot read image"),
    (knn, "--ckpt {d}/mae.pth --data {d}/ok --workers 1", "broken.png"),
    (cluster, "--ckpt {d}/mae.pth --img-size 30", "not divisible by the patch size 4"),
    (knn, "--ckpt {d}/mae.pth --blocks 3", "block 3 does not exist"),
    (knn, "--ckpt {d}/mae.pth --k 0", "--k"),
    (cluster, "--ckpt {d}/mae.pth --batch-size 0", "--batch-size 0"),
    (probe, "--ckpt {d}/mae.pth --batch-size -4", "--batch-size -4"),
    (probe, "--ckpt {d}/mae.pth --optimizer adam", "--optimizer sgd or lars"),
    (knn, "--load-features {d}/feats.pt", "lacks"),
    (knn, "--load-features {d}/nan.pt", "val_features of block 'given' holds NaN or infinite values"),
    (cluster, "--load-features {d}/nan.pt", "holds NaN or infinite values"),
    (probe, "--load-features {d}/inf.pt --shots 1", "train_features of block 3 holds NaN or infinite values"),
    (knn, "--load-features {d}/wide.pt", "widths of train and val features differ ({'given': 3} vs {'given': 2}"),
    (probe, "--load-features {d}/wide.pt", "the blocks or widths of train and val features differ"),
    (knn, "--load-features {d}/rows.pt", "val_features of block 'given' has 4 rows for 3 labels"),
    (cluster, "--load-features {d}/rows.pt", "has 4 rows for 3 labels"),
    (probe, "--load-features {d}/rows.pt --search lr", "has 4 rows for 3 labels"),
    (probe, "--load-features {d}/floaty.pt", "train_labels must be one integer label per row"),
    (knn, "--ckpt {d}/mae.pth --data {d}/oneless", "other classes (only in train/: ['b'], only in val/: [])"),
    (cluster, "--ckpt {d}/mae.pth --data {d}/oneless", "give both the same class folders"),
    (knn, "--ckpt {d}/foreign.pth", "holds a pickled numpy"),
    (pretrain, "--data {d}/empty/train/a --device cpu --out {d}/p", "holds no images"),
    (refine, "--ckpt {d}/mae.pth --batch-size -4 --limit-train 64 --device cpu --out {d}/r",
     "global batch (-4) must be positive"),
    (refine, "--ckpt {d}/mae.pth --batch-size 80 --limit-train 64 --device cpu --out {d}/r",
     "not larger than the data set"),
    (pretrain, "--batch-size 0 --device cpu --out {d}/p", "--batch-size 0"),
    (pretrain, "--data {d}/ok --batch-size 64 --device cpu --out {d}/p", "larger than the"),
    (refine, "--ckpt {d}/mae.pth --out {d}/notes.txt", "is a file"),
    (pretrain, "--out {d}/notes.txt", "is a file"),
]


@pytest.mark.parametrize("script,flags,says", CASES)
def test_bad_input_gives_one_line(script, flags, says, files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script.__name__] + flags.format(d=files).split())
    with pytest.raises(SystemExit) as e:
        common.cli(script.main, script.Settings)
    err = capsys.readouterr().err.split("\r")[-1]  # after any progress bar
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert (files / "notes.txt").read_text() == "not a checkpoint"  # no good file is ever overwritten
    assert not (files / "r").exists() and not (files / "p").exists()  # nor an empty output folder left


def test_real_command_line_has_no_traceback(files):
    out = subprocess.run([sys.executable, "knn.py", "--ckpt", str(files / "other.pth")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: checkpoint") and "fc.weight" in out.stderr
    out = subprocess.run([sys.executable, "knn.py", "--load-features", str(files / "wide.pt")], cwd=ROOT,
                         capture_output=True, text=True)  # was a RuntimeError's traceback from the matrix product
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "widths of train and val features" in out.stderr
