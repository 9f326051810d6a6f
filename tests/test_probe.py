"""probe.py: the stacked lr grid, the feature sets, low-shot draws and fits, and the script end to end.

The stacked lr grid against torch.optim.SGD one lr at a time, a separable problem, the feature sets of MIM-Refiner's
52-probe search, low-shot draws and split files (util/lowshot.py), the logistic regression, the script end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import cpu_settings, make_checkpoint, make_image_folder

import model
import probe
from model import UserError
from util import common, lowshot
from util.data import build_dataset, eval_transform


def blobs(n, dim=16, classes=4, seed=0, spread=0.3, noise_seed=0):
    """Classes around random centres (radius 3) drawn from `seed`, noise from `noise_seed`."""
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)), dim=1) * 3
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=torch.Generator().manual_seed(noise_seed)), y


def test_linear_probe_separable_features():
    x, y = blobs(400)
    vx, vy = blobs(200, noise_seed=1)
    accs = probe.linear_probe(x, y, vx, vy, lrs=[1e-3, 0.1], epochs=6, batch=100)
    assert accs[1] >= 0.98


def test_lars_step_equals_maes_lars_per_probe():
    """The stacked LARS step equals MAE's LARS written out for each probe alone.

    The weight gradient scaled by 0.001 |w| / |grad| (1 where a norm is zero), the bias plain momentum SGD."""
    torch.manual_seed(0)
    stacked = probe.StackedProbe(6, 4, 3)
    stacked.bias.data.normal_()
    w, b = stacked.weight.detach().clone(), stacked.bias.detach().clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    momentum, lrs = [torch.zeros_like(w), torch.zeros_like(b)], torch.tensor([0.1, 0.5, 2.0])
    for step in range(3):
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        gw[1] *= step != 1  # probe 1 gets a zero gradient once: trust ratio 1
        stacked.weight.grad, stacked.bias.grad = gw.clone(), gb.clone()
        probe.sgd_step(stacked, momentum, lrs, lars=True)
        for g in range(3):
            trust = 0.001 * w[g].norm() / gw[g].norm() if gw[g].norm() > 0 else 1.0
            mw[g] = 0.9 * mw[g] + trust * gw[g]
            mb[g] = 0.9 * mb[g] + gb[g]
            w[g] -= lrs[g] * mw[g]
            b[g] -= lrs[g] * mb[g]
    torch.testing.assert_close(stacked.weight.detach(), w)
    torch.testing.assert_close(stacked.bias.detach(), b)
    trainer = probe.GridTrainer(6, 4, [0.1], 10, 5, 100, 2, 0, "cpu", lars=True)
    assert (trainer.total, trainer.warmup) == (50, 2 * 10)  # 2 epochs of 100 // 10 steps


def test_stacked_grid_equals_torch_sgd_per_lr():
    """Each lr of the grid trains exactly as a separate BatchNorm + Linear under torch.optim.SGD."""
    x, y = blobs(100, dim=8, classes=3, spread=1.0)
    lrs, epochs, batch = [0.01, 0.3], 3, 32
    trainer = probe.GridTrainer(8, 3, lrs, batch, epochs, len(x), 0.1 * epochs, seed=5, device="cpu")
    init_w = trainer.probe.weight.detach().clone()
    for _ in range(epochs):
        trainer.train_epoch(x, y)
    gen = torch.Generator().manual_seed(5)
    torch.randn(2, 8, 3, generator=gen)  # the grid's initial weights, drawn first
    perms = [torch.randperm(len(x), generator=gen) for _ in range(epochs)]
    total, warmup = epochs * (len(x) // batch), round(0.1 * epochs * (len(x) // batch))
    for g, lr in enumerate(lrs):
        ref = nn.Sequential(nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
        with torch.no_grad():
            ref[1].weight.copy_(init_w[g].T)
            ref[1].bias.zero_()
        opt = torch.optim.SGD(ref.parameters(), lr=lr * batch / 256, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.warmup_cosine(s, total, warmup, 1.0, 0.0))
        for perm in perms:
            for i in range(len(x) // batch):
                idx = perm[i * batch:(i + 1) * batch]
                opt.zero_grad()
                F.cross_entropy(ref(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
        close = dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(trainer.probe.weight[g].detach().T, ref[1].weight.detach(), **close)
        torch.testing.assert_close(trainer.probe.bias[g, 0].detach(), ref[1].bias.detach(), **close)
        ref.eval()
        want = (ref(x).argmax(1) == y).float().mean().item()
        assert trainer.accuracy(x, y)[g] == pytest.approx(want)


def test_lr_schedule_warmup_then_cosine():
    """100 steps, 10 of warm-up: (s + 1) / 10 for s < 10, then (1 + cos(pi * (s - 10) / 90)) / 2."""
    assert common.warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)  # 1 / 10: the first step already trains
    assert common.warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)  # 10 / 10
    assert common.warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)  # cos(0)
    assert common.warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)  # (55 - 10) / 90 = 1/2: cos(pi / 2) = 0
    assert common.warmup_cosine(100, 100, 10, 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)  # cos(pi) = -1


def test_draw_split_exact_shots_and_deterministic():
    labels = np.repeat(np.arange(5), [7, 3, 9, 4, 5])
    for shots in (1, 2, 3):
        idx = lowshot.draw_split(labels, seed=0, shots=shots)
        assert np.all(np.bincount(labels[idx], minlength=5) == shots) and len(set(idx)) == len(idx)
        assert np.array_equal(idx, lowshot.draw_split(labels, seed=0, shots=shots))
    assert not np.array_equal(lowshot.draw_split(labels, 0, shots=2), lowshot.draw_split(labels, 1, shots=2))
    pct = lowshot.draw_split(labels, seed=0, percent=50)  # half of every class, at least one
    assert np.bincount(labels[pct]).tolist() == [4, 2, 4, 2, 2]
    with pytest.raises(UserError, match="fewer"):
        lowshot.draw_split(labels, 0, shots=4)


def test_read_split_file(tmp_path, image_folder):
    from torchvision import datasets
    ds = datasets.ImageFolder(f"{image_folder}/train")
    (tmp_path / "s.txt").write_text("a_0.png\nb/b_1.png\n\n/some/where/c/c_2.png\n")
    idx = lowshot.read_split_file(str(tmp_path / "s.txt"), len(ds), ds.samples, ds.root)
    assert [ds.samples[i][0].split("/")[-1] for i in idx] == ["a_0.png", "b_1.png", "c_2.png"]
    (tmp_path / "n.txt").write_text("0\n4\n")  # indices, for data sets without files
    assert lowshot.read_split_file(str(tmp_path / "n.txt"), 9).tolist() == [0, 4]
    (tmp_path / "bad.txt").write_text("zzz.png\n")
    with pytest.raises(UserError, match="zzz.png"):
        lowshot.read_split_file(str(tmp_path / "bad.txt"), len(ds), ds.samples, ds.root)


def test_lowshot_accuracy_preprocessing_and_reference():
    """Each train row centred on its own mean and L2-normalised (cyanure, columns=False), validation rows as they are.

    scikit-learn on the same arrays gives the same accuracy."""
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(40, dim=8, classes=4, spread=2.0, seed=3)
    vx, vy = blobs(60, dim=8, classes=4, spread=2.0, seed=3, noise_seed=4)
    xn, vn = x.double().numpy(), vx.double().numpy()
    rows = xn - xn.mean(1, keepdims=True)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    clf = LogisticRegression(C=4000, fit_intercept=False, max_iter=1000).fit(rows, y.numpy())
    assert probe.lowshot_accuracy(x, y, vx, vy) == pytest.approx((clf.predict(vn) == vy.numpy()).mean())


def test_lowshot_row_centring_differs_from_the_labelled_mean():
    """A known answer.

    Train rows a = (1, 0, 0) (class 0) and b = (0, 1, 3) (class 1). Row centring maps them to a' ~ (2, -1, -1) and b' ~
    (-4, -1, 5); the symmetric two-sample logistic regression scores class 0 against class 1 by v . (a'/|a'| - b'/|b'|)
    ~ v . (1.43, -0.25, -1.18), so v = (0, 0, 1) is class 1. Centring with the labelled mean (0.5, 0.5, 1.5) instead
    gives the direction (1, -1, -3) with offset 4.5, and v = (0, 0, 1) would be class 0."""
    x, y = torch.tensor([[1.0, 0, 0], [0, 1, 3]]), torch.tensor([0, 1])
    vx, vy = torch.tensor([[0.0, 0, 1], [2, 0, 1], [0, 2, 0]]), torch.tensor([1, 0, 1])
    assert probe.lowshot_accuracy(x, y, vx, vy) == 1.0
    assert probe.lowshot_accuracy(x, y, vx[:1], torch.tensor([0])) == 0.0  # not the labelled-mean answer


def anisotropic_shots(classes=1000, dim=1024, shots=1, val=2, seed=0):
    """Class centres and per-row noise on a decaying spectrum plus a common offset of 0.3, float64.

    Dimension i scaled by i^-1/2; `shots` train rows and `val` val rows per class."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.5
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) * scale
    draw = lambda n: torch.arange(classes).repeat_interleave(n)  # noqa: E731
    (y, vy), noise = (draw(shots), draw(val)), lambda m: torch.randn(m, dim, generator=g, dtype=torch.float64)
    return centres[y] + noise(len(y)) * scale + 0.3, y, centres[vy] + noise(len(vy)) * scale + 0.3, vy


