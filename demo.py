"""The whole story on the embedded data set, on a CPU, in minutes: `make demo`.

The committed MAE (checkpoints/mae_tiny_digits.pth, made by pretrain.py) is refined twice, with
MIM-Refiner (Alkin et al. 2024) and with MAE-CT (Lehner et al. 2023); all three encoders are then
evaluated with the same protocols (docs/METHOD.md §11) on the mean of the patch tokens: weighted
k-NN on every block, linear probe, 1/2/5-shot logistic regression, k-means clustering. Each
encoder's features are extracted once (knn.py --save-features) and the other stages read them
(--load-features). The stages run as separate processes (`--jobs` at a time, `--threads` torch
threads each: on a 2-core machine two one-thread processes beat one two-thread process for models
this small); this file orchestrates them and aggregates their --out JSON files into:
    OUT/summary.json      {"mae": {...}, "mim-refiner": {...}, "mae-ct": {...}}, fractions in [0, 1]
    OUT/knn_per_block.png the per-block k-NN curve of every encoder
    OUT/neighbours.png    8 val images and their 5 nearest training images under each encoder
    OUT/tsne.png          a t-SNE map of the val features of each encoder, coloured by digit
    OUT/<encoder>/        every stage's JSON, log and feature file
--control adds a randomly initialised encoder of the MAE's shape ("random") and both refinements of
it with the same budget ("random+mim-refiner", "random+mae-ct"): what the MIM pre-training brings.

CPU, the embedded default (about 11 minutes on 2 cores; the numbers are in the README):
    python demo.py
Reduced size (under a minute; what tests/test_demo.py runs on a tiny encoder and image folder):
    python demo.py --quick --ckpt tiny.pth --data folder --out runs/demo-quick
"""
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import knn
from model import UserError, ViT, export_encoder, load_encoder
from util import common
from util.common import opt
from util.data import build_dataset
from util.features import read_feature_file

ENCODERS = ("mae", "mim-refiner", "mae-ct")
CONTROLS = ("random", "random+mim-refiner", "random+mae-ct")  # --control
SLOTS = [threading.BoundedSemaphore(2)]  # stage processes that may run at once (--jobs); FIFO
FAILED = threading.Event()  # a stage failed: start no other
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Settings:
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "the MAE encoder to refine and evaluate")
    data: str = opt("jittered-digits", "jittered-digits or an ImageFolder root with train/ and val/")
    out: str = opt("runs/demo", "output folder: summary.json, the pictures, one folder per encoder")
    feature: str = opt("mean", "what the heads and the evaluations read: mean (of the patch tokens) or cls")
    mim_refiner_args: str = opt("", "extra refine.py flags for MIM-Refiner, e.g. '--epochs 3'")
    mae_ct_args: str = opt("", "extra refine.py flags for MAE-CT")
    control: bool = opt(False, "also refine a randomly initialised encoder both ways with the same budget "
                               "(what the MIM pre-training contributes)")
    k: int = opt(20, "the k of the k-NN numbers in the summary and the plot (knn.py runs 10 and 20)")
    shots: str = opt("1,2,5", "low-shot: labelled images per class")
    jobs: int = opt(2, "stage processes at once (one per core suits small models)")
    threads: int = opt(1, "torch / OpenMP threads per stage process")
    plot: bool = opt(True, "draw the pictures (needs matplotlib); --no-plot skips them")
    quick: bool = opt(False, "reduced size for smoke tests: a few refine steps on a few images, "
                             "short probes, one k-means seed, one low-shot draw")


def stage_flags(cfg: Settings) -> dict:
    """Flags of each stage. --quick shrinks the work, not the protocol."""
    if not cfg.quick:
        return dict(refine=[], probe=[], shots=[], cluster=[])
    return dict(refine=["--limit-train", "16", "--batch-size", "8", "--queue-size", "8", "--topk", "2",
                        "--head-epochs", "1", "--epochs", "1",
                        "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16"],
                probe=["--epochs", "2"], shots=["--splits", "1"], cluster=["--seeds", "1", "--iters", "20"])


