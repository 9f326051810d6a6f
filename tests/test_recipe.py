"""recipe.py against docs/METHOD.md §8: every scale and method resolves to the values the section states.

The first table (global batch, phase-2 epochs, temperature) is read from the document itself; the rest of the
section's rules are written out here, one assertion per row of its second table.
"""
import math
import os
import re
from types import SimpleNamespace

import pytest
from conftest import ROOT

import recipe
import refine

IMAGENET = 1_281_167
SIZES = {"base": (768, 12), "large": (1024, 24), "huge": (1280, 32), "2b": (2560, 24)}  # §8: width, depth


def section_8_batch_epochs_tau() -> dict:
    """{(scale, method): (global batch, phase-2 epochs, tau)} from the table of docs/METHOD.md §8."""
    with open(os.path.join(ROOT, "docs", "METHOD.md")) as f:
        text = f.read()
    section = text[text.index("## 8. Recipes"):text.index("## 9.")]
    table = {}
    for row in re.findall(r"^\| (base|large|huge|2b|small) \|(.*)\|$", section, flags=re.M):
        for method, cell in zip(("mim-refiner", "mae-ct"), row[1].split("|")):
            batch, epochs, tau = cell.split(",")[:3]
            table[row[0], method] = (int(batch), int(epochs), float(tau.split()[0]))
    return table


def encoder(scale: str, post_norm: bool = False):
    dim, depth = SIZES.get(scale, (128, 6))  # small: pretrain.py's tiny MAE
    patch, size = (4, 32) if scale == "small" else (16, 224)
    return SimpleNamespace(dim=dim, depth=depth, patch=patch, img_size=size, post_norm=post_norm)


def test_the_section_8_table_is_read_whole():
    table = section_8_batch_epochs_tau()
    assert len(table) == 10 and table["large", "mim-refiner"] == (1024, 30, 0.2)
    assert table["2b", "mae-ct"] == (512, 30, 0.35) and table["small", "mae-ct"] == (128, 6, 0.15)


@pytest.mark.parametrize("scale", ["base", "large", "huge", "2b", "small"])
@pytest.mark.parametrize("method", ["mim-refiner", "mae-ct"])
def test_resolved_recipe_is_section_8(scale, method):
    big, mim = scale != "small", method == "mim-refiner"
    world, n = (8, IMAGENET) if big else (1, 10_000)  # small: the embedded digits' 10k train images
    vit = encoder(scale)
    c = recipe.resolve(refine.Settings(method=method), vit, world, n)
    assert recipe.scale_of(vit, n)[0] == scale
    batch, epochs, tau = section_8_batch_epochs_tau()[scale, method]
    assert (c.batch_size * world, c.epochs, c.temperature) == (batch, epochs, tau)
    depth = vit.depth
    # heads: one per block of the last ceil(L/3) (huge: 21-32) for MIM-Refiner; block L for MAE-CT
    first = (21 if scale == "huge" else depth - math.ceil(depth / 3) + 1) if mim else depth
    assert c.heads == ",".join(map(str, range(first, depth + 1)))
    # frozen in phase 2: nothing (2b: 6 blocks; small: half) for MIM-Refiner; half for MAE-CT
    assert c.freeze_blocks == ((6 if scale == "2b" else 0) if mim and big else depth // 2)
    # views: 2 global + 10 local (small: no local); MAE-CT crop & flip (small: 2 BYOL global views)
    assert (c.views, c.local_crops) == (("multicrop", 10) if mim and big else ("crop-flip", 0) if big
                                        else ("multicrop", 0))
    assert c.head_epochs == (20 if big else 1)
    assert (c.head_lr, c.lr) == ((2e-4, 4e-4) if mim else (1e-4, 1e-4)) if big else (
        (4e-3, 4e-3) if mim else (2e-3, 2e-3))
    # warm-up: 4 epochs for MIM-Refiner (small: 20%), 20% of each phase for MAE-CT
    assert (c.head_warmup_epochs, c.warmup_epochs) == ((4.0, 4.0) if mim and big else
                                                       (0.2 * c.head_epochs, 0.2 * c.epochs))
    assert c.head_temperature == (tau if mim else 0.15)
    assert c.queue_size == (65536 if big else 4096)  # half the train set is more than either
    assert (c.proj_hidden, c.proj_dim, c.pred_hidden) == ((2048, 256, 4096) if big else (512, 128, 1024))
    assert c.ema_momentum == (0.9999 if big else 0.95)  # ImageNet: the papers' m
    assert c.target_momentum == (0.995 if scale == "huge" else 0.99)
    # by scale too: layer decay, top-k, global crops, jitter, neighbours
    assert (c.layer_decay, c.topk, c.jitter, c.neighbours) == ((0.65, 20, 1.0, "all") if big else
                                                               (1.0, 5, 2.0, "refine"))
    assert c.global_crop_min == ((0.25 if mim else 0.08) if big else 0.3)
    assert c.local_size == (96 if big else 16) and c.global_size == vit.img_size  # 96 px at 224


@pytest.mark.parametrize("scale", ["base", "large", "huge", "2b"])
def test_post_norm_encoders_refine_20_epochs_with_mim_refiner(scale):
    """§8: 20 phase-2 epochs for post-norm (data2vec 2.0) models that are not small; MAE-CT keeps its table."""
    vit = encoder(scale, post_norm=True)
    assert recipe.resolve(refine.Settings(), vit, 8, IMAGENET).epochs == 20
    mae_ct = section_8_batch_epochs_tau()[scale, "mae-ct"][1]
    assert recipe.resolve(refine.Settings(method="mae-ct"), vit, 8, IMAGENET).epochs == mae_ct
