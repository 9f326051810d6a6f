"""Linear probing and low-shot classification of frozen ViT features (docs/METHOD.md §11).

Linear probe (MIM-Refiner, Alkin et al. 2024; MAE-CT, Lehner et al. 2023): non-affine BatchNorm1d,
Linear (init std 0.01), SGD momentum 0.9, no weight decay, batch 1024, 10% warm-up then cosine,
50 epochs, best top-1 over a 13-point lr grid (x batch/256), all grid points trained together as
one stacked layer. Trains on features extracted once (fast), or with `--augment` re-embeds
RandomResizedCrop + flip views every epoch (the paper protocol). MAE's recipe (He et al. 2022):
`--augment --optimizer lars --lrs 0.1 --probe-batch-size 16384 --epochs 90 --warmup 10` (50 epochs
for ViT-L/H; `--feature cls-norm`, MAE's own feature). Low-shot (`--shots 1,2,5`, `--percent 1` or
`--split-file F`, instead of the probe): logistic regression (scikit-learn C = 4000, no intercept) on
train rows each centred on its own mean and L2-normalised (cyanure's preprocessing, as in the papers);
`--splits` seeded draws, mean reported.

CPU, the embedded data set (under a minute each on 2 cores; random weights score about 10%):
    python probe.py --ckpt checkpoints/mae_tiny_digits.pth --data jittered-digits
    python probe.py --ckpt checkpoints/mae_tiny_digits.pth --shots 1,2,5
Several GPUs, ImageNet, ViT-L/16 (MIM-Refiner reports 77.5% -> 82.8% linear, 14.3% -> 57.8% 1-shot):
    torchrun --nproc_per_node=8 probe.py --ckpt refined/last.pt --data /imagenet --augment
    torchrun --nproc_per_node=8 probe.py --ckpt refined/last.pt --data /imagenet --shots 1,2,5 --percent 1
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import build_dataset, cli, extract_features, opt, parse_blocks, setup_distributed
from common import FeatureSettings, get_features, load_model, report, select_blocks
from labelled import lowshot, train_transform
from model import UserError

LR_GRID = "1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,0.01,0.02,0.05,0.1,0.2,0.3,0.5"  # MIM-Refiner's grid


@dataclass
class Settings(FeatureSettings):
    epochs: int = opt(50, "linear-probe epochs")
    probe_batch_size: int = opt(1024, "linear-probe batch size; the lr grid is scaled by it / 256")
    lrs: str = opt(LR_GRID, "linear-probe base learning rates, all trained together")
    warmup: float = opt(0.1, "linear lr warm-up: < 1 a fraction of the probe steps, >= 1 epochs")
    optimizer: str = opt("sgd", "sgd (MIM-Refiner) or lars (MAE); momentum 0.9, no weight decay, either")
    augment: bool = opt(False, "re-embed the train images every epoch with RandomResizedCrop + flip")
    shots: str = opt("", "low-shot: images per class, e.g. 1,2,5 (replaces the linear probe)")
    percent: float = opt(0.0, "low-shot: percent of the train images of every class, e.g. 1")
    splits: int = opt(3, "low-shot: seeded random draws of the labelled images (seeds 0..splits-1)")
    split_file: str = opt("", "low-shot: file of the labelled train images, one a line (MSN/SimCLRv2)")
    seed: int = opt(0, "seed of the probe initialisation and the data order")


class StackedProbe(nn.Module):
    """G linear probes (one per lr) as one (G, D, C) weight behind one non-affine BatchNorm1d: it has
    no parameters, so one shared copy acts exactly as G separate ones would."""

    def __init__(self, dim: int, num_classes: int, grid: int, generator=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.randn(grid, dim, num_classes, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(grid, 1, num_classes))

    def forward(self, x):
        """Eq. (18) of docs/METHOD.md: features (B, D) -> logits (G, B, C) of every probe."""
        return torch.einsum("bd,gdc->gbc", self.bn(x), self.weight) + self.bias


def grid_loss(logits, y):
    """Eq. (19) of docs/METHOD.md: sum over the grid of each probe's mean cross-entropy.
    logits (G, B, C), y (B,)."""
    per = F.cross_entropy(logits.permute(1, 2, 0), y[:, None].expand(-1, len(logits)), reduction="none")
    return per.mean(0).sum()  # (B, G) -> mean over the batch, sum over the probes


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Eq. (21) of docs/METHOD.md: linear warm-up over `warmup` steps, then cosine decay to zero, per step."""
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return (step + 1) / warmup if step < warmup else cosine


@torch.no_grad()
def sgd_step(probe: StackedProbe, momentum: torch.Tensor, lrs: torch.Tensor, lars: bool = False):
    """Eq. (20) of docs/METHOD.md: torch.optim.SGD (momentum 0.9, no decay), lr lrs[g] for probe g:
    b = 0.9 b + grad; w -= lr b. lars (MAE's LARS, You et al. 2017): each probe's weight gradient first
    scaled by 0.001 |w| / |grad|."""
    for p, buf in zip((probe.weight, probe.bias), momentum):
        grad = p.grad
        if lars and p is probe.weight:
            w, g = p.norm(dim=(1, 2), keepdim=True), grad.norm(dim=(1, 2), keepdim=True)  # (G, 1, 1)
            grad = grad * torch.where((w > 0) & (g > 0), 0.001 * w / g.clamp_min(1e-30), torch.ones_like(w))
        buf.mul_(0.9).add_(grad)
        p.sub_(lrs.view(-1, 1, 1) * buf)  # (G, 1, 1) broadcast over each probe's own weights
        p.grad = None


