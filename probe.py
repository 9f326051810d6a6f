"""Linear probing of frozen ViT features, and low-shot classification (docs/METHOD.md §11).

Linear probe (MIM-Refiner, Alkin et al. 2024; MAE-CT, Lehner et al. 2023): non-affine BatchNorm1d, Linear (init
std 0.01), SGD momentum 0.9, no weight decay, batch 1024, 10% warm-up then cosine, 50 epochs, all probes trained
together as stacked layers in one pass over the data and evaluated after every epoch. `--search grid` (default) is
MIM-Refiner's search, 52 probes: 13 lrs (x batch/256) x {CLS, CLS and the mean patch token concatenated} x {the
top block of --blocks after the final norm, its last 4 blocks' raw outputs concatenated}; the table lists all 52,
the last epoch's winner marked, and the best of all epochs (MIM-Refiner's number). `--search lr`: the 13 lrs alone,
on each of --blocks (or --concat) with --feature. Mode `features-once` (default, fast): train features extracted
once, no augmentation; mode `augment` (`--augment`, both papers' protocol): RandomResizedCrop(0.08-1, bicubic) +
flip views re-embedded every epoch. MAE's recipe (He et al. 2022): `--search lr --augment --optimizer lars --lrs
0.1 --probe-batch-size 16384 --epochs 90 --warmup-epochs 10 --feature cls-norm` (50 epochs for ViT-L/H).
Low-shot (`--shots 1,2,5`, `--percent 1` or `--split-file F`, instead of the probe): logistic regression (C = 4000,
no intercept, solved to the optimum) on train rows each centred on its own mean and L2-normalised (cyanure's
preprocessing, as in the papers); `--splits` seeded draws, mean reported. The papers' 1% column is fine-tuning
(finetune.py); `--percent 1` here is the logistic-regression variant.

CPU, the embedded data set (about a minute each on 2 cores; random weights score about 10%):
    python probe.py --ckpt checkpoints/mae_tiny_digits.pth --data jittered-digits
    python probe.py --ckpt checkpoints/mae_tiny_digits.pth --shots 1,2,5
Several GPUs, ImageNet, ViT-L/16 (MIM-Refiner reports 77.5% -> 82.8% linear, 14.3% -> 57.8% 1-shot):
    torchrun --nproc_per_node=8 probe.py --ckpt refined/encoder.pth --data /imagenet --augment
    torchrun --nproc_per_node=8 probe.py --ckpt refined/encoder.pth --data /imagenet --shots 1,2,5
"""
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import UserError
from util.common import cli, opt, parse_blocks, setup_distributed, warmup_cosine
from util.data import build_dataset, train_transform
from util.features import Columns, FeatureSettings, extract_features, get_features, load_model, report, select_blocks
from util.lowshot import lowshot_draws

LR_GRID = "1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,0.01,0.02,0.05,0.1,0.2,0.3,0.5"  # MIM-Refiner's grid
MODES = {"augment": "RandomResizedCrop + flip views re-embedded every epoch, the papers' protocol",
         "features-once": "train features extracted once, no augmentation"}


@dataclass
class Settings(FeatureSettings):
    epochs: int = opt(50, "linear-probe epochs")
    probe_batch_size: int = opt(1024, "linear-probe batch size; the lr grid is scaled by it / 256")
    lrs: str = opt(LR_GRID, "linear-probe base learning rates, all trained together")
    warmup_epochs: Optional[float] = opt(None, "linear lr warm-up in epochs; default 10% of --epochs")
    optimizer: str = opt("sgd", "sgd (MIM-Refiner) or lars (MAE); momentum 0.9, no weight decay, either")
    augment: bool = opt(False, "re-embed the train images every epoch with RandomResizedCrop + flip (the "
                               "papers' mode, 'augment'); default: features extracted once ('features-once')")
    search: str = opt("grid", "grid: MIM-Refiner's search, the --lrs x {--feature, it + the mean patch token} x {top "
                              "block of --blocks after the final norm, its last 4 raw and concatenated} (52 probes); "
                              "lr: the --lrs alone on each of --blocks (or --concat) with --feature")
    shots: str = opt("", "low-shot: images per class, e.g. 1,2,5 (replaces the linear probe)")
    percent: float = opt(0.0, "low-shot: percent of the train images of every class, e.g. 1")
    splits: int = opt(3, "low-shot: seeded random draws of the labelled images (seeds 0..splits-1)")
    split_file: str = opt("", "low-shot: file of the labelled train images, one a line (MSN/SimCLRv2)")
    seed: int = opt(0, "seed of the probe initialisation and the data order")


