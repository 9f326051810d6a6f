"""Pilot numbers of BENCHMARKS.md: k-NN and a quick linear probe of every block of an encoder.

On the embedded data set, in about a minute on one core (the demo's protocols take several).

`--share`: also the share of each training image's 5 nearest neighbours (cosine, raw features) in
a random queue of 4,096 other training images that show its digit, per block: how often the swap's
positive would be the same digit if the queue held these features (the refinement's holds its head's).

k-NN: knn.py's vote (20 neighbours, standardised features, cosine, exp(sim / 0.07)). Probe: a
full-batch logistic regression on the standardised features (200 Adam steps, lr 1e-2, L2 1e-4),
cheaper than probe.py's grid and a few points below it. 5,000 train and 2,000 val images.
Several checkpoints (e.g. one refinement per seed): a line each, then their mean ± SD per block.
    python tools/pilot_eval.py checkpoints/mae_tiny_digits.pth [--train 5000] [--feature mean] [--share]
    python tools/pilot_eval.py runs/peak/maect-s{0,1,2}/encoder.pth
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402
import knn  # noqa: E402
from model import load_encoder  # noqa: E402
from util.data import eval_transform  # noqa: E402
from util.digits import JitteredDigits  # noqa: E402
from util.features import extract_features  # noqa: E402


def quick_probe(x, y, val_x, val_y, steps=200):
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-4 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((val_x @ w + b).argmax(1) == val_y).float().mean())


def neighbour_share(x, y, queue: int = 4096, k: int = 5, seed: int = 0) -> float:
    """Mean share of each row's k most cosine-similar queue rows (a random draw of the others) with its label."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:queue]  # (Q,)
    x = torch.nn.functional.normalize(x, dim=1)
    sim = x @ x[idx].T  # (N, Q)
    sim[idx, torch.arange(len(idx))] = -2.0  # a row is never its own neighbour
    top = sim.topk(k, dim=1).indices  # (N, k), positions in the queue
    return float((y[idx][top] == y[:, None]).float().mean())


def summary(scores: list[dict[int, tuple[float, float]]]) -> str:
    """Per block, k-NN / probe over several encoders' scores ({block: (k-NN, probe)} each)."""
    return "  ".join(f"b{blk}: {demo.cell([s[blk][0] for s in scores])} / {demo.cell([s[blk][1] for s in scores])}"
                     for blk in scores[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="+", help="one or more encoders of the same depth")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--feature", default="mean")
    p.add_argument("--split", default="select", help="val glyphs to score on: select (pilots) or report")
    p.add_argument("--share", action="store_true", help="also the same-digit share of queue neighbours")
    a = p.parse_args()
    vits = [load_encoder(path) for path in a.ckpt]
    if len({vit.depth for vit in vits}) > 1:
        sys.exit("pilot_eval.py: the encoders differ in depth; give encoders of one architecture")
    scores = []
    for path, vit in zip(a.ckpt, vits):
        tf = eval_transform(vit.img_size)
        blocks = list(range(1, vit.depth + 1))
        with torch.no_grad():
            ftr, ytr = extract_features(vit, JitteredDigits("train", n=a.train, transform=tf), blocks, a.feature)
            fva, yva = extract_features(vit, JitteredDigits(a.split, transform=tf), blocks, a.feature)
        ytr, yva = ytr.clone(), yva.clone()  # out of inference mode
        score = {}
        for blk in blocks:
            x, v = knn.standardize(ftr[blk].clone(), fva[blk].clone())
            acc = float((knn.knn_predict(x, ytr, v, 20) == yva).float().mean())
            score[blk] = (acc, quick_probe(x, ytr, v, yva))
        scores.append(score)
        print(f"{path} ({a.feature}; k-NN / probe): {summary([score])}")
        if a.share:
            print("same-digit share of the 5 nearest in a 4,096-image queue: " + "  ".join(
                f"b{blk}: {100 * neighbour_share(ftr[blk].clone(), ytr):.1f}" for blk in blocks))
    if len(scores) > 1:
        print(f"mean ± SD over {len(scores)} ({a.feature}; k-NN / probe): {summary(scores)}")


if __name__ == "__main__":
    main()
