"""The labelled part of a train set: seeded draws of n images or a percentage of every class, the
MSN/SimCLRv2 split files the papers use, the low-shot classifier fitted on frozen features of such a
part (probe.py --shots), and the RandomResizedCrop (bicubic) + flip that trains on images (probe.py
--augment, finetune.py). Importing it has no side effects."""
import os

import numpy as np
import torch.nn.functional as F

from common import parse_ints
from data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
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


def lowshot_accuracy(train_x, train_y, val_x, val_y) -> float:
    """Eq. (22) of docs/METHOD.md: the low-shot classifier, logistic regression with L2 penalty
    lambda = 2.5e-4 / N (scikit-learn C = 1 / (lambda N) = 4000), no intercept, fitted on train rows
    each centred on its own scalar mean over its D features, then L2-normalised (cyanure's
    preprocess(centering=True, normalize=True, columns=False), as in both papers' code); the
    validation rows are scored as they are, as there (a row's scale never changes its argmax)."""
    from sklearn.linear_model import LogisticRegression
    x = train_x.double()
    x = F.normalize(x - x.mean(1, keepdim=True), dim=1)  # (N, D): each row its own mean and norm
    clf = LogisticRegression(C=4000, fit_intercept=False, max_iter=1000).fit(x.numpy(), train_y.numpy())
    return float((clf.predict(val_x.double().numpy()) == val_y.numpy()).mean())


def lowshot(cfg, feats) -> list:
    y, records = feats["train_labels"], []
    draws = [("shots", s, seed, draw_split(y, seed, shots=s))
             for s in (parse_ints(cfg.shots, "--shots") if cfg.shots else []) for seed in range(cfg.splits)]
    draws += [("percent", cfg.percent, seed, draw_split(y, seed, percent=cfg.percent))
              for seed in range(cfg.splits) if cfg.percent > 0]
    if cfg.split_file:  # the image paths of an ImageFolder (not of the feature file)
        draws.append(("split_file", cfg.split_file, 0, split_file_indices(cfg.split_file, cfg.data, len(y))))
    for b in feats["blocks"]:
        x, vx = feats["train_features"][b], feats["val_features"][b]
        runs = {}
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
