"""Which labelled train images a low-shot run sees: seeded draws of n per class or a percentage, or a split file.

probe.py's 1/2/5-shot and 1% protocols and finetune.py's labelled subset (docs/METHOD.md §11)."""
import os

import numpy as np

from model import UserError
from util.common import parse_ints
from util.data import build_dataset


def draw_split(labels, seed: int, shots: int = 0, percent: float = 0.0) -> np.ndarray:
    """Sorted indices of `shots` images of every class, or `percent`% of them (at least one); the same for a seed."""
    labels, rng, out = np.asarray(labels), np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = shots or max(1, round(len(idx) * percent / 100))
        if n > len(idx):
            raise UserError(f"class {c} has only {len(idx)} train images, fewer than --shots {n}")
        out.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(out))


def lowshot_draws(labels, shots: str, percent: float, splits: int, split_file: str, data: str) -> list:
    """The low-shot draws (kind, value, seed, indices): --shots, --percent with seeds 0..splits-1, then --split-file."""
    draws = [("shots", s, seed, draw_split(labels, seed, shots=s))
             for s in (parse_ints(shots, "--shots") if shots else []) for seed in range(splits)]
    draws += [("percent", percent, seed, draw_split(labels, seed, percent=percent)) for seed in range(splits)
              if percent > 0]
    return draws + ([("split_file", split_file, 0, split_file_indices(split_file, data, len(labels)))]
                    if split_file else [])


def read_split_file(path: str, n: int, samples=None, root: str = "") -> np.ndarray:
    """Indices of the train images in an MSN/SimCLRv2 split file: one file name, path or bare index a line."""
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
    """read_split_file against --data's train images (indices for jittered-digits); `dataset` if built already."""
    if dataset is None and not data.startswith("jittered-digits"):
        dataset = build_dataset(data, "train")
    return read_split_file(path, n, getattr(dataset, "samples", None), getattr(dataset, "root", ""))
