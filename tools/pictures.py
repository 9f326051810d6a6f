"""The demo's three pictures, drawn from its summary and feature files (matplotlib, which only they need).

    knn_per_block.png  the per-block k-NN of every encoder (mean over seeds), pixel baselines as lines
    neighbours.png     8 val images and their 5 nearest training images under each encoder
    tsne.png           a t-SNE map of each encoder's val features, coloured by class
"""
import statistics

import torch

import knn
from util.data import build_dataset, read_feature_file


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(summary: dict, path: str, k: int):
    """k-NN top-1 against the block, one line per encoder (mean over seeds); baselines without blocks as lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    encoders = summary["encoders"]
    depth = max((int(b) for s in encoders.values() for b in s.get("knn_per_block", {})), default=1)
    for name, s in encoders.items():
        if "knn_per_block" not in s:  # pixels: one feature, no blocks
            ax.axhline(100 * statistics.mean(s["knn_top1"]), color="grey", linestyle="--", linewidth=1)
            ax.text(depth, 100 * statistics.mean(s["knn_top1"]) + 1, name, fontsize=7, ha="right", color="grey")
            continue
        curve = {int(b): 100 * statistics.mean(v) for b, v in s["knn_per_block"].items()}
        ax.plot(list(curve), list(curve.values()), marker="o", label=name, markersize=4,
                linestyle=":" if name.startswith("random") or "own view" in name else "-")
    # the full 0-100 scale: differences of a point or two on 2000 images are noise, and look it
    ax.set(xlabel="block", ylabel=f"{k}-NN top-1 (%)", ylim=(0, 100),
           title=f"k-NN accuracy per block ({summary['split']})")
    ax.set_xticks(range(1, depth + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def last_block(path: str):
    """A feature file's standardised last-block features as in knn.py: train (N, D), val (M, D), labels."""
    f = read_feature_file(path, ("train", "val"))
    b = list(f["train_features"])[-1]
    train, val = knn.standardize(f["train_features"][b], f["val_features"][b])
    return train, val, f["train_labels"], f["val_labels"]


def neighbour_grid(data: str, feats: dict, path: str, queries: int = 8, shown: int = 5):
    """Nearest train images of `queries` val images (one per class, the first of each), per encoder.

    Their `shown` nearest train images under each encoder's last block (cosine of standardised features, as the k-NN);
    a neighbour of the query's class is framed green, another red. feats: {name: last_block(...)}."""
    plt = pyplot()
    train_ds, val_ds = build_dataset(data, "train"), build_dataset(data, "val")
    labels = torch.tensor(val_ds.targets)
    picks = [int((labels == c).nonzero()[0]) for c in labels.unique()[:queries]]
    cols = 1 + len(feats) * (shown + 1)
    fig, axes = plt.subplots(len(picks), cols, figsize=(cols * 0.55, len(picks) * 0.62), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for j, (name, (train, val, ytr, _)) in enumerate(feats.items()):
        near = (torch.nn.functional.normalize(val[picks], dim=1)
                @ torch.nn.functional.normalize(train, dim=1).T).topk(shown, dim=1).indices  # (Q, shown)
        axes[0, 1 + j * (shown + 1) + shown // 2].set_title(name, fontsize=9)
        for r, q in enumerate(picks):
            for c, t in enumerate(near[r].tolist()):
                ax = axes[r, 2 + j * (shown + 1) + c]
                ax.imshow(train_ds[t][0])
                ax.set_axis_on()
                ax.set(xticks=[], yticks=[])
                for side in ax.spines.values():
                    side.set(color="tab:green" if ytr[t] == labels[q] else "tab:red", linewidth=2)
    for r, q in enumerate(picks):
        axes[r, 0].imshow(val_ds[q][0])
    axes[0, 0].set_title("query", fontsize=9)
    fig.suptitle("5 nearest training images of each query (green: same digit)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def feature_map(feats: dict, path: str, n: int = 1000):
    """t-SNE (scikit-learn, PCA start, seed 0) of the first n val images' last-block features of each encoder.

    Coloured by class: before refinement the classes overlap, after it they separate. feats: {name:
    last_block(...)}."""
    from sklearn.manifold import TSNE
    plt = pyplot()
    fig, axes = plt.subplots(1, len(feats), figsize=(3.3 * len(feats), 3.4), squeeze=False)
    for ax, (name, (_, val, _, y)) in zip(axes[0], feats.items()):
        x = val[:n].numpy()
        xy = TSNE(2, init="pca", random_state=0, perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)  # (n, 2)
        ax.scatter(xy[:, 0], xy[:, 1], c=y[:n].numpy(), cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle("t-SNE of the val features, coloured by digit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
