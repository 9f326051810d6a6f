"""What every stage script shares: settings from the command line, distributed set-up, the data
sets behind `--data`, feature extraction, and checkpoint files. Importing it has no side effects."""
import argparse
import dataclasses
import json
import os
import random
import sys
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from model import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Settings: a typed dataclass is the single source of flags, defaults and help.

def opt(default, help: str):
    """A settings field with its --help text."""
    return field(default=default, metadata={"help": help})


def parse_settings(cls, argv=None):
    """Dataclass -> argparse: `batch_size` becomes `--batch-size`, booleans `--x/--no-x`."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if typing.get_origin(typ) is typing.Union:  # Optional[X] -> X
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        kw = dict(default=f.default, help=f"{f.metadata.get('help', '')} (default: {f.default})")
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=typ, **kw)
    return cls(**vars(p.parse_args(argv)))


def cli(main, cls):
    """Run main(settings) from the command line; user errors become one line on stderr, exit 2."""
    try:
        main(parse_settings(cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        teardown_distributed()


# ---------------------------------------------------------------------------------------------
# Distributed: a process group only under torchrun / srun (RANK and WORLD_SIZE set).

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(),
                torch.device("cuda", local) if cuda else torch.device("cpu"))


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, rank order; with grad=True the
    backward pass sends each rank the gradient of its own rows (summed over ranks)."""
    if world_size() == 1:
        return x
    if grad:
        from torch.distributed.nn.functional import all_gather as all_gather_grad
        return torch.cat(all_gather_grad(x.contiguous()), dim=0)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


# ---------------------------------------------------------------------------------------------
# Data: `--data cluttered-digits` (SPEC §9) or a folder with train/ and val/ in ImageFolder layout.