def run(cmd: list, log: str, cfg: Settings):
    """One stage script as a child process; its output goes to `log`. A failure stops the demo
    with the stage's last lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    with SLOTS[0], open(log, "w") as f:
        if FAILED.is_set():
            raise UserError("another stage failed")
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, *cmd], cwd=HERE, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        FAILED.set()
        with open(log) as f:
            tail = f.read().replace("\r", "\n").strip().splitlines()[-3:]
        raise UserError(f"{' '.join(cmd[:1] + cmd[-2:])} failed (exit {code}): {' | '.join(tail)}; "
                        f"the whole output is in {log}")
    print(f"  {time.perf_counter() - t0:6.0f} s  {' '.join(cmd[:3])}  -> {log}", flush=True)


def chain(name: str, cfg: Settings, flags: dict) -> str:
    """Refine (unless a starting point), extract the features once, then k-NN, probe, low-shot,
    clustering. Names: mae, mim-refiner, mae-ct; with --control also random (a randomly
    initialised encoder of the MAE's shape) and random+mim-refiner, random+mae-ct."""
    d = os.path.join(cfg.out, name)
    os.makedirs(d, exist_ok=True)
    start, method = name.split("+") if "+" in name else ("random" if name == "random" else "mae", name)
    ckpt = os.path.abspath(cfg.ckpt) if start == "mae" else os.path.join(cfg.out, "random", "encoder.pth")
    if method in ("mim-refiner", "mae-ct"):
        extra = shlex.split(cfg.mim_refiner_args if method == "mim-refiner" else cfg.mae_ct_args)
        quick = flags["refine"] + (["--local-crops", "1"] if cfg.quick and method == "mim-refiner" else [])
        run(["refine.py", "--method", method, "--ckpt", ckpt, "--data", cfg.data, "--out", d,
             "--feature", cfg.feature, "--device", "cpu", *quick, *extra], os.path.join(d, "refine.log"), cfg)
        ckpt = os.path.join(d, "encoder.pth")
    feats, common_flags = os.path.join(d, "features.pt"), ["--device", "cpu", "--workers", "0"]
    if os.path.exists(feats):  # a rerun into the same --out must not read stale features
        os.remove(feats)
    run(["knn.py", "--ckpt", ckpt, "--data", cfg.data, "--blocks", "all", "--feature", cfg.feature,
         "--k", ",".join(map(str, sorted({10, 20, cfg.k}))),
         "--save-features", feats, *common_flags, "--out", os.path.join(d, "knn.json")],
        os.path.join(d, "knn.log"), cfg)
    stages = (("probe", ["probe.py", *flags["probe"]]),
              ("shots", ["probe.py", "--shots", cfg.shots, *flags["shots"]]),
              ("cluster", ["cluster.py", *flags["cluster"]]))
    with ThreadPoolExecutor(len(stages)) as pool:  # independent: they wait for free slots together
        list(pool.map(lambda st: run([*st[1], "--load-features", feats, "--feature", cfg.feature,
                                      "--blocks", "last", *common_flags,
                                      "--out", os.path.join(d, f"{st[0]}.json")],
                                     os.path.join(d, f"{st[0]}.log"), cfg), stages))
    return name


def random_encoder(cfg: Settings):
    """The control's starting point: the MAE's architecture with fresh weights (seed 1)."""
    vit = load_encoder(cfg.ckpt)
    torch.manual_seed(1)
    fresh = ViT(**vit.arch())
    os.makedirs(os.path.join(cfg.out, "random"), exist_ok=True)
    common.save_atomic(export_encoder(fresh), os.path.join(cfg.out, "random", "encoder.pth"))


def read(path: str) -> list:
    with open(path) as f:
        return json.load(f)["results"]


def summarize(cfg: Settings, name: str) -> dict:
    """The numbers of one encoder (fractions in [0, 1]) and its per-block k-NN curve."""
    d = os.path.join(cfg.out, name)
    knn = [r for r in read(os.path.join(d, "knn.json")) if r["k"] == cfg.k]
    curve = {int(r["block"]): r["top1"] for r in knn}  # {block: top-1}
    best = max(curve, key=curve.get)
    probe = [r for r in read(os.path.join(d, "probe.json")) if r.get("best")]
    shots = {r["shots"]: r["top1"] for r in read(os.path.join(d, "shots.json"))
             if r["split"] == "mean" or (r["split"] == 0 and cfg.quick)}  # --quick: one draw
    cl = read(os.path.join(d, "cluster.json"))[0]
    out = dict(knn_top1=curve[max(curve)], knn_best_block_top1=curve[best], knn_best_block=best,
               probe_top1=probe[0]["top1"],
               **{f"shot{s}_top1": shots[s] for s in sorted(shots)},
               cluster_acc=cl["acc"], cluster_nmi=cl["nmi"], cluster_ari=cl["ari"],
               knn_per_block=curve)
    return out


def table(summary: dict) -> str:
    """Side by side, in percent (k-NN, probe, shots, ACC) or x100 (NMI, ARI)."""
    names = list(summary)
    keys = [k for k in summary["mae"] if k not in ("knn_per_block", "knn_best_block")]
    rows = [["", *names]] + [[k, *(f"{100 * summary[e][k]:.1f}" for e in names)] for k in keys]
    rows.append(["knn_best_block", *(str(summary[e]["knn_best_block"]) for e in names)])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, width)))
                     for r in rows)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(summary: dict, path: str, k: int):
    """k-NN top-1 against the block, one line per encoder: where each representation peaks."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, s in summary.items():
        curve = s["knn_per_block"]
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=name,
                linestyle=":" if name.startswith("random") else "-")
    # the full 0-100 scale: differences of a point or two on 2000 images are noise, and look it
    ax.set(xlabel="block", ylabel=f"{k}-NN top-1 (%)", ylim=(0, 100), title="k-NN accuracy per block (val)")
    ax.set_xticks(list(summary["mae"]["knn_per_block"]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def last_block(cfg: Settings, name: str):
    """An encoder's standardised last-block features as in knn.py: train (N, D), val (M, D), labels."""
    f = read_feature_file(os.path.join(cfg.out, name, "features.pt"), ("train", "val"))
    b = max(f["train_features"])
    train, val = knn.standardize(f["train_features"][b], f["val_features"][b])
    return train, val, f["train_labels"], f["val_labels"]