def eq22_times_cn(W, rows, y, C=4000):
    """Eq. (22)'s objective times C N, scikit-learn's scaling, and its gradient divided by C N.

    The objective: C sum_n CE(W x_n, y_n) + ||W||^2 / 2; the gradient is the mean loss's (scikit-learn's tol is on it):
    (P - Y)^T X / N + W / (C N)."""
    z = rows @ W.T  # (N, K)
    log_p = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    onehot = np.eye(W.shape[0])[y]
    return C * -(log_p * onehot).sum() + 0.5 * (W ** 2).sum(), ((np.exp(log_p) - onehot).T @ rows / len(y) +
                                                               W / (C * len(y)))


@pytest.mark.filterwarnings("ignore:The number of unique classes")  # 1-shot: scikit-learn's remark on the old call
def test_lowshot_is_solved_to_the_optimum():
    """1000 classes x 1024 dimensions, 1-shot: lowshot_fit reaches Eq. (22)'s optimum.

    scikit-learn's default tol 1e-4 bounds the mean loss's gradient entries, all below 1e-3 at W = 0 and 6e-5 after one
    L-BFGS step, where the old call stopped, far from Eq. (22)'s optimum. lowshot_fit reaches the optimum: its
    objective equals a reference run on from its solution to tol 1e-12, and its gradient (computed here) is below 1e-5
    of the starting one."""
    from sklearn.linear_model import LogisticRegression
    x, y, vx, vy = anisotropic_shots()
    rows = x - x.mean(1, keepdim=True)
    rows, yn = (rows / rows.norm(dim=1, keepdim=True)).numpy(), y.numpy()
    clf = probe.lowshot_fit(x, y)
    ours, grad = eq22_times_cn(clf.coef_, rows, yn)
    start = np.abs(eq22_times_cn(np.zeros_like(clf.coef_), rows, yn)[1]).max()
    ref = LogisticRegression(C=4000, fit_intercept=False, tol=1e-12, max_iter=10000, warm_start=True)
    ref.coef_ = clf.coef_.copy()  # warm_start: the reference goes on from our solution
    best = eq22_times_cn(ref.fit(rows, yn).coef_, rows, yn)[0]
    assert clf.n_iter_[0] > 1 and abs(ours - best) <= 1e-4 * best and np.abs(grad).max() <= 1e-5 * start
    old = LogisticRegression(C=4000, fit_intercept=False, max_iter=1000).fit(rows, yn)  # the former call
    assert old.n_iter_[0] == 1 and eq22_times_cn(old.coef_, rows, yn)[0] > 1.5 * best  # measured: 3.23 x
    accuracy = lambda c: (c.predict(vx.numpy()) == vy.numpy()).mean()  # noqa: E731
    assert accuracy(clf) > accuracy(old)  # measured: 0.964 against 0.834


