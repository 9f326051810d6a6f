"""The embedded default data set, `--data jittered-digits`: handwritten digits under nuisance.

Nothing can be downloaded on a fresh machine, so the set is drawn from what scikit-learn ships:
its 1797 handwritten 8x8 digit glyphs. Each image is 32x32: one glyph, blown up to 14-26 px,
rotated by up to 25 degrees, sheared, placed anywhere it fits, in one grey level (0.6-1) on a flat
background of a darker one (0-0.4). The object is the digit; size, position, rotation and the two
grey levels are nuisance that dominates the pixels (k-NN on raw pixels is far below k-NN on the
glyphs themselves) and that a refinement's crops and brightness / contrast jitter randomise. One
polarity only: with both (dark on light and light on dark), a small masked-image model's nearest
neighbours always share the polarity, and a short refinement never undoes that split.

Glyphs 0-1296 make the train split and 1297-1796 the val split: no handwritten digit is in both. The
val glyphs are also cut into two glyph-disjoint halves with images of their own: `select` (1297-1546),
on which recipes are chosen (pilots), and `report` (1547-1796), on which the demo's numbers are reported
(`--data jittered-digits:select` / `jittered-digits:report` evaluate on them instead of val).
Image i of a split is drawn afresh from a generator seeded by (seed, split, i), each glyph used
equally often: the set is a pure function of its arguments, and its first n images do not depend
on the n asked for.
"""
import math

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

GLYPHS = {"train": (0, 1297), "val": (1297, 1797), "select": (1297, 1547), "report": (1547, 1797)}
SIZES = {"train": 10_000, "val": 2_000, "select": 2_000, "report": 2_000}
STREAM = {"val": 0, "train": 1, "select": 2, "report": 3}  # seeds each split's own draws


def draw(glyph: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One 8x8 glyph (values 0-16) -> a (size, size, 3) uint8 image under random pose and levels."""
    side = rng.uniform(14, 26) * size / 32  # the glyph's 8 px become `side` px
    angle, shear = math.radians(rng.uniform(-25, 25)), rng.uniform(-0.25, 0.25)
    reach = side / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))  # half the rotated box
    cx, cy = rng.uniform(min(reach, size / 2), max(size - reach, size / 2), 2)
    # output pixel (u, v) -> glyph pixel: undo the translation, rotation, shear and scale
    c, s, k = math.cos(angle), math.sin(angle), 8 / side
    a, b = k * c, k * (s + shear * c)
    d, e = -k * s, k * (c - shear * s)
    inverse = (a, b, 4 - a * cx - b * cy, d, e, 4 - d * cx - e * cy)
    alpha = Image.fromarray((glyph / 16).astype(np.float32), "F").transform(
        (size, size), Image.AFFINE, inverse, resample=Image.BILINEAR)
    alpha = np.clip(np.asarray(alpha) * 1.5, 0, 1)  # crisper strokes than the soft 8x8 scan
    bg, fg = rng.uniform(0, 0.4), rng.uniform(0.6, 1.0)  # a brighter digit on a darker background
    img = bg * (1 - alpha) + fg * alpha  # (size, size)
    return np.repeat(np.round(255 * img).astype(np.uint8)[..., None], 3, axis=2)


class JitteredDigits(Dataset):
    """`split` 'train' (10k images), 'val', 'select' or 'report' (2k each) of the set above; (PIL image, digit)."""

    def __init__(self, split="train", n=None, seed=0, size=32, transform=None):
        from sklearn.datasets import load_digits  # here: the import costs a second
        digits = load_digits()
        lo, hi = GLYPHS[split]
        n = n or SIZES[split]
        self.transform, self.classes = transform, [str(d) for d in range(10)]
        self.glyph_ids = np.arange(n) % (hi - lo) + lo  # each glyph used equally often
        self.targets = [int(digits.target[g]) for g in self.glyph_ids]
        self.images = np.stack([draw(digits.images[g], np.random.default_rng([seed, STREAM[split], i]), size)
                                for i, g in enumerate(self.glyph_ids)])  # (n, size, size, 3) uint8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]
