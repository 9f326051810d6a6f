"""The refinement's hyperparameters by encoder size (docs/METHOD.md §8).

The papers' recipes for ViT-L/H/2B (and ViT-B, which takes ViT-L's), ours for small encoders on CPUs. Every refine.py
setting left at None takes its value from `by_scale`; `resolve` fills them in and checks the result."""
import dataclasses
import math

import torch

import model
from model import UserError
from util.common import parse_blocks

# By (encoder size, method): global batch, phase 2 epochs, temperature. The size is read from the
# encoder's width and depth, else see scale_of; the "small" recipe is ours (for CPUs, sized so that
# both refinements and three evaluations fit `make demo` on 2 cores).
RECIPES = {
    ("base", "mim-refiner"): (1024, 30, 0.2),  # no ViT-B in the paper: the large recipe (our choice)
    ("large", "mim-refiner"): (1024, 30, 0.2), ("huge", "mim-refiner"): (512, 30, 0.3),
    ("2b", "mim-refiner"): (512, 20, 0.35), ("small", "mim-refiner"): (128, 6, 0.2),
    ("base", "mae-ct"): (1024, 20, 0.15), ("large", "mae-ct"): (1024, 20, 0.2),
    ("huge", "mae-ct"): (512, 30, 0.3), ("small", "mae-ct"): (128, 6, 0.15),
    ("2b", "mae-ct"): (512, 30, 0.35),  # no 2b in MAE-CT: huge's epochs, MIM-Refiner's tau (ours)
}
CHOICES = {"method": ("mim-refiner", "mae-ct"), "views": ("multicrop", "crop-flip"), "feature": ("cls", "mean"),
           "pairing": ("intended", "official"), "neighbours": ("all", "refine", "none")}


def scale_of(vit, n_train: int = 0) -> tuple:
    """(recipe, why): the papers' for their sizes; 'small' under 384 wide on < 50k images; else the nearest width's."""
    sizes, size = {model.SIZES[n][:2]: n for n in ("base", "large", "huge", "2b")}, f"{vit.dim} wide, {vit.depth} deep"
    if (vit.dim, vit.depth) in sizes or (vit.dim < 384 and n_train < 50_000):
        return (sizes[vit.dim, vit.depth], f"the papers' for {size}") if (vit.dim, vit.depth) in sizes else (
            "small", f"ours for CPUs: {size} (under 384 wide) on {n_train} images (under 50000)")
    near = min(sizes.values(), key=lambda n: abs(math.log(model.SIZES[n][0] / vit.dim)))
    return near, f"{size} is no paper size: the recipe of the nearest width, scaled to the data"


def head_blocks(method: str, dim: int, depth: int) -> list:
    """docs/METHOD.md §8: the blocks that get a contrastive head.

    MAE-CT one head on the last block; MIM-Refiner one per block of the last third (ViT-H/14: 21-32, twelve heads as in
    the paper; otherwise the last ceil(depth / 3))."""
    if method == "mae-ct":
        return [depth]
    first = 21 if (dim, depth) == model.SIZES["huge"][:2] else depth - math.ceil(depth / 3) + 1
    return list(range(first, depth + 1))


def by_scale(cfg, vit, world: int, n_train: int) -> dict:
    """The recipe's value of every setting that has one, given what the command line fixed."""
    (scale, _), mim = scale_of(vit, n_train), cfg.method == "mim-refiner"
    big = scale != "small"
    batch, epochs, tau = RECIPES[scale, cfg.method]
    given = lambda k, default: default if getattr(cfg, k) is None else getattr(cfg, k)  # noqa: E731
    batch = min(batch, 2 ** int(math.log2(max(1, n_train // 32)))) if big else batch  # >= 32 steps per epoch
    gb = given("batch_size", max(1, batch // world)) * world
    g, topk = given("global_size", vit.img_size), given("topk", 20 if big else 5)
    head_epochs = given("head_epochs", 20 if big else 1)
    epochs = given("epochs", 20 if mim and big and vit.post_norm else epochs)  # data2vec 2.0: 20
    warm = (lambda ep: 4.0) if mim and big else (lambda ep: 0.2 * ep)  # MIM-Refiner 4 epochs, else 20% of a phase
    return dict(
        views="multicrop" if mim or not big else "crop-flip", local_crops=10 if big else 0,
        global_size=g, global_crop_min=(0.25 if mim else 0.08) if big else 0.3,
        local_crop_min=0.05 if big else 0.25, jitter=1.0 if big else 2.0,
        neighbours="all" if big else "refine",
        local_size=vit.patch * math.ceil(g * 96 / 224 / vit.patch),  # 96 px at 224, 98 for patch 14
        heads=",".join(map(str, head_blocks(cfg.method, vit.dim, vit.depth))),
        freeze_blocks=vit.depth // 2 if not (mim and big) else 6 if scale == "2b" else 0,
        head_epochs=head_epochs, epochs=epochs, head_warmup_epochs=warm(head_epochs), warmup_epochs=warm(epochs),
        batch_size=gb // world, lr=(4e-4 if mim else 1e-4) if big else 4e-3 if mim else 2e-3,  # small: the same
        head_lr=(2e-4 if mim else 1e-4) if big else 4e-3 if mim else 2e-3,  # peak (MAE-CT counts both views)
        layer_decay=0.65 if big else 1.0, topk=topk, temperature=tau, head_temperature=tau if mim else 0.15,
        # whole global batches, at least top-k entries, at most half the train set
        queue_size=min(65536 if big else 4096, max(gb * math.ceil(topk / gb), n_train // 2 // gb * gb)),
        proj_hidden=2048 if big else 512, proj_dim=256 if big else 128, pred_hidden=4096 if big else 1024,
        # EMA horizon 1/(1-m) steps << the run (0.99 leaves 45% of an 80-step run's EMA at the MAE): at most half
        ema_momentum=min(0.9999, max(0.95, 1 - 2 / (n_train // gb * epochs or 1))) if big else 0.95,
        target_momentum=0.995 if scale == "huge" else 0.99,  # of phase 2 (ImageNet: 0.9999)
        workers=10 if cfg.device != "cpu" and torch.cuda.is_available() else 0)


def resolve(cfg, vit, world: int, n_train: int):
    """A copy of refine.py's settings with every None replaced by the recipe's value; then checks."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed + (None,):
            raise UserError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}; use one of {list(allowed)}")
    r = dataclasses.replace(cfg, **{k: v for k, v in by_scale(cfg, vit, world, n_train).items()
                                    if getattr(cfg, k) is None})
    r.local_crops = r.local_crops if r.views == "multicrop" else 0
    r.heads = ",".join(map(str, parse_blocks(r.heads, vit.depth)))
    if r.method == "mae-ct" and r.local_crops:
        raise UserError("MAE-CT's loss pairs exactly two views; use --views crop-flip or --local-crops 0")
    if not 1 <= (gb := r.batch_size * world) <= n_train:
        raise UserError(f"the global batch ({gb}) must be positive and not larger than the data set "
                        f"({n_train} images); set --batch-size or raise --limit-train")
    if not 1 <= r.topk <= r.queue_size < n_train:
        raise UserError(f"need 1 <= --topk ({r.topk}) <= --queue-size ({r.queue_size}) < the train set "
                        f"({n_train} images); lower --queue-size or --topk")
    negative = [k for k in ("head_epochs", "epochs", "head_warmup_epochs", "warmup_epochs") if getattr(r, k) < 0]
    if negative:
        raise UserError(f"--{negative[0].replace('_', '-')} {getattr(r, negative[0])} is negative; give 0 or more")
    return r
