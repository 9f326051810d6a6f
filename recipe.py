"""The refinement's hyperparameters by encoder size (docs/METHOD.md §8).

Table rows, the papers' and ours for small encoders on CPUs; a refine.py setting left at None takes `by_scale`'s."""
import dataclasses
import math
from collections import namedtuple

import torch

import model
from model import UserError
from util.common import parse_blocks

# docs/METHOD.md §8, a row per scale and method. batch: global (at most 1/32 of the train set, but small); head_*:
# phase 1; lr per 256 images (MAE-CT: 128, both views); warmup in epochs (None: 20% of a phase); crop: least area of
# the global crops; frozen: in phase 2 (half: L // 2). Ours: base MIM-Refiner, 2b MAE-CT, small (`make demo`, 2 cores).
Recipe = namedtuple("Recipe", "batch epochs tau head_tau lr head_lr warmup crop frozen views")
RECIPES = {  #                       batch epochs tau   head_tau lr    head_lr warmup crop  frozen  views
    ("base", "mim-refiner"):  Recipe(1024, 30,    0.2,  0.2,     4e-4, 2e-4,   4.0,   0.25, 0,      "multicrop"),
    ("large", "mim-refiner"): Recipe(1024, 30,    0.2,  0.2,     4e-4, 2e-4,   4.0,   0.25, 0,      "multicrop"),
    ("huge", "mim-refiner"):  Recipe(512,  30,    0.3,  0.3,     4e-4, 2e-4,   4.0,   0.25, 0,      "multicrop"),
    ("2b", "mim-refiner"):    Recipe(512,  20,    0.35, 0.35,    4e-4, 2e-4,   4.0,   0.25, 6,      "multicrop"),
    ("small", "mim-refiner"): Recipe(128,  6,     0.2,  0.2,     4e-3, 4e-3,   None,  0.3,  "half", "multicrop"),
    ("base", "mae-ct"):       Recipe(1024, 20,    0.15, 0.15,    1e-4, 1e-4,   None,  0.08, "half", "crop-flip"),
    ("large", "mae-ct"):      Recipe(1024, 20,    0.2,  0.15,    1e-4, 1e-4,   None,  0.08, "half", "crop-flip"),
    ("huge", "mae-ct"):       Recipe(512,  30,    0.3,  0.15,    1e-4, 1e-4,   None,  0.08, "half", "crop-flip"),
    ("2b", "mae-ct"):         Recipe(512,  30,    0.35, 0.15,    1e-4, 1e-4,   None,  0.08, "half", "crop-flip"),
    ("small", "mae-ct"):      Recipe(128,  6,     0.15, 0.15,    2e-3, 2e-3,   None,  0.3,  "half", "multicrop"),
}
# By scale alone: the queue's cap (under it: whole global batches, >= top-k, <= half the data); projector hidden, z
# and predictor hidden widths; jitter x BYOL's; local crops, least area; neighbours: all phases or from "refine" on.
Size = namedtuple("Size", "layer_decay topk head_epochs queue widths jitter locals local_min neighbours m_t")
SIZES = {  #      layer_decay topk head_epochs queue  widths             jitter locals local_min neighbours m_t
    "base":  Size(0.65,       20,  20,         65536, (2048, 256, 4096), 1.0,   10,    0.05,     "all",     0.99),
    "large": Size(0.65,       20,  20,         65536, (2048, 256, 4096), 1.0,   10,    0.05,     "all",     0.99),
    "huge":  Size(0.65,       20,  20,         65536, (2048, 256, 4096), 1.0,   10,    0.05,     "all",     0.995),
    "2b":    Size(0.65,       20,  20,         65536, (2048, 256, 4096), 1.0,   10,    0.05,     "all",     0.99),
    "small": Size(1.0,        5,   1,          4096,  (512, 128, 1024),  2.0,   0,     0.25,     "refine",  0.99),
}
CHOICES = {"method": ("mim-refiner", "mae-ct"), "views": ("multicrop", "crop-flip"), "feature": ("cls", "mean"),
           "pairing": ("intended", "official"), "neighbours": ("all", "refine", "none"),
           "precision": ("auto", "bf16", "fp32")}


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

    MAE-CT: the last block; MIM-Refiner: the last ceil(depth / 3) blocks (ViT-H/14: 21-32, twelve, as in the paper)."""
    if method == "mae-ct":
        return [depth]
    first = 21 if (dim, depth) == model.SIZES["huge"][:2] else depth - math.ceil(depth / 3) + 1
    return list(range(first, depth + 1))


def by_scale(cfg, vit, world: int, n_train: int) -> dict:
    """The recipe's value of every setting that has one, given what the command line fixed."""
    scale, _ = scale_of(vit, n_train)
    r, s, big, mim = RECIPES[scale, cfg.method], SIZES[scale], scale != "small", cfg.method == "mim-refiner"
    given = lambda k, default: default if getattr(cfg, k) is None else getattr(cfg, k)  # noqa: E731
    batch = min(r.batch, 2 ** int(math.log2(max(1, n_train // 32)))) if big else r.batch  # >= 32 steps per epoch
    gb, g = given("batch_size", max(1, batch // world)) * world, given("global_size", vit.img_size)
    topk, head_epochs = given("topk", s.topk), given("head_epochs", s.head_epochs)
    epochs = given("epochs", 20 if mim and big and vit.post_norm else r.epochs)  # data2vec 2.0 (post-norm): 20
    warm = lambda ep: 0.2 * ep if r.warmup is None else r.warmup  # noqa: E731
    return dict(  # the rows' knobs as they stand, then what follows from them, the encoder and the data
        views=r.views, global_crop_min=r.crop, lr=r.lr, head_lr=r.head_lr, temperature=r.tau,
        head_temperature=r.head_tau, layer_decay=s.layer_decay, jitter=s.jitter, local_crops=s.locals,
        local_crop_min=s.local_min, neighbours=s.neighbours, proj_hidden=s.widths[0], proj_dim=s.widths[1],
        pred_hidden=s.widths[2], target_momentum=s.m_t, batch_size=gb // world, global_size=g, topk=topk,
        head_epochs=head_epochs, epochs=epochs, head_warmup_epochs=warm(head_epochs), warmup_epochs=warm(epochs),
        freeze_blocks=vit.depth // 2 if r.frozen == "half" else r.frozen,
        heads=",".join(map(str, head_blocks(cfg.method, vit.dim, vit.depth))),
        local_size=vit.patch * math.ceil(g * 96 / 224 / vit.patch),  # 96 px at 224, 98 for patch 14
        queue_size=min(s.queue, max(gb * math.ceil(topk / gb), n_train // 2 // gb * gb)),
        # EMA horizon 1/(1-m) steps << the run (0.99 leaves 45% of an 80-step run's EMA at the MAE): at most half
        ema_momentum=min(0.9999, max(0.95, 1 - 2 / (n_train // gb * epochs or 1))) if big else 0.95,
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
