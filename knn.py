"""Weighted k-NN classification of frozen ViT features, per block (docs/METHOD.md §11).

The k-NN protocol of DINO (Caron et al. 2021), used by MAE-CT (Lehner et al. 2023) and
MIM-Refiner (Alkin et al. 2024): every validation image is classified by the cosine top-k of the
L2-normalised train features, each neighbour voting for its class with weight exp(sim / 0.07).
MIM-Refiner and MAE-CT first standardise every feature dimension with the train mean and std
(`--standardize`, the default; MAE-CT on the final-normed CLS, `--feature cls-norm`); DINO does
not (`--no-standardize`). Both papers report k = 10. `--blocks all`
gives the per-block curve, the core evidence of MIM-Refiner (`--plot curve.png` draws it).

CPU, the embedded data set, every block (about 1 minute on 2 cores; an encoder of random weights
scores about 10%, chance: the photo backgrounds dominate the pixels):
    python knn.py --ckpt checkpoints/mae_tiny_digits.pth --data jittered-digits --blocks all
Several GPUs (each extracts a shard; the vote runs on rank 0), ImageNet, ViT-L/16:
    torchrun --nproc_per_node=8 knn.py --ckpt mae_large.pth --data /imagenet --blocks 12-24
    # MIM-Refiner reports 60.6% (MAE ViT-L/16, last block) -> 81.5% after refinement
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import UserError
from util.common import cli, opt, parse_ints, setup_distributed
from util.features import FeatureSettings, get_features, report


@dataclass
class Settings(FeatureSettings):
    k: str = opt("10,20", "neighbour counts, comma-separated")
    temperature: float = opt(0.07, "vote weight exp(similarity / temperature)")
    standardize: bool = opt(True, "standardise each dimension with the train mean/std first "
                                  "(MIM-Refiner, MAE-CT); --no-standardize for DINO")
    plot: str = opt("", "draw top-1 per block into this image file (needs matplotlib)")


def standardize(train: torch.Tensor, test: torch.Tensor, eps: float = 1e-6):
    """Eq. (15) of docs/METHOD.md: MIM-Refiner's and MAE-CT's k-NN pre-processing.

    Each dimension shifted and scaled by the train mean and (unbiased) std, the same statistics applied to the test
    features."""
    mean, std = train.mean(0), train.std(0)  # (D,), (D,)
    return (train - mean) / (std + eps), (test - mean) / (std + eps)


def knn_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
             temperature: float) -> torch.Tensor:
    """Eq. (17) of docs/METHOD.md: the weighted vote of DINO's k-NN.

    score(c) = sum over the k neighbours of class c of exp(sim / temperature). sims, neighbour_labels (M, k) -> class
    scores (M, C)."""
    # BEGIN PROMPT
    # exp(sim / T) for each neighbour, summed per class (scatter_add_ into (M, C) zeros)
    # END PROMPT
    # BEGIN SOLUTION task=10
    weights = (sims / temperature).exp()  # (M, k)
    scores = sims.new_zeros(len(sims), num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)  # (M, C)
    # END SOLUTION


def knn_predict(train_feats, train_labels, test_feats, k, temperature=0.07, num_classes=None,
                chunk=None, normalize=True):
    """Eq. (16) of docs/METHOD.md: weighted k-NN predictions of test_feats (M, D).

    The neighbours: train_feats (N, D) with train_labels (N,). Cosine similarity (rows L2-normalised here unless
    normalize=False), the top-k neighbours vote with weight exp(sim / temperature), the highest class score wins. `k`
    is an int -> predictions (M,) int64; or a list -> {k: (M,)} from one search with the largest k. The similarities
    are computed for `chunk` test rows at a time (default: as many as fit in a 16 MB tile on CPU, 1 GB on GPU) so the
    (M, N) matrix never exists: one test image against millions of train images works as well as 50k x 1.28M on one
    GPU. Runs on train_feats' device; the loop has no host synchronisation."""
    ks = [k] if isinstance(k, int) else sorted(set(k))
    n, m = len(train_feats), len(test_feats)
    if min(ks) < 1 or max(ks) > n:
        raise UserError(f"--k {ks}: every k must be between 1 and the {n} train images")
    device = train_feats.device
    num_classes = num_classes or int(train_labels.max()) + 1
    train, test = train_feats, test_feats.to(device, train_feats.dtype)
    if normalize:
        train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    labels = train_labels.to(device)
    # test rows per chunk: a (rows, N) similarity tile of ~16 MB on CPU (measured 25-30% faster
    # than 64 MB: the top-k pass stays in cache), ~1 GB on GPU (fewer passes over the train set)
    rows = chunk or max(1, (1 << (28 if device.type == "cuda" else 22)) // n)
    preds = {kk: torch.empty(m, dtype=torch.long, device=device) for kk in ks}
    # one tile reused by every chunk: a fresh 16 MB result per chunk costs its page faults, which
    # on CPU measured ~40% of the matmul time
    tile = torch.empty(min(rows, m), n, dtype=train.dtype, device=device)
    for start in range(0, m, rows):
        queries = test[start:start + rows]  # (r, D)
        sims = torch.mm(queries, train.T, out=tile[:len(queries)])  # (r, N) cosine similarities
        top_sims, top_idx = sims.topk(max(ks), dim=1)  # (r, kmax), sorted by similarity
        top_labels = labels[top_idx]  # (r, kmax)
        for kk in ks:  # the first kk of the sorted kmax are the kk nearest
            scores = knn_vote(top_sims[:, :kk], top_labels[:, :kk], num_classes, temperature)
            preds[kk][start:start + rows] = scores.argmax(1)
    return preds[ks[0]] if isinstance(k, int) else preds


def plot_curve(records: list, path: str):
    """Top-1 against block number, one line per k: where the MIM representation peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in sorted({r["k"] for r in records}):
        pts = [(r["block"], 100 * r["top1"]) for r in records if r["k"] == k]
        ax.plot([str(b) for b, _ in pts], [v for _, v in pts], marker="o", label=f"k = {k}")
    ax.set(xlabel="block", ylabel="k-NN top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(cfg: Settings) -> dict:
    ks = parse_ints(cfg.k, "--k")
    if cfg.plot:  # fail before the long extraction, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    d = setup_distributed(cfg.device)
    feats = get_features(cfg, d)
    records = []
    if not d.main:  # the other ranks helped with the extraction; rank 0 votes
        return {"results": records}
    y_train, y_val = feats["train_labels"], feats["val_labels"]
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    for b in feats["blocks"]:
        train = feats["train_features"][b].to(d.device)
        val = feats["val_features"][b].to(d.device)
        if cfg.standardize:
            train, val = standardize(train, val)
        preds = knn_predict(train, y_train, val, ks, cfg.temperature, num_classes)
        for k in ks:
            top1 = (preds[k].cpu() == y_val).float().mean().item()
            records.append(dict(block=b, feature=cfg.feature, standardize=cfg.standardize, k=k,
                                top1=top1))
    result = report(cfg, d, records, f"weighted k-NN top-1 ({len(y_train)} train, {len(y_val)} val)")
    if cfg.plot:
        plot_curve(records, cfg.plot)
    return result


if __name__ == "__main__":
    cli(main, Settings)
