"""knn.py: the weighted vote against a naive loop, chunking, the feature file, checkpoint layouts, and DDP.

DDP: 2-process extraction against 1 process."""
import json
import sys

import numpy as np
import pytest
import torch
from conftest import cpu_settings

import knn
import model
import pretrain
from model import UserError
from util import common
from util.data import build_dataset, eval_transform, read_feature_file
from util.features import extract_features


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, image_folder, tiny_ckpt):
    """(a folder for this module's outputs, conftest's image folder, conftest's tiny encoder)."""
    return tmp_path_factory.mktemp("knn"), image_folder, tiny_ckpt


# --- knn_predict ------------------------------------------------------------------------------

def naive_knn(train, labels, test, k, temperature, num_classes):
    """One test image at a time, in numpy: cosine, sort, exp(sim / T) summed per class, argmax."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for q in test:
        sims = train @ q
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[labels[j]] += np.exp(sims[j] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_predict_matches_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(80, 12, generator=g), torch.randn(25, 12, generator=g)
    labels = torch.randint(0, 5, (80,), generator=g)
    preds = knn.knn_predict(train, labels, test, [1, 5, 20], temperature, num_classes=5)
    for k in (1, 5, 20):
        want = naive_knn(train.double().numpy(), labels.numpy(), test.double().numpy(), k, temperature, 5)
        assert np.array_equal(preds[k].numpy(), want), k


def test_knn_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    full = knn.knn_predict(train, labels, test, [10, 20])
    for chunk in (1, 5, 36, 1000):
        part = knn.knn_predict(train, labels, test, [10, 20], chunk=chunk)
        assert all(torch.equal(full[k], part[k]) for k in (10, 20))
    single = knn.knn_predict(train, labels, test[:1], 10)  # an int k gives one tensor
    assert single.shape == (1,) and single[0] == full[10][0]


def test_standardize_uses_train_statistics():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(50, 4, generator=g) * 3 + 1, torch.randn(9, 4, generator=g)
    a, b = knn.standardize(train, test)
    mean, std = train.numpy().mean(0), train.numpy().std(0, ddof=1)
    np.testing.assert_allclose(a.numpy(), (train.numpy() - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), (test.numpy() - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5)


def test_knn_bad_k():
    x, y = torch.randn(5, 3), torch.arange(5)
    for k in (0, 6):
        with pytest.raises(UserError):
            knn.knn_predict(x, y, x, k)
    with pytest.raises(UserError, match="--k"):
        knn.main(cpu_settings(knn.Settings, k="0"))


# --- the script end to end --------------------------------------------------------------------

def test_main_imagefolder_feature_file_roundtrip(tiny):
    root, data, ckpt = tiny
    feats, out = str(root / "f.pt"), str(root / "r.json")
    res = knn.main(cpu_settings(knn.Settings, ckpt=ckpt, data=data, blocks="all", k="1,3",
                                save_features=feats, out=out))
    assert [(r["block"], r["k"]) for r in res["results"]] == [(b, k) for b in (1, 2, 3, 4) for k in (1, 3)]
    assert all(0 <= r["top1"] <= 1 for r in res["results"])
    assert json.load(open(out))["results"] == res["results"]
    f = torch.load(feats, weights_only=True)
    # conftest's image folder, 3 classes x (3 train, 2 val); the encoder is 32 wide with 4 blocks
    assert set(f["train_features"]) == {1, 2, 3, 4} and f["train_features"][4].shape == (3 * 3, 32)
    assert f["train_labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ImageFolder's sorted order
    assert f["val_labels"].dtype == torch.int64 and f["val_features"][1].shape == (3 * 2, 32)
    again = knn.main(cpu_settings(knn.Settings, load_features=feats, blocks="all", k="1,3"))
    assert again["results"] == res["results"]
    sub = knn.main(cpu_settings(knn.Settings, load_features=feats, blocks="2-3", k="1", concat=True))
    assert [r["block"] for r in sub["results"]] == ["2+3"]
    with pytest.raises(UserError, match="block 5"):
        knn.main(cpu_settings(knn.Settings, load_features=feats, blocks="5"))


def test_feature_file_single_block_and_bad_files(tiny, tmp_path):
    root, data, ckpt = tiny
    path = str(tmp_path / "one.pt")
    knn.main(cpu_settings(knn.Settings, ckpt=ckpt, data=data, k="1", save_features=path))
    f = torch.load(path, weights_only=True)
    assert torch.is_tensor(f["train_features"]) and f["train_features"].shape == (9, 32)
    assert knn.main(cpu_settings(knn.Settings, load_features=path, k="1"))["results"][0]["block"] == 4
    with pytest.raises(UserError, match=r"holds blocks \[4\]"):  # another block than the one stored
        knn.main(cpu_settings(knn.Settings, load_features=path, k="1", blocks="2"))
    torch.save({"train_features": torch.zeros(3, 2)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="lacks"):
        knn.main(cpu_settings(knn.Settings, load_features=str(tmp_path / "bad.pt")))
    with pytest.raises(UserError, match="does not exist"):
        knn.main(cpu_settings(knn.Settings, load_features=str(tmp_path / "missing.pt")))


def test_checkpoint_layouts_refine_and_mae(tiny, tmp_path):
    """refine.py's last.pt: EMA by default, --weights online for the other; MAE with decoder."""
    root, data, _ = tiny
    torch.manual_seed(3)
    ema, online = (model.ViT(dim=32, depth=2, patch=4, img_size=32) for _ in range(2))
    torch.save({"encoder": model.export_encoder(online), "ema": model.export_encoder(ema), "arch": ema.arch(),
                "step": 7}, tmp_path / "last.pt")
    mae = pretrain.MAE(dec_dim=16, dec_depth=1, dec_heads=2, dim=32, depth=2, patch=4, img_size=32)
    torch.save({"model": mae.state_dict(), "arch": mae.arch()}, tmp_path / "mae.pth")
    ds = build_dataset(data, "val", eval_transform(32))
    for path, weights, vit in [("last.pt", "ema", ema), ("last.pt", "online", online),
                               ("mae.pth", "ema", mae)]:
        out = str(tmp_path / f"{path}.{weights}.pt")
        knn.main(cpu_settings(knn.Settings, ckpt=str(tmp_path / path), weights=weights, data=data, k="1",
                              feature="cls-norm", save_features=out))
        want, _ = extract_features(vit, ds, [2], "cls-norm", batch_size=6)
        torch.testing.assert_close(torch.load(out)["val_features"], want[2])


