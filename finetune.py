"""Fine-tuning on a labelled part of the train set: the papers' 1% column (docs/METHOD.md §11).

MIM-Refiner (Alkin et al. 2024, arXiv 2402.10093) reports ImageNet top-1 with 1% of the labels from
full fine-tuning, not from a classifier on frozen features: the encoder and a linear head on its
final-normed CLS token (init std 2e-5; data2vec 2.0: a LayerNorm in front) train for 50 epochs with
AdamW (lr 3e-5 per 256 images, betas 0.9 / 0.999, weight decay by size: 0.05 for ViT-L/16, 0.4 for
ViT-H and 2B), layer-wise lr decay 0.75 (Eq. (13)), 5 warm-up epochs then cosine to 0 (Eq. (14)),
global batch 512, RandomResizedCrop(0.08-1, bicubic) + flip, label smoothing 0.1, the patch positions
trained too (the CLS slot stays fixed) (Eq. (26)). The labelled images: `--split-file` (the MSN/SimCLRv2 file the
papers use, one image a line) or `--percent` of every class, drawn with `--seed`. Validation top-1
after every `--eval-every` epochs; the last and the best are reported. Logistic regression on frozen
features of the same split, a different protocol, is `probe.py --split-file F` (or `--percent 1`).
Image i of epoch e is augmented from (seed, e, i) alone, so N processes train as one does.

CPU, the embedded data set (10% of the labels, 2 epochs; about 30 s on 2 cores; near chance, as the
tiny MAE's features hold little digit information, README):
    python finetune.py --percent 10 --epochs 2 --batch-size 64
    torchrun --standalone --nproc_per_node=2 finetune.py --device cpu --percent 10 --epochs 2 --batch-size 64
ImageNet on 8 GPUs, MSN's 1% split file (one image name a line), a refined ViT-L/16:
    torchrun --nproc_per_node=8 finetune.py --ckpt runs/l16/encoder.pth --data /imagenet --split-file 1percent.txt
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from model import UserError, load_encoder
from util import common, data, lowshot
from util.common import opt
from util.features import extract_features, report


@dataclass
class Settings:
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "encoder checkpoint, any layout of docs/METHOD.md §9")
    weights: str = opt("ema", "which encoder of a refine.py checkpoint: ema or online")
    data: str = opt("jittered-digits", "jittered-digits, or a folder with train/ and val/ (ImageFolder)")
    img_size: Optional[int] = opt(None, "input resolution; unset = the checkpoint's")
    split_file: Optional[str] = opt(None, "the labelled train images, one a line (MSN/SimCLRv2); unset = --percent")
    percent: float = opt(1.0, "without --split-file: percent of every class's train images, drawn with --seed")
    epochs: int = opt(50, "fine-tuning epochs")
    batch_size: int = opt(512, "global batch, divided over the processes")
    lr: float = opt(3e-5, "AdamW peak lr per 256 images (x global batch / 256)")
    weight_decay: Optional[float] = opt(None, "AdamW weight decay (none on biases, norms, the CLS token and "
                                        "positions); unset = by width: 0.05 up to ViT-L's 1024, else 0.4")
    layer_decay: float = opt(0.75, "layer-wise lr decay: block j gets decay^(depth+1-j), the stem decay^(depth+1)")
    warmup_epochs: float = opt(5.0, "linear warm-up in epochs, then cosine to 0")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")
    crop_min: float = opt(0.08, "smallest area fraction of the RandomResizedCrop")
    eval_every: int = opt(1, "validation top-1 every N epochs (and after the last)")
    seed: int = opt(0, "seed of the head, the --percent draw, data order and augmentation")
    workers: int = opt(4, "data-loading processes per process")
    device: str = opt("auto", "auto, cpu or cuda")
    out: Optional[str] = opt(None, "also write the results as JSON to this file")


def default_weight_decay(vit) -> float:
    """The official 1% templates': 0.05 for ViT-L/16 (and, ours, narrower), 0.4 for ViT-H/14, H/16, 2B/14."""
    return 0.05 if vit.dim <= 1024 else 0.4