class GridTrainer:
    """A StackedProbe with its SGD state and lr schedule, fed one epoch of features at a time."""

    def __init__(self, dim, num_classes, lrs, batch, epochs, n_train, warmup, seed, device, lars=False):
        gen, self.lars = torch.Generator().manual_seed(seed), lars
        self.probe = StackedProbe(dim, num_classes, len(lrs), gen).to(device)
        self.momentum = [torch.zeros_like(self.probe.weight), torch.zeros_like(self.probe.bias)]
        self.lrs = torch.tensor(lrs, device=device) * batch / 256  # the linear scaling rule
        self.batch, self.gen, self.step, self.total = batch, gen, 0, epochs * (n_train // batch)
        self.warmup = round(warmup * (self.total if warmup < 1 else n_train // batch))  # fraction or epochs

    def train_epoch(self, x, y):
        self.probe.train()
        perm = torch.randperm(len(x), generator=self.gen).to(x.device)
        for i in range(len(x) // self.batch):  # the last incomplete batch is dropped
            idx = perm[i * self.batch:(i + 1) * self.batch]
            grid_loss(self.probe(x[idx]), y[idx]).backward()
            lr = self.lrs * lr_factor(self.step, self.total, self.warmup)  # (G,)
            sgd_step(self.probe, self.momentum, lr, self.lars)
            self.step += 1

    @torch.no_grad()
    def accuracy(self, x, y, chunk=4096) -> list:  # top-1 of each probe; BatchNorm: running stats
        self.probe.eval()
        correct = sum((self.probe(x[s:s + chunk]).argmax(-1) == y[s:s + chunk]).sum(1)
                      for s in range(0, len(x), chunk))  # (G,)
        return (correct.float() / len(x)).tolist()


def linear_probe(x, y, val_x, val_y, lrs, epochs=50, batch=1024, warmup=0.1, seed=0) -> list:
    """Top-1 on (val_x, val_y) of every lr's probe, the grid trained together on (x, y)."""
    num_classes = int(max(y.max(), val_y.max())) + 1
    trainer = GridTrainer(x.shape[1], num_classes, lrs, min(batch, len(x)), epochs, len(x), warmup,
                          seed, x.device)
    for _ in range(epochs):
        trainer.train_epoch(x, y)
    return trainer.accuracy(val_x, val_y)


def linear(cfg, d, feats, vit=None, aug_ds=None) -> list:
    lrs = [float(v) for v in cfg.lrs.split(",")]
    y, vy = feats["train_labels"].to(d.device), feats["val_labels"].to(d.device)
    num_classes = int(max(y.max(), vy.max())) + 1
    n, batch, blocks = len(y), min(cfg.probe_batch_size, len(y)), feats["blocks"]  # batch <= n
    trainers = {b: GridTrainer(feats["val_features"][b].shape[1], num_classes, lrs, batch, cfg.epochs,
                               n, cfg.warmup, cfg.seed, d.device, cfg.optimizer == "lars") for b in blocks}
    ints = parse_blocks(cfg.blocks, vit.depth) if aug_ds is not None else None
    for epoch in range(cfg.epochs):
        train = feats.get("train_features")
        if aug_ds is not None:  # the frozen encoder embeds a new random crop of every image
            f, _ = extract_features(vit, aug_ds, ints, cfg.feature, cfg.batch_size, d.device,
                                    cfg.workers, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            train = select_blocks(f, ints, cfg.concat)
        for b in blocks:
            trainers[b].train_epoch(train[b].to(d.device), y)
    records = []
    for b in blocks:  # one record per lr; `best` marks the best of the grid, the reported number
        accs = trainers[b].accuracy(feats["val_features"][b].to(d.device), vy)
        best = int(np.argmax(accs))
        records += [{"block": b, "feature": cfg.feature, "lr": lr, "top1": a, "best": i == best}
                    for i, (lr, a) in enumerate(zip(lrs, accs))]
    return records


def main(cfg: Settings) -> dict:
    if cfg.epochs < 1 or cfg.probe_batch_size < 1 or cfg.splits < 1 or cfg.optimizer not in ("sgd", "lars"):
        raise UserError("--epochs, --probe-batch-size and --splits must be positive, --optimizer sgd or lars")
    low = bool(cfg.shots or cfg.percent > 0 or cfg.split_file)
    if cfg.augment and (low or cfg.load_features):
        raise UserError("--augment re-embeds images every epoch: it needs --ckpt, not --load-features, "
                        "and the linear probe, not --shots/--percent/--split-file")
    d = setup_distributed(cfg.device)
    vit = load_model(cfg) if cfg.augment else None  # --augment: train features re-embedded every epoch
    aug_ds = build_dataset(cfg.data, "train", train_transform(vit.img_size)) if vit else None
    feats = get_features(cfg, d, ("val",) if cfg.augment else ("train", "val"), vit=vit)
    feats.setdefault("train_labels", torch.as_tensor(getattr(aug_ds, "targets", [])))  # (N,) --augment
    if low:  # rank 0 alone fits the classifiers
        return report(cfg, d, lowshot(cfg, feats) if d.main else [], "low-shot logistic regression top-1")
    # every rank trains the same probes on the same features (cheap); rank 0 reports
    return report(cfg, d, linear(cfg, d, feats, vit, aug_ds), f"linear probe top-1, {cfg.epochs} epochs")


if __name__ == "__main__":
    cli(main, Settings)