def test_norm_pseudo_block_is_the_top_block_after_the_final_norm(tiny, tmp_path):
    """--blocks 2,norm: block 2 and 'norm', block 2 after the final norm.

    Its CLS is --feature cls-norm's of block 2, its patch mean the mean of the normed patch tokens (mean of the raw
    ones under cls-norm+mean)."""
    root, data, ckpt = tiny
    vit, ds = model.load_encoder(ckpt), build_dataset(data, "val", eval_transform(32))
    with torch.no_grad():
        vit.norm.weight.uniform_(0.5, 1.5), vit.norm.bias.normal_()  # not the identity's affine part
    got, _ = extract_features(vit, ds, common.parse_blocks("2,norm", 4), "cls-norm+mean")
    want, _ = extract_features(vit, ds, [2], "cls-norm")
    assert list(got) == [2, "norm"] and got["norm"].shape == (6, 64)
    torch.testing.assert_close(got["norm"][:, :32], want[2])
    torch.testing.assert_close(got[2][:, :32], want[2])  # cls-norm on a raw block: the same CLS
    x = torch.stack([img for img, _ in ds])
    with torch.no_grad():
        normed = vit.final_norm(vit.forward_blocks(x, [2])[0])
    torch.testing.assert_close(got["norm"][:, 32:], normed[:, 1:].mean(1))
    res = knn.main(cpu_settings(knn.Settings, ckpt=ckpt, data=data, blocks="last,norm", k="1"))["results"]
    assert [r["block"] for r in res] == [4, "norm"]


def test_plot_needs_matplotlib(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(UserError, match="matplotlib"):
        knn.main(cpu_settings(knn.Settings, plot="curve.png"))


def test_plot_curve_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra: skipped where it is missing
    records = [dict(block=b, k=k, top1=0.1 * b) for b in (1, 2, 3) for k in (10, 20)]
    knn.plot_curve(records, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


# --- 2 processes (gloo) == 1 process ----------------------------------------------------------

def test_two_process_extraction_equals_one_process(tiny, tmp_path, two_ranks):
    root, data, ckpt = tiny
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    kw = dict(ckpt=ckpt, data=data, blocks="2,4", k="1", batch_size=2)
    res1 = knn.main(cpu_settings(knn.Settings, save_features=one, **kw))
    cfg = cpu_settings(knn.Settings, save_features=two, out=str(tmp_path / "two.json"), **kw)
    two_ranks(knn.main, cfg)
    a, b = torch.load(one), torch.load(two)
    for split in ("train", "val"):  # 9 train images: rank 1's shard is padded, the pad dropped
        assert torch.equal(a[f"{split}_labels"], b[f"{split}_labels"])
        for blk in (2, 4):
            torch.testing.assert_close(a[f"{split}_features"][blk], b[f"{split}_features"][blk])
    assert json.load(open(tmp_path / "two.json"))["results"] == res1["results"]


def test_results_describe_the_feature_file_not_the_flags(tiny, tmp_path, capsys):
    root, data, ckpt = tiny
    feats = str(tmp_path / "mean.pt")
    knn.main(cpu_settings(knn.Settings, ckpt=ckpt, data=data, k="1", feature="mean", save_features=feats))
    stored = torch.load(feats, weights_only=True)
    assert (stored["ckpt"], stored["data"], stored["feature"], stored["arch"]["heads"]) == (ckpt, data, "mean", 1)
    capsys.readouterr()
    res = knn.main(cpu_settings(knn.Settings, load_features=feats, k="1", ckpt="other.pth", data="jittered-digits",
                                out=str(tmp_path / "r.json")))  # --feature cls by default
    assert res["results"][0]["feature"] == "mean"
    saved = json.load(open(tmp_path / "r.json"))["settings"]
    assert (saved["ckpt"], saved["data"], saved["feature"], saved["img_size"]) == (ckpt, data, "mean", 32)
    assert f"features of {feats}: {ckpt} on {data}, feature mean" in capsys.readouterr().out


def test_num_heads_flag_and_the_printed_architecture(tiny, tmp_path, capsys):
    """A timm encoder 64 wide with 4 heads: read by width it has 1 (printed as such).

    --num-heads 4 gives timm's own features."""
    timm = pytest.importorskip("timm")
    root, data, _ = tiny
    net = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1,
                                                           num_heads=4, num_classes=0, global_pool="token").eval()
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    out = str(tmp_path / "f.pt")
    knn.main(cpu_settings(knn.Settings, ckpt=str(tmp_path / "timm.pth"), data=data, k="1", save_features=out))
    assert "1 heads (by width: not stored in the file)" in capsys.readouterr().out
    knn.main(cpu_settings(knn.Settings, ckpt=str(tmp_path / "timm.pth"), data=data, k="1", num_heads=4,
                          feature="cls-norm", save_features=out))
    assert "'heads': 4" in capsys.readouterr().out
    x = torch.stack([img for img, _ in build_dataset(data, "val", eval_transform(32))])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out)["val_features"], net.forward_features(x)[:, 0],
                                   atol=1e-5, rtol=1e-5)