class Classifier(nn.Module):
    """The encoder, a linear head on its final-normed CLS token (data2vec 2.0: on a head LayerNorm's)."""

    def __init__(self, vit, num_classes: int):
        super().__init__()
        pos = vit.pos_embed
        del vit.pos_embed  # a buffer while the encoder is frozen; fine-tuning trains it (Eq. (26))
        vit.pos_embed = nn.Parameter(pos.clone())
        # the official table has no CLS slot: ours stays fixed, else it trains as a second CLS token
        vit.pos_embed.register_hook(lambda g: torch.cat([torch.zeros_like(g[:, :1]), g[:, 1:]], dim=1))
        self.head_norm = nn.LayerNorm(vit.dim, eps=1e-6) if vit.post_norm else nn.Identity()
        self.vit, self.head = vit, nn.Linear(vit.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def logits(self, cls):
        """Eq. (26) of docs/METHOD.md: the (final-normed) CLS token (B, D) -> logits (B, classes)."""
        return self.head(self.head_norm(cls))

    def forward(self, x):  # images (B, C, H, W) -> logits (B, classes)
        return self.logits(self.vit(x)[:, 0])


def labelled_indices(cfg, train) -> list:
    """Indices of the labelled train images: those of --split-file, or --percent of every class."""
    if cfg.split_file:
        return lowshot.split_file_indices(cfg.split_file, cfg.data, len(train), train).tolist()
    if not 0 < cfg.percent <= 100:
        raise UserError(f"--percent {cfg.percent}: give a percentage in (0, 100], or --split-file")
    return lowshot.draw_split(train.targets, cfg.seed, percent=cfg.percent).tolist()


@torch.no_grad()
def accuracy(net: Classifier, val, cfg, d) -> float:
    """Validation top-1: every process embeds a shard (extract_features), all score all."""
    feats, labels = extract_features(net.vit, val, [net.vit.depth], "cls-norm", cfg.batch_size // d.world,
                                     d.device, cfg.workers, desc="val")  # the head's input, (N, D)
    net.vit.train()  # extract_features leaves it in eval mode
    return (net.logits(feats[net.vit.depth].to(d.device)).argmax(1).cpu() == labels).float().mean().item()


def main(cfg: Settings) -> dict:
    if min(cfg.epochs, cfg.batch_size, cfg.eval_every) < 1 or not 0 <= cfg.label_smoothing < 1:
        raise UserError("--epochs, --batch-size and --eval-every must be positive, --label-smoothing in [0, 1)")
    d = common.setup_distributed(cfg.device)
    common.seed_everything(cfg.seed)  # the same head on every rank (DDP also broadcasts rank 0's)
    if cfg.batch_size % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide over {d.world} processes; use a multiple")
    vit = load_encoder(cfg.ckpt, weights=cfg.weights, img_size=cfg.img_size)
    train = data.build_dataset(cfg.data, "train")
    idx, targets = labelled_indices(cfg, train), torch.as_tensor(train.targets)
    if cfg.batch_size > len(idx):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(idx)} labelled images; lower it")
    net = Classifier(vit, len(train.classes)).to(d.device)
    ddp = net if d.world == 1 else DDP(net, [d.device] if d.device.type == "cuda" else None)
    images = data.Seeded(train, data.train_transform(vit.img_size, cfg.crop_min), cfg.seed)
    keys = data.EpochKeys(idx, d.world, d.rank, cfg.seed)  # the labelled images, in a (seed, epoch) order
    loader = DataLoader(images, cfg.batch_size // d.world, sampler=keys, drop_last=True,
                        **data.loader_kwargs(d.device, cfg.workers))
    spe = keys.per_rank // (cfg.batch_size // d.world)  # steps per epoch
    total, warm, peak = cfg.epochs * spe, round(cfg.warmup_epochs * spe), cfg.lr * cfg.batch_size / 256
    wd = default_weight_decay(vit) if cfg.weight_decay is None else cfg.weight_decay
    groups = common.param_groups(net, wd, cfg.layer_decay, net.vit.depth)  # Eq. (13)
    optim = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    val = data.build_dataset(cfg.data, "val", data.eval_transform(vit.img_size))
    autocast = torch.autocast(d.device.type, torch.bfloat16, enabled=d.device.type == "cuda")
    records, step = [], 0
    for epoch in range(cfg.epochs):
        keys.start(epoch)
        losses = []
        for x, i in loader:
            for g in optim.param_groups:  # Eq. (14), floor 0
                g["lr"] = common.warmup_cosine(step, total, warm, peak, 0.0) * g["lr_scale"]
            with autocast:
                logits = ddp(x.to(d.device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), targets[i].to(d.device), label_smoothing=cfg.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(common.all_gather(loss.detach()[None]).mean().item())  # the same on every rank
            if not math.isfinite(losses[-1]):
                raise UserError(f"the loss is not finite at step {step + 1}; lower --lr")
            step += 1
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            records.append(dict(epoch=epoch + 1, step=step, images=len(idx), loss=sum(losses) / len(losses),
                                top1=accuracy(net, val, cfg, d), best=False))
    max(records, key=lambda r: r["top1"])["best"] = True
    what = f"--split-file {cfg.split_file}" if cfg.split_file else f"{cfg.percent:g}% of every class"
    return report(cfg, d, records, f"fine-tuning top-1 on {len(idx)} labelled images ({what}), "
                                   f"{cfg.epochs} epochs of {spe} steps, global batch {cfg.batch_size}")


if __name__ == "__main__":
    common.cli(main, Settings)