class ClutteredDigits(Dataset):
    """Digit glyphs (sklearn's 8x8 digits) pasted on crops of sklearn's two sample photos.

    Glyphs 0-1296 make the train split, 1297-1796 the val split, so no glyph is in both. Every
    composite is drawn from a generator seeded by (seed, split, index): the set is a pure function
    of its arguments. Images are 32x32 RGB; the label is the digit.
    """

    N_TRAIN_GLYPHS = 1297

    def __init__(self, split="train", n=None, seed=0, size=32, transform=None):
        from sklearn.datasets import load_digits, load_sample_images
        digits = load_digits()
        lo, hi = (0, self.N_TRAIN_GLYPHS) if split == "train" else (self.N_TRAIN_GLYPHS, 1797)
        glyphs, labels = digits.images[lo:hi] / 16.0, digits.target[lo:hi]
        photos = load_sample_images().images
        n = n or (4 if split == "train" else 2) * len(glyphs)
        self.transform, self.classes = transform, [str(d) for d in range(10)]
        self.glyph_ids = np.arange(n) % len(glyphs) + lo  # each glyph used equally often
        self.targets = [int(labels[g - lo]) for g in self.glyph_ids]
        imgs = np.empty((n, size, size, 3), dtype=np.uint8)
        for i in range(n):
            rng = np.random.default_rng([seed, int(split == "train"), i])
            photo = photos[rng.integers(len(photos))]
            crop = int(rng.integers(size, min(photo.shape[:2]) // 2))  # random scale of background
            y, x = rng.integers(photo.shape[0] - crop), rng.integers(photo.shape[1] - crop)
            bg = Image.fromarray(photo[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR)
            bg = np.asarray(bg, dtype=np.float64)
            g = int(rng.integers(12, 21))  # glyph side in pixels
            alpha = Image.fromarray(glyphs[self.glyph_ids[i] - lo].astype(np.float32))
            alpha = np.clip(np.asarray(alpha.resize((g, g), Image.BILINEAR)), 0, 1)[..., None]
            colour = rng.integers(0, 256, 3).astype(np.float64)
            gy, gx = rng.integers(0, size - g + 1, 2)
            patch = bg[gy:gy + g, gx:gx + g]
            bg[gy:gy + g, gx:gx + g] = patch * (1 - alpha) + colour * alpha
            imgs[i] = np.round(bg).astype(np.uint8)
        self.images = imgs

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def build_dataset(data: str, split: str, transform=None) -> Dataset:
    """The `split` ('train' or 'val') of `--data`; the result has `.targets` and `.classes`."""
    if data == "cluttered-digits":
        return ClutteredDigits(split, transform=transform)
    root = os.path.join(data, split)
    if not os.path.isdir(data):
        raise UserError(f"data folder {data!r} does not exist; give --data cluttered-digits "
                        f"or a folder with train/ and val/ in ImageFolder layout")
    if not os.path.isdir(root):
        raise UserError(f"{data!r} has no {split}/ folder; an ImageFolder data set needs "
                        f"train/ and val/, each with one folder per class")
    try:
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. an empty class folder
        raise UserError(f"cannot use {root!r}: {str(e).splitlines()[0]}; every class folder "
                        f"needs at least one image") from None


def eval_transform(img_size: int):
    """Resize the shorter side to img_size*256/224 (bicubic), centre crop, ImageNet mean/std."""
    return transforms.Compose([
        transforms.Resize(int(img_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader_kwargs(device: torch.device, workers: int) -> dict:
    return dict(num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)


# ---------------------------------------------------------------------------------------------
# Features for the evaluation scripts.

def pool(vit, tokens, feature: str):
    """One block's tokens (B, 1+N, D) -> (B, D): cls, cls-norm (after the final norm) or mean."""
    if feature == "cls":
        return tokens[:, 0]
    if feature == "cls-norm":
        return vit.final_norm(tokens)[:, 0]
    if feature == "mean":
        return tokens[:, 1:].mean(1)
    raise UserError(f"unknown --feature {feature!r}; use cls, cls-norm or mean")


@torch.inference_mode()
def extract_features(vit, dataset, blocks, feature="cls", batch_size=256, device="cpu",
                     workers=0, desc="features"):
    """{block: (N, D) float32 CPU} and labels (N,), rows in dataset order. Under torchrun each
    rank embeds every world-th image (the list padded to a multiple of the world size) and the
    shards are gathered back and interleaved."""
    device = torch.device(device)
    rank, world = (dist.get_rank(), world_size()) if world_size() > 1 else (0, 1)
    n = len(dataset)
    order = list(range(n)) + list(range(n))[: (-n) % world]  # pad so every rank has as many
    shard = Subset(dataset, order[rank::world])
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, **loader_kwargs(device, workers))
    vit = vit.to(device).eval()
    feats = {b: [] for b in blocks}
    labels = []
    for x, y in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            outs = vit.forward_blocks(x.to(device, non_blocking=True), blocks)
        for b, t in zip(blocks, outs):
            feats[b].append(pool(vit, t, feature).float())
        labels.append(y.to(device))

    def gather(parts):  # (n_shard, ...) per rank -> (n, ...) in dataset order
        local = torch.cat(parts)
        full = all_gather(local)  # (world * n_shard, ...), rank-major
        full = full.reshape(world, -1, *local.shape[1:]).transpose(0, 1)  # (n_shard, world, ...)
        return full.reshape(-1, *local.shape[1:])[:n].cpu()

    return {b: gather(f) for b, f in feats.items()}, gather(labels)


def parse_blocks(spec: str, depth: int) -> list:
    """'last' | 'all' | '18,20,24' | '17-24' -> sorted block numbers within 1..depth."""
    if spec == "last":
        return [depth]
    if spec == "all":
        return list(range(1, depth + 1))
    try:
        out = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"cannot read --blocks {spec!r}; use last, all, a list 18,20,24 "
                        f"or a range 17-24") from None
    bad = [b for b in sorted(out) if not 1 <= b <= depth]
    if bad:
        raise UserError(f"--blocks {spec}: block {bad[0]} does not exist (the model has blocks 1..{depth})")
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Files.

def save_atomic(obj, path: str):
    """torch.save to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str, obj):
    if os.path.isdir(path):
        raise UserError(f"--out {path!r} is a folder; give a file name such as results.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def rng_state() -> dict:
    """Every random generator a run draws from, as tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