# --- a feature file from elsewhere: the four tensors alone ---------------------------------------

def four_tensors(path, dtype=torch.float16, label_dtype=torch.int8, blocks=None, **extra):
    """Three well-separated classes in 8 dimensions, 30 train and 12 val rows, saved as a feature file.

    The four tensors in `dtype` and `label_dtype` (features as {block: tensor} when `blocks` are given) and `extra`;
    returns the same file in float32 and int64, as --save-features writes it (feature 'cls', block 'given')."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    saved, plain = dict(extra), {"feature": "cls", "blocks": ["given"]}
    for split, n in (("train", 30), ("val", 12)):
        y = torch.arange(n) % 3
        x = (centres[y] + torch.randn(n, 8, generator=g)).to(dtype)
        saved[f"{split}_features"] = x if blocks is None else {b: x for b in blocks}
        saved[f"{split}_labels"] = y.to(label_dtype)
        plain[f"{split}_features"], plain[f"{split}_labels"] = x.float(), y
    torch.save(saved, path)
    return plain


def test_four_tensor_feature_file_in_every_script(tmp_path, capsys):
    """float16 features and int8 labels, nothing else: every script runs on them and scores as on float32 / int64.

    Each prints one warning line naming what it took for the unrecorded feature and block."""
    import cluster
    import probe
    bare, full = str(tmp_path / "bare.pt"), str(tmp_path / "full.pt")
    torch.save(four_tensors(bare), full)
    runs = [(knn, dict(k="1,3")), (probe, dict(epochs=2)), (probe, dict(epochs=2, search="lr", lrs="0.1")),
            (probe, dict(shots="1,2", splits=2)), (cluster, dict(seeds=2, iters=10))]
    for script, kw in runs:
        capsys.readouterr()
        got = script.main(cpu_settings(script.Settings, load_features=bare, **kw))["results"]
        warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warned) == 1 and "taken as feature 'cls', block 'given'" in warned[0], warned
        assert got == script.main(cpu_settings(script.Settings, load_features=full, **kw))["results"]
        assert {r["block"] for r in got} == {"given"} and all(r["feature"] == "cls" for r in got)
        assert "warning:" not in capsys.readouterr().err  # the full file records both: nothing to say
    assert len(got) == 1 and got[0]["acc"] == 1.0  # cluster: three blobs 6 standard deviations apart


@pytest.mark.parametrize("dtype,label_dtype", [(torch.bfloat16, torch.uint8), (torch.float64, torch.int16)])
def test_feature_file_of_blocks_in_any_dtype(tmp_path, capsys, dtype, label_dtype):
    """{block: tensor} features in bfloat16 or float64, labels of any integer width: float32, int64."""
    path = str(tmp_path / "f.pt")
    plain = four_tensors(path, dtype, label_dtype, blocks=[7, 9], feature="mean")
    got = knn.main(cpu_settings(knn.Settings, load_features=path, blocks="all", k="1"))["results"]
    assert [(r["block"], r["feature"]) for r in got] == [(7, "mean"), (9, "mean")]
    assert "warning:" not in capsys.readouterr().err  # blocks and feature recorded
    f = read_feature_file(path, ("train", "val"))
    assert f["val_features"][9].dtype == torch.float32 and f["val_labels"].dtype == torch.int64
    assert torch.equal(f["val_features"][9], plain["val_features"])
    assert torch.equal(f["val_labels"], plain["val_labels"])