def test_main_linear_lowshot_augment(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", per_class=(4, 2))
    ckpt = str(tmp_path / "e.pth")
    make_checkpoint(ckpt, depth=2)
    res = probe.main(cpu_settings(probe.Settings, ckpt=ckpt, data=data, epochs=3, lrs="0.01,0.1", search="lr",
                                  save_features=str(tmp_path / "f.pt")))["results"]
    assert [r["lr"] for r in res] == [0.01, 0.1] and sum(r["best"] for r in res) == 1
    assert {r["mode"] for r in res} == {"features-once"}
    feats = str(tmp_path / "f.pt")
    again = probe.main(cpu_settings(probe.Settings, load_features=feats, epochs=3, lrs="0.01,0.1", search="lr"))
    assert again["results"] == res
    low = probe.main(cpu_settings(probe.Settings, load_features=feats, shots="1,2", splits=2))["results"]
    assert [(r["shots"], r["split"]) for r in low] == [(1, 0), (1, 1), (2, 0), (2, 1), (1, "mean"),
                                                       (2, "mean")]
    assert low[4]["top1"] == pytest.approx((low[0]["top1"] + low[1]["top1"]) / 2)
    aug = probe.main(cpu_settings(probe.Settings, ckpt=ckpt, data=data, epochs=2, lrs="0.1", augment=True))
    assert [(r["block"], r["feature"], r["mode"]) for r in aug["results"]] == [
        ("norm", "cls", "augment"), ("norm", "cls+mean", "augment"), ("1+2", "cls", "augment"),
        ("1+2", "cls+mean", "augment")]
    # a feature file of CLS tokens alone (knn.py's, as demo.py shares it): the part of the grid it allows, the
    # last-block set from the raw top block, which a warning says
    every = str(tmp_path / "all.pt")
    probe.main(cpu_settings(probe.Settings, ckpt=ckpt, data=data, blocks="all", search="lr", lrs="0.1", epochs=1,
                            save_features=every))
    capsys.readouterr()
    part = probe.main(cpu_settings(probe.Settings, load_features=every, epochs=2, lrs="0.01,0.1"))["results"]
    assert [(r["block"], r["feature"]) for r in part[::2]] == [(2, "cls"), ("1+2", "cls")]
    assert "warning: " + every + " holds no 'norm' of block 2" in capsys.readouterr().err
    with pytest.raises(UserError, match="--augment"):
        probe.main(cpu_settings(probe.Settings, load_features=feats, augment=True))
    with pytest.raises(UserError, match="--search lr"):
        probe.main(cpu_settings(probe.Settings, load_features=feats, concat=True))


def test_grid_feature_sets():
    """The grid's feature sets from 'cls+mean' features (N, 2D) (CLS first), without copying the train set.

    It reads the top block after the final norm ('norm') and the raw top 4 concatenated, each as CLS and as CLS + mean
    patch token; without 'norm' (a knn.py file), the raw top block."""
    f = {b: torch.randn(5, 6) for b in (1, 2, 3, 4, 5, "norm")}  # D = 3
    sets = probe.feature_sets(f, "cls+mean", grid=True)
    assert list(sets) == [("norm", "cls"), ("norm", "cls+mean"), ("2+3+4+5", "cls"), ("2+3+4+5", "cls+mean")]
    assert [s.dim for s in sets.values()] == [3, 6, 12, 24]
    torch.testing.assert_close(sets["2+3+4+5", "cls"][1:3], torch.cat([f[b][1:3, :3] for b in (2, 3, 4, 5)], 1))
    torch.testing.assert_close(sets["norm", "cls+mean"][torch.tensor([4, 0])], f["norm"][[4, 0]])
    torch.testing.assert_close(sets["norm", "cls"][:], f["norm"][:, :3])
    del f["norm"]
    assert list(probe.feature_sets(f, "cls+mean", grid=True))[:2] == [(5, "cls"), (5, "cls+mean")]
    assert list(probe.feature_sets(f, "cls", grid=False)) == [(b, "cls") for b in (1, 2, 3, 4, 5)]
    assert list(probe.feature_sets({"given": f[5]}, "cls", grid=True)) == [("given", "cls")]  # a bare file


def test_default_search_is_mim_refiners_52_probes(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", per_class=(4, 2))
    ckpt, feats, out = str(tmp_path / "e.pth"), str(tmp_path / "f.pt"), str(tmp_path / "r.json")
    vit = make_checkpoint(ckpt, depth=5)
    with torch.no_grad():  # a final norm that is not the identity's affine part
        vit.norm.weight.uniform_(0.5, 1.5), vit.norm.bias.normal_()
    torch.save({"model": model.export_encoder(vit)}, ckpt)
    res = probe.main(cpu_settings(probe.Settings, ckpt=ckpt, data=data, epochs=1, save_features=feats, out=out))
    recs = res["results"]
    assert len(recs) == 52 and [r["lr"] for r in recs[:13]] == [float(v) for v in probe.LR_GRID.split(",")]
    assert [(r["block"], r["feature"]) for r in recs[::13]] == [
        ("norm", "cls"), ("norm", "cls+mean"), ("2+3+4+5", "cls"), ("2+3+4+5", "cls+mean")]
    best = [r for r in recs if r["best"]]
    assert len(best) == 1 and best[0]["top1"] == max(r["top1"] for r in recs)
    assert json.load(open(out))["results"] == recs and {r["mode"] for r in recs} == {"features-once"}
    text = capsys.readouterr().out
    assert "52 probes" in text and "features-once" in text and f"best: block {best[0]['block']}" in text
    # what was extracted: the raw outputs of blocks 2-5 and 'norm', block 5 after the final norm (MIM-Refiner's
    # last-block features), each the CLS token then the mean of the patch tokens; the LayerNorm written out here
    saved = torch.load(feats)["val_features"]
    x = torch.stack([img for img, _ in build_dataset(data, "val", eval_transform(32))])
    with torch.no_grad():
        raw = dict(zip((2, 5), vit.forward_blocks(x, [2, 5])))  # (6, 1 + 64, 32)
    centred = raw[5] - raw[5].mean(-1, keepdim=True)
    normed = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * vit.norm.weight + vit.norm.bias
    assert list(saved) == [2, 3, 4, 5, "norm"] and saved["norm"].shape == (6, 64)
    for b, tokens in ((2, raw[2]), (5, raw[5]), ("norm", normed)):
        torch.testing.assert_close(saved[b], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(saved["norm"], saved[5], atol=0.1)  # the norm changed them
    # the grid from that file reads the same sets; from --blocks 4 of it, the raw 2-4 and no 'norm' (that of block 5)
    again = probe.main(cpu_settings(probe.Settings, load_features=feats, epochs=1))["results"]
    assert [(r["block"], r["feature"], r["top1"]) for r in again] == [(r["block"], r["feature"], r["top1"])
                                                                      for r in recs]
    lower = probe.main(cpu_settings(probe.Settings, load_features=feats, epochs=1, lrs="0.1", blocks="4"))["results"]
    assert [(r["block"], r["feature"]) for r in lower] == [(4, "cls"), (4, "cls+mean"), ("2+3+4", "cls"),
                                                          ("2+3+4", "cls+mean")]


def test_best_epoch_is_the_max_of_every_epochs_evaluation(tmp_path, capsys):
    """Every probe is evaluated after each epoch, against the same probes stepped here an epoch at a time.

    `top1` is the last epoch's, `top1_best_epoch` the best epoch's (MIM-Refiner's number), `best_epoch` which."""
    x, y = blobs(120, dim=8, classes=4, spread=2.5)
    vx, vy = blobs(60, dim=8, classes=4, spread=2.5, noise_seed=1)
    path, lrs, epochs = str(tmp_path / "f.pt"), [0.001, 0.05, 2.0], 6
    torch.save({"train_features": x, "train_labels": y, "val_features": vx, "val_labels": vy, "feature": "cls",
                "blocks": [3]}, path)
    res = probe.main(cpu_settings(probe.Settings, load_features=path, search="lr", lrs="0.001,0.05,2.0",
                                  epochs=epochs, probe_batch_size=32))["results"]
    trainer, per_epoch = probe.GridTrainer(8, 4, lrs, 32, epochs, 120, 0.1 * epochs, seed=0, device="cpu"), []
    for _ in range(epochs):
        trainer.train_epoch(x, y)
        per_epoch.append(trainer.accuracy(vx, vy))
    for g, r in enumerate(res):
        accs = [a[g] for a in per_epoch]
        assert r["top1"] == accs[-1] and r["top1_best_epoch"] == max(accs) >= r["top1"]
        assert r["best_epoch"] == accs.index(max(accs)) + 1
    assert any(r["top1_best_epoch"] > r["top1"] for r in res)  # overlapping classes: some probe peaks earlier
    w = max(res, key=lambda r: r["top1_best_epoch"])
    assert (f"best of all epochs: block 3, cls, lr {w['lr']:g}: top-1 {w['top1_best_epoch']:.4f} after epoch "
            f"{w['best_epoch']} of {epochs}") in capsys.readouterr().out