def neighbour_grid(cfg: Settings, feats: dict, path: str, queries: int = 8, shown: int = 5):
    """For `queries` val images (one per class, the first of each), their `shown` nearest train
    images under each encoder's last block (cosine of standardised features, as the k-NN);
    a neighbour of the query's class is framed green, another red. feats: {name: last_block(...)}."""
    plt = pyplot()
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
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
    """t-SNE (scikit-learn, PCA start, seed 0) of the first n val images' last-block features of
    each encoder, coloured by class: before refinement the classes overlap, after it they separate.
    feats: {name: last_block(...)}."""
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


def main(cfg: Settings) -> dict:
    if not os.path.isfile(cfg.ckpt):
        raise UserError(f"--ckpt {cfg.ckpt} does not exist; make demo-full pre-trains one, "
                        f"or give any encoder checkpoint load_encoder reads")
    if cfg.jobs < 1 or cfg.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    if cfg.plot:  # fail now, not after minutes of work
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("the pictures need matplotlib: pip install -r requirements-demo.txt "
                            "(or --no-plot)") from None
    os.makedirs(cfg.out, exist_ok=True)
    flags, t0 = stage_flags(cfg), time.perf_counter()
    names = list(ENCODERS) + (list(CONTROLS) if cfg.control else [])
    print(f"demo.py: {cfg.ckpt} on {cfg.data}; {cfg.jobs} processes x {cfg.threads} threads; "
          f"stage outputs in {cfg.out}/<encoder>/", flush=True)
    if cfg.control:
        random_encoder(cfg)
    # All chains start at once; a stage waits for one of the --jobs slots, the refinements (the
    # longest stages) first.
    SLOTS[0] = threading.BoundedSemaphore(cfg.jobs)
    FAILED.clear()
    order = sorted(names, key=lambda n: n in ("mae", "random"))
    with ThreadPoolExecutor(len(names)) as pool:
        jobs = [pool.submit(chain, n, cfg, flags) for n in order]
        try:
            for job in jobs:
                job.result()
        except BaseException:  # a stage failed: start nothing new, let the running stages end
            pool.shutdown(cancel_futures=True)
            raise
    summary = {name: summarize(cfg, name) for name in names}
    common.write_json(os.path.join(cfg.out, "summary.json"), summary)
    print(f"\n{cfg.k}-NN / probe / low-shot top-1 and k-means ACC, NMI, ARI (x100) on the val split:\n"
          f"{table(summary)}\n")
    if cfg.plot:
        plot(summary, os.path.join(cfg.out, "knn_per_block.png"), cfg.k)
        feats = {name: last_block(cfg, name) for name in ENCODERS}  # each feature file read once
        neighbour_grid(cfg, feats, os.path.join(cfg.out, "neighbours.png"))
        feature_map(feats, os.path.join(cfg.out, "tsne.png"))
    print(f"{time.perf_counter() - t0:.0f} s; wrote {cfg.out}/summary.json" +
          (" and knn_per_block.png, neighbours.png, tsne.png" if cfg.plot else ""))
    return summary


if __name__ == "__main__":
    common.cli(main, Settings)