class StackedProbe(nn.Module):
    """G linear probes (one per lr) as one (G, D, C) weight behind one non-affine BatchNorm1d.

    The BatchNorm has no parameters, so one shared copy acts exactly as G separate ones would."""

    def __init__(self, dim: int, num_classes: int, grid: int, generator=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.randn(grid, dim, num_classes, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(grid, 1, num_classes))

    def forward(self, x):
        """Eq. (18) of docs/METHOD.md: features (B, D) -> logits (G, B, C) of every probe."""
        return torch.einsum("bd,gdc->gbc", self.bn(x), self.weight) + self.bias


def grid_loss(logits, y):
    """Eq. (19) of docs/METHOD.md: sum over the grid of each probe's mean cross-entropy; logits (G, B, C), y (B,)."""
    # BEGIN SOLUTION task=12
    per = F.cross_entropy(logits.permute(1, 2, 0), y[:, None].expand(-1, len(logits)), reduction="none")
    return per.mean(0).sum()  # (B, G) -> mean over the batch, sum over the probes
    # END SOLUTION


@torch.no_grad()
def sgd_step(probe: StackedProbe, momentum: torch.Tensor, lrs: torch.Tensor, lars: bool = False):
    """Eq. (20) of docs/METHOD.md: torch.optim.SGD (momentum 0.9, no decay): b = 0.9 b + grad; w -= lrs[g] b.

    lars (MAE's LARS, You et al. 2017): each probe's weight gradient first scaled by 0.001 |w| / |grad|."""
    for p, buf in zip((probe.weight, probe.bias), momentum):
        grad, p.grad = p.grad, None
        if lars and p is probe.weight:
            w, g = p.norm(dim=(1, 2), keepdim=True), grad.norm(dim=(1, 2), keepdim=True)  # (G, 1, 1)
            grad = grad * torch.where((w > 0) & (g > 0), 0.001 * w / g.clamp_min(1e-30), torch.ones_like(w))
        buf.mul_(0.9).add_(grad)
        p.sub_(lrs.view(-1, 1, 1) * buf)  # (G, 1, 1) broadcast over each probe's own weights


class GridTrainer:
    """A StackedProbe with its SGD state and lr schedule, fed one epoch of features at a time."""

    def __init__(self, dim, num_classes, lrs, batch, epochs, n_train, warmup_epochs, seed, device, lars=False):
        gen, self.lars = torch.Generator().manual_seed(seed), lars
        self.probe = StackedProbe(dim, num_classes, len(lrs), gen).to(device)
        self.momentum = [torch.zeros_like(self.probe.weight), torch.zeros_like(self.probe.bias)]
        self.lrs = torch.tensor(lrs, device=device) * batch / 256  # the linear scaling rule
        self.batch, self.gen, self.step, self.total = batch, gen, 0, epochs * (n_train // batch)
        self.warmup = round(warmup_epochs * (n_train // batch))  # steps

    def train_epoch(self, x, y):
        self.probe.train()
        perm = torch.randperm(len(x), generator=self.gen).to(x.device)
        for i in range(len(x) // self.batch):  # the last incomplete batch is dropped
            idx = perm[i * self.batch:(i + 1) * self.batch]
            grid_loss(self.probe(x[idx]), y[idx]).backward()
            lr = self.lrs * warmup_cosine(self.step, self.total, self.warmup, 1.0, 0.0)  # (G,) Eq. (21) = Eq. (14)
            sgd_step(self.probe, self.momentum, lr, self.lars)
            self.step += 1

    @torch.no_grad()
    def accuracy(self, x, y, chunk=4096) -> list:  # top-1 of each probe; BatchNorm: running stats
        self.probe.eval()
        correct = sum((self.probe(x[s:s + chunk]).argmax(-1) == y[s:s + chunk]).sum(1)
                      for s in range(0, len(x), chunk))  # (G,)
        return (correct.float() / len(x)).tolist()


def linear_probe(x, y, val_x, val_y, lrs, epochs=50, batch=1024, warmup_epochs=None, seed=0) -> list:
    """Top-1 on (val_x, val_y) of every lr's probe, the grid trained together on (x, y)."""
    trainer = GridTrainer(x.shape[1], int(max(y.max(), val_y.max())) + 1, lrs, min(batch, len(x)), epochs, len(x),
                          0.1 * epochs if warmup_epochs is None else warmup_epochs, seed, x.device)
    for _ in range(epochs):
        trainer.train_epoch(x, y)
    return trainer.accuracy(val_x, val_y)


def feature_sets(f: dict, feature: str, grid: bool) -> dict:
    """What the probes read, {(block, feature): Columns}.

    `--search lr`: each entry of f as it is. The grid (docs/METHOD.md §11): the last-block sets read f's 'norm' (the
    top block after the final norm; without it the top block), the last-4 sets its top (up to) 4 numbered blocks
    concatenated; each as F alone and, when f holds 'F+mean' features ((N, 2D), F first), with the mean token."""
    if not grid:
        return {(b, feature): Columns([t]) for b, t in f.items()}
    ints, base = sorted(b for b in f if isinstance(b, int))[-4:], feature.removesuffix("+mean")
    top, sets = ["norm"] if "norm" in f else ints[-1:] or list(f)[-1:], {}
    for name, bs in [(top[0], top)] + ([("+".join(map(str, ints)), ints)] if ints and ints != top else []):
        sets[name, base] = Columns([f[b][:, :f[b].shape[1] // 2] if base != feature else f[b] for b in bs])
        if base != feature:
            sets[name, feature] = Columns([f[b] for b in bs])
    return sets


def linear(cfg, d, feats, vit=None, aug_ds=None, grid=False) -> list:
    """Every probe of the search trained together, each evaluated after every epoch.

    One pass over the (re-embedded) train set per epoch; one record per probe: top-1 after the last epoch, `best` for
    the grid's best (--search lr: per feature set), its best epoch's (`top1_best_epoch`, `best_epoch`)."""
    lrs, feature = [float(v) for v in cfg.lrs.split(",")], feats["feature"]  # the file's, or the flag's
    y, vy = feats["train_labels"].to(d.device), feats["val_labels"].to(d.device)
    num_classes, mode = int(max(y.max(), vy.max())) + 1, "augment" if cfg.augment else "features-once"
    val = feature_sets({b: t.to(d.device) for b, t in feats["val_features"].items()}, feature, grid)
    n, batch = len(y), min(cfg.probe_batch_size, len(y))  # batch <= n
    warm = 0.1 * cfg.epochs if cfg.warmup_epochs is None else cfg.warmup_epochs
    trainers = {k: GridTrainer(s.dim, num_classes, lrs, batch, cfg.epochs, n, warm, cfg.seed, d.device,
                               cfg.optimizer == "lars") for k, s in val.items()}
    blocks = parse_blocks(cfg.blocks, vit.depth) if aug_ds is not None else None
    train, history = {b: t.to(d.device) for b, t in feats.get("train_features", {}).items()}, {k: [] for k in val}
    for epoch in range(cfg.epochs):
        if aug_ds is not None:  # the frozen encoder embeds a new random crop of every image
            f, _ = extract_features(vit, aug_ds, blocks, cfg.feature, cfg.batch_size, d.device,
                                    cfg.workers, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            train = {b: t.to(d.device) for b, t in select_blocks(f, blocks, cfg.concat).items()}
        sets = feature_sets({b: train[b] for b in feats["val_features"]}, feature, grid)
        for k, trainer in trainers.items():
            trainer.train_epoch(sets[k], y)
            history[k].append(trainer.accuracy(val[k], vy))  # (epochs, G): the official number is the best epoch's
    records = []
    for (b, feat), accs in history.items():
        records += [{"block": b, "feature": feat, "lr": lr, "top1": a[-1], "top1_best_epoch": max(a),
                     "best_epoch": a.index(max(a)) + 1, "mode": mode, "best": False} for lr, a in zip(lrs, zip(*accs))]
    for part in ([records] if grid else [records[i:i + len(lrs)] for i in range(0, len(records), len(lrs))]):
        max(part, key=lambda r: r["top1"])["best"] = True  # the first of equals
    return records


# --- Low-shot: logistic regression on a few labelled images per class

def lowshot_fit(train_x, train_y):
    """Eq. (22) of docs/METHOD.md: the low-shot classifier, L2-penalised logistic regression solved to the optimum.

    Penalty lambda = 2.5e-4 / N (scikit-learn C = 1 / (lambda N) = 4000), no intercept, on train rows each centred on
    its own scalar mean and L2-normalised (cyanure's preprocess(centering=True, normalize=True, columns=False), as in
    both papers' code); L-BFGS until every gradient entry is below 1e-6 of the largest at W = 0 (scikit-learn's default
    tol 1e-4 is absolute: at 1000 classes it stopped after one step, near a class-mean classifier)."""
    from sklearn.linear_model import LogisticRegression
    x = train_x.double()
    x = F.normalize(x - x.mean(1, keepdim=True), dim=1)  # (N, D): each row its own mean and norm
    classes, y = train_y.unique(return_inverse=True)
    start = (x.sum(0) / len(classes) - x.new_zeros(len(classes), x.shape[1]).index_add_(0, y, x)).abs().max()
    with warnings.catch_warnings():  # 1-shot has as many classes as rows, and scikit-learn warns of it
        warnings.filterwarnings("ignore", "The number of unique classes")
        return LogisticRegression(C=4000, fit_intercept=False, tol=1e-6 * float(start) / len(x),
                                  max_iter=10000).fit(x.numpy(), train_y.numpy())


def lowshot_accuracy(train_x, train_y, val_x, val_y) -> float:
    """Top-1 of lowshot_fit's classifier on val rows as they are (as in the papers: scale never changes argmax)."""
    clf = lowshot_fit(train_x, train_y)
    return float((clf.predict(val_x.double().numpy()) == val_y.numpy()).mean())


def lowshot(cfg, feats) -> list:
    y, records = feats["train_labels"], []
    draws = lowshot_draws(y, cfg.shots, cfg.percent, cfg.splits, cfg.split_file, cfg.data)
    for b in feats["blocks"]:
        x, vx, runs = feats["train_features"][b], feats["val_features"][b], {}
        for kind, value, seed, idx in draws:  # a record names its setting: shots, percent or split_file
            top1 = lowshot_accuracy(x[idx], y[idx], vx, feats["val_labels"])
            setting = {"block": b, "feature": cfg.feature, "shots": None, "percent": None,
                       "split_file": None, kind: value}
            runs.setdefault(kind + str(value), (setting, []))[1].append(top1)
            records.append({**setting, "split": seed, "images": len(idx), "top1": top1})
        for setting, accs in runs.values():
            if len(accs) > 1:  # the reported number: mean over the draws
                records.append({**setting, "split": "mean", "top1": float(np.mean(accs)),
                                "top1_std": float(np.std(accs))})
    return records


def grid_settings(cfg, vit):
    """The extraction behind the grid: the top block t of --blocks, the 3 below it, and 'norm' (t after the final norm).

    Each as --feature with the mean patch token ('F+mean'); from a feature file, all its blocks."""
    if cfg.concat:
        raise UserError("--concat belongs to --search lr; the grid concatenates the last 4 blocks itself")
    if cfg.load_features:
        return dataclasses.replace(cfg, blocks="all")
    top = max([b for b in parse_blocks(cfg.blocks, vit.depth) if b != "norm"] or [vit.depth])
    return dataclasses.replace(cfg, blocks=f"{max(1, top - 3)}-{top},norm",
                               feature=cfg.feature if cfg.feature.endswith("mean") else cfg.feature + "+mean")


def main(cfg: Settings) -> dict:
    if cfg.epochs < 1 or cfg.probe_batch_size < 1 or cfg.splits < 1 or cfg.optimizer not in ("sgd", "lars"):
        raise UserError("--epochs, --probe-batch-size and --splits must be positive, --optimizer sgd or lars")
    if cfg.search not in ("grid", "lr"):
        raise UserError(f"unknown --search {cfg.search!r}; use grid (MIM-Refiner's 52 probes) or lr")
    low = bool(cfg.shots or cfg.percent > 0 or cfg.split_file)
    if cfg.augment and (low or cfg.load_features):
        raise UserError("--augment re-embeds images every epoch: it needs --ckpt, not --load-features, "
                        "and the linear probe, not --shots/--percent/--split-file")
    d, grid = setup_distributed(cfg.device), cfg.search == "grid" and not low
    vit = load_model(cfg) if cfg.augment or grid and not cfg.load_features else None
    ecfg = grid_settings(cfg, vit) if grid else cfg  # what is extracted (and re-embedded under --augment)
    aug_ds = build_dataset(cfg.data, "train", train_transform(vit.img_size)) if cfg.augment else None
    feats = get_features(ecfg, d, ("val",) if cfg.augment else ("train", "val"), vit=vit)
    feats.setdefault("train_labels", torch.as_tensor(getattr(aug_ds, "targets", [])))  # (N,) --augment
    if low:  # rank 0 alone fits the classifiers
        return report(cfg, d, lowshot(cfg, feats) if d.main else [], "low-shot logistic regression top-1")
    if grid and cfg.load_features:  # the file's blocks t-3..t of the top one t of --blocks, and its 'norm' of t
        ints = sorted(b for b in feats["blocks"] if isinstance(b, int))
        top = max([b for b in parse_blocks(cfg.blocks, ints[-1]) if b != "norm"] or ints) if ints else None
        keep = [b for b in ints if top - 3 <= b <= top] + ["norm"] * (ints[-1:] == [top] and "norm" in feats["blocks"])
        feats["val_features"] = {b: feats["val_features"][b] for b in keep or feats["blocks"][-1:]}
        if ints and "norm" not in keep and d.main:
            print(f"warning: {cfg.load_features} holds no 'norm' of block {top} (after the final norm, MIM-Refiner's "
                  f"last-block features): the last-block sets read its raw output", file=sys.stderr)
    # every rank trains the same probes on the same features (cheap); rank 0 reports
    records = linear(ecfg, d, feats, vit, aug_ds, grid)
    mode = records[0]["mode"]
    what = f"MIM-Refiner's grid, {len(records)} probes" if grid else f"{len(cfg.lrs.split(','))} lrs per feature set"
    result = report(cfg, d, records, f"linear probe top-1, {what}, {cfg.epochs} epochs, {mode} ({MODES[mode]})")
    for w in (r for r in records if r["best"] and d.main):  # the reported number(s)
        print(f"best: block {w['block']}, {w['feature']}, lr {w['lr']:g}: top-1 {w['top1']:.4f} ({mode})")
    if d.main:  # MIM-Refiner reports the best of every probe's evaluations after each epoch
        w = max(records, key=lambda r: r["top1_best_epoch"])
        print(f"best of all epochs: block {w['block']}, {w['feature']}, lr {w['lr']:g}: top-1 "
              f"{w['top1_best_epoch']:.4f} after epoch {w['best_epoch']} of {cfg.epochs} ({mode})")
    return result


if __name__ == "__main__":
    cli(main, Settings)

