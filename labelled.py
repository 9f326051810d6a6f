"""The labelled part of a train set and the augmentation that trains on it, shared by probe.py
(low-shot logistic regression, the linear probe's `--augment`) and finetune.py (the 1% protocol):
seeded draws of n images or a percentage of every class, the MSN/SimCLRv2 split files the papers
use, and RandomResizedCrop (bicubic) + flip. Importing it has no side effects."""
import os

import numpy as np

from common import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from model import UserError


def train_transform(img_size: int, crop_min: float = 0.08):
    """The probe's and fine-tuning's train augmentation (MAE, MAE-CT, MIM-Refiner): RandomResizedCrop
    (area crop_min..1, bicubic) + flip, ImageNet mean/std."""
    from torchvision import transforms as T  # here: its import costs seconds that only training needs
    return T.Compose([T.RandomResizedCrop(img_size, (crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def draw_split(labels, seed: int, shots: int = 0, percent: float = 0.0) -> np.ndarray:
    """Sorted indices of a labelled subset: exactly `shots` images of every class, or `percent`%
    of every class's images (at least one); the same draw for the same seed."""
    labels, rng, out = np.asarray(labels), np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = shots or max(1, round(len(idx) * percent / 100))
        if n > len(idx):
            raise UserError(f"class {c} has only {len(idx)} train images, fewer than --shots {n}")
        out.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(out))


def read_split_file(path: str, n: int, samples=None, root: str = "") -> np.ndarray:
    """Indices of the train images in an MSN/SimCLRv2 split file: one file name or path a line
    (n01440764_10026.JPEG); a bare number is an index (for jittered-digits)."""
    if not os.path.isfile(path):
        raise UserError(f"split file {path!r} does not exist; give a file with one image per line")
    index = {}  # file name and path under train/ -> index
    for i, (p, _) in enumerate(samples or []):
        index[os.path.basename(p)] = index[os.path.relpath(p, root)] = i
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    out = [index.get(ln, index.get(os.path.basename(ln), int(ln) if ln.isdigit() else -1)) for ln in lines]
    if bad := [ln for ln, i in zip(lines, out) if not 0 <= i < n]:  # neither a train image nor an index
        raise UserError(f"split file {path!r}: {bad[0]!r} is not a train image of --data; "
                        f"give file names of its train/ folder (or indices)")
    return np.array(sorted(set(out)))


def split_file_indices(path: str, data: str, n: int, dataset=None) -> np.ndarray:
    """read_split_file against the image paths of --data's train split (an ImageFolder; indices for
    jittered-digits); `dataset` when the caller has built it already."""
    if dataset is None and data != "jittered-digits":
        dataset = build_dataset(data, "train")
    return read_split_file(path, n, getattr(dataset, "samples", None), getattr(dataset, "root", ""))
