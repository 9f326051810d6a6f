"""cluster.py against independent references, and the script end to end.

Hungarian accuracy against brute force, metrics against scikit-learn, torch k-means against scikit-learn's inertia,
chunking, and the script on an ImageFolder with --subset dogs15."""
import itertools

import numpy as np
import pytest
import torch
from conftest import cpu_settings, make_checkpoint, make_image_folder
from sklearn import metrics

import cluster
from model import UserError


def brute_force_accuracy(y_true, y_pred):
    """Best accuracy over every one-to-one pairing of classes with clusters."""
    classes, clusters = np.unique(y_true), np.unique(y_pred)
    best = 0
    if len(classes) <= len(clusters):  # every class gets a distinct cluster
        pairings = (zip(classes, ks) for ks in itertools.permutations(clusters, len(classes)))
    else:  # every cluster gets a distinct class
        pairings = (zip(cs, clusters) for cs in itertools.permutations(classes, len(clusters)))
    for pairs in pairings:
        best = max(best, sum(np.sum((y_true == c) & (y_pred == k)) for c, k in pairs))
    return best / len(y_true)


@pytest.mark.parametrize("n_classes,n_clusters", [(4, 4), (3, 5), (5, 3)])
def test_cluster_accuracy_matches_brute_force(n_classes, n_clusters):
    rng = np.random.default_rng(n_classes * 10 + n_clusters)
    for _ in range(5):
        y_true, y_pred = rng.integers(0, n_classes, 40), rng.integers(0, n_clusters, 40)
        assert cluster.cluster_accuracy(y_true, y_pred) == pytest.approx(brute_force_accuracy(y_true, y_pred))


def test_metrics_known_answers_and_sklearn():
    y = np.repeat(np.arange(4), 5)
    perfect = cluster.cluster_metrics(y, (y + 2) % 4 * 7)  # relabelled clusters: still perfect
    assert all(perfect[m] == pytest.approx(1.0) for m in ("acc", "nmi", "ami", "ari"))
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, 20)
    m = cluster.cluster_metrics(y, pred)
    nmi = metrics.normalized_mutual_info_score(y, pred, average_method="arithmetic")
    assert m["nmi"] == pytest.approx(nmi)
    assert m["ami"] == pytest.approx(metrics.adjusted_mutual_info_score(y, pred))
    assert m["ari"] == pytest.approx(metrics.adjusted_rand_score(y, pred))


def test_kmeans_reaches_sklearn_inertia_on_blobs():
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs
    x, _ = make_blobs(600, n_features=8, centers=6, cluster_std=2.0, random_state=0)
    x = x.astype(np.float32)
    ref = KMeans(6, n_init=5, random_state=0).fit(x).inertia_
    ours = min(cluster.kmeans(torch.from_numpy(x), 6, iters=300, seed=s)[2] for s in range(5))
    assert ours <= ref * 1.01  # the best of 5 seeds each; 1%: another start may end in another local optimum
    a, c, inertia = cluster.kmeans(torch.from_numpy(x), 6, iters=300, seed=0)
    d = torch.cdist(torch.from_numpy(x).double(), c.double()) ** 2  # (n, k), independent of ours
    assert torch.equal(a, d.argmin(1))  # assignments of the returned centroids
    assert inertia == pytest.approx(d.min(1).values.sum().item(), rel=1e-4)
    members = torch.from_numpy(x)[a == 0].mean(0)  # converged: each centroid is its members' mean
    torch.testing.assert_close(c[0], members, atol=1e-4, rtol=1e-4)


def test_kmeans_chunking_seed_and_init():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(97, 5, generator=g)
    a1, c1, i1 = cluster.kmeans(x, 7, iters=20, seed=3)
    a2, c2, i2 = cluster.kmeans(x, 7, iters=20, seed=3, chunk=10)
    assert torch.equal(a1, a2) and torch.allclose(c1, c2, atol=1e-6) and i1 == pytest.approx(i2, rel=1e-5)
    assert torch.equal(cluster.kmeans(x, 7, iters=20, seed=3)[0], a1)  # the seed fixes the result
    assert cluster.kmeans(x, 7, iters=20, seed=3, init="random")[0].max() <= 6
    dup = torch.ones(10, 3)  # all points equal: k-means++ must not divide by zero
    assert cluster.kmeans(dup, 2, iters=5)[2] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(UserError):
        cluster.kmeans(x, 0)


def test_main_imagefolder_subset_and_feature_file(tmp_path):
    names = cluster.DOGS15 + ["n01440764"]  # the 15 dog classes and one other
    data = make_image_folder(tmp_path / "d", classes=names, per_class=(1, 2))
    ckpt = str(tmp_path / "e.pth")
    make_checkpoint(ckpt, depth=2)
    feats = str(tmp_path / "f.pt")
    res = cluster.main(cpu_settings(cluster.Settings, ckpt=ckpt, data=data, seeds=2, iters=10,
                                    subset="dogs15", save_features=feats))["results"]
    assert len(res) == 1 and res[0]["k"] == 15 and res[0]["block"] == 2
    assert 0 <= res[0]["acc"] <= res[0]["acc_best"] <= 1 and res[0]["acc_std"] >= 0
    assert torch.load(feats)["val_features"].shape == (30, 32)  # the other class was never embedded
    again = cluster.main(cpu_settings(cluster.Settings, load_features=feats, seeds=2, iters=10, subset="dogs15"))
    assert again["results"] == res
    full = cluster.main(cpu_settings(cluster.Settings, ckpt=ckpt, data=data, seeds=1, iters=10, k=3))["results"]
    assert full[0]["k"] == 3
    small = make_image_folder(tmp_path / "s", classes=names[:3], per_class=(1, 1))
    with pytest.raises(UserError, match="lacks the classes"):
        cluster.main(cpu_settings(cluster.Settings, ckpt=ckpt, data=small, subset="dogs15"))
