"""What every stage script shares: settings from the command line, distributed set-up, the data
sets behind `--data`, checkpoint files, and the feature extraction of the evaluation stages.
Importing it has no side effects."""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import typing
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from digits import JitteredDigits
from model import UserError, load_encoder, read_checkpoint
from runfiles import rng_state, save_atomic, set_rng_state, trim_log  # noqa: F401 (moved there)
from runguard import quiet_worker

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- Settings: one typed dataclass per script is the single source of flags, defaults, help ---

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
    except UserError as e:  # from a data-loader worker the message comes wrapped: keep its last line
        print("error:", str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1], file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    finally:
        teardown_distributed()


# --- Distributed: a process group only under torchrun / srun (RANK and WORLD_SIZE set) ---

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    main = property(lambda self: self.rank == 0)  # rank 0 alone prints and writes files


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
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"))


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


# --- Data: `--data jittered-digits` (digits.py, embedded) or a folder with train/ and val/ (ImageFolder) ---

def build_dataset(data: str, split: str, transform=None, labels: bool = True) -> Dataset:
    """The `split` ('train' or 'val') of `--data`; the result has `.targets` and `.classes`. labels=False
    (the trainers, which read train/ only): also a folder of images without classes, with or without train/."""
    if data == "jittered-digits":
        return JitteredDigits(split, transform=transform)
    from torchvision import datasets  # here: torchvision's import costs seconds
    root = os.path.join(data, split)
    if not os.path.isdir(data):
        raise UserError(f"data folder {data!r} does not exist; give --data jittered-digits, a folder with "
                        f"train/ and val/ in ImageFolder layout" + (" or a folder of images" if not labels else ""))
    if not labels:  # class folders (ImageFolder, as before) or any images below
        root = root if os.path.isdir(root) else data
        if not any(e.is_dir() for e in os.scandir(root)):
            return ImageList(root)
    else:
        classes = {}
        for s in ("train", "val"):  # both checked up front: fail before minutes of work, not after
            if not os.path.isdir(os.path.join(data, s)):
                raise UserError(f"{data!r} has no {s}/ folder; an ImageFolder data set needs "
                                f"train/ and val/, each with one folder per class")
            classes[s] = {e.name for e in os.scandir(os.path.join(data, s)) if e.is_dir()}
        if classes["train"] != classes["val"]:  # else every label after a missing class would shift
            raise UserError(f"train/ and val/ of {data!r} hold other classes (only in train/: "
                            f"{sorted(classes['train'] - classes['val'])[:5]}, only in val/: "
                            f"{sorted(classes['val'] - classes['train'])[:5]}); give both the same class folders")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. an empty class folder
        raise UserError(f"cannot use {root!r}: {str(e).splitlines()[0]}; every class folder "
                        f"needs at least one image") from None


class ImageList(Dataset):
    """The images in `root`, sorted by name, unlabelled (target -1): a trainer's --data without classes."""

    def __init__(self, root: str):
        from torchvision.datasets.folder import IMG_EXTENSIONS
        self.samples = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
        self.root, self.classes, self.targets = root, [], [-1] * len(self.samples)
        if not self.samples:
            raise UserError(f"{root!r} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); give a folder "
                            f"of images or --data jittered-digits")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return read_image(self.samples[i]), -1


def read_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path!r} ({type(e).__name__}); remove or replace the file") from None


def eval_transform(img_size: int):
    """Resize the shorter side to img_size*256/224 (bicubic), centre crop, ImageNet mean/std."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(int(img_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader_kwargs(device: torch.device, workers: int) -> dict:
    """workers < 0: by the cores this process may use, at most 4 (PyTorch warns above the cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers if workers >= 0 else min(4, cores - 1)
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                worker_init_fn=quiet_worker)


class EpochKeys:
    """The sampler of a trainer's one DataLoader, so that its workers live through the whole run:
    set `keys` to this epoch's (epoch, index) pairs before iterating. The data set reads the epoch
    from the key, as persistent workers never see attributes changed in the main process."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Eq. (14) of docs/METHOD.md: per-step lr of MAE and the refinement, linear warm-up to `peak` over
    `warmup` steps, then half a cosine down to `floor` at step `steps` (step 0 already trains)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


# --- Files ---

def all_finite(module) -> bool:
    """Checked before every checkpoint write, so a diverged update never overwrites a good file."""
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def write_json(path: str, obj):
    if os.path.isdir(path):
        raise UserError(f"--out {path!r} is a folder; give a file name such as results.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- Evaluation stages: shared flags, features from a checkpoint or a feature file, the report ---

@dataclass
class FeatureSettings:
    """The flags of every evaluation stage; each stage's Settings adds its own."""
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "encoder checkpoint, any layout of docs/METHOD.md §9")
    weights: str = opt("ema", "which encoder of a refine.py checkpoint: ema or online")
    num_heads: int = opt(0, "attention heads of --ckpt; 0 = as the file stores them, else by width (768: 12, "
                            "1024: 16, 1280: 16, 2560: 32, otherwise width // 64): check the printed architecture")
    data: str = opt("jittered-digits", "jittered-digits, or a folder with train/ and val/ (ImageFolder)")
    img_size: Optional[int] = opt(None, "input resolution (default: the checkpoint's)")
    blocks: str = opt("last", "blocks to evaluate: last, all, a list 18,20,24 or a range 17-24")
    concat: bool = opt(False, "evaluate the chosen blocks concatenated into one feature")
    feature: str = opt("cls", "cls (block output, no final norm), cls-norm (after the final norm) "
                              "or mean (of the patch tokens); cls+mean, cls-norm+mean: with the mean appended")
    batch_size: int = opt(256, "images per extraction batch, per process")
    workers: int = opt(-1, "data-loading processes per process; -1 = by the cores available (at most 4)")
    device: str = opt("auto", "auto, cpu or cuda")
    out: Optional[str] = opt(None, "also write the results as JSON to this file")
    save_features: Optional[str] = opt(None, "save the extracted features to this file")
    load_features: Optional[str] = opt(None, "read the features from this file (the model is not run)")


def parse_ints(spec: str, flag: str) -> list:
    """'10,20' -> [10, 20]; every value must be a positive integer."""
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UserError(f"cannot use {flag} {spec!r}; give positive integers such as 10,20")
    return vals


def parse_blocks(spec: str, depth: int) -> list:
    """'last' | 'all' | '18,20,24' | '17-24' -> sorted block numbers within 1..depth."""
    if spec in ("last", "all"):
        return [depth] if spec == "last" else list(range(1, depth + 1))
    try:
        out = sorted({b for part in spec.split(",") for lo, _, hi in [part.partition("-")]
                      for b in range(int(lo), int(hi or lo) + 1)})
    except ValueError:
        raise UserError(f"cannot read --blocks {spec!r}; use last, all, a list 18,20,24 or a range 17-24") from None
    bad = [b for b in out if not 1 <= b <= depth] or ([] if out else ["none"])
    if bad:
        raise UserError(f"--blocks {spec}: block {bad[0]} does not exist (the model has blocks 1..{depth})")
    return out


def load_model(cfg):
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: give a positive number")
    return load_encoder(cfg.ckpt, heads=cfg.num_heads or None, weights=cfg.weights, img_size=cfg.img_size)


def pool(vit, tokens, feature: str):
    """One block's tokens (B, 1+N, D) -> (B, D): cls, cls-norm (after the final norm) or mean; with
    '+mean' appended, (B, 2D): that feature, then the mean of the patch tokens (probe.py's grid)."""
    if feature in ("cls+mean", "cls-norm+mean"):
        return torch.cat([pool(vit, tokens, feature[:-5]), tokens[:, 1:].mean(1)], dim=1)
    if feature == "mean":
        return tokens[:, 1:].mean(1)
    if feature not in ("cls", "cls-norm"):
        raise UserError(f"unknown --feature {feature!r}; use cls, cls-norm, mean, cls+mean or cls-norm+mean")
    return (vit.final_norm(tokens) if feature == "cls-norm" else tokens)[:, 0]


@torch.inference_mode()
def extract_features(vit, dataset, blocks, feature="cls", batch_size=256, device="cpu",
                     workers=0, desc="features"):
    """{block: (N, D) float32 CPU} and labels (N,), rows in dataset order. Under torchrun each
    rank embeds every world-th image (the list padded to a multiple of the world size) and the
    shards are gathered back and interleaved."""
    device, world = torch.device(device), world_size()
    rank, n = (dist.get_rank() if world > 1 else 0), len(dataset)
    order = list(range(n)) + list(range(n))[: (-n) % world]  # pad so every rank has as many
    loader = DataLoader(Subset(dataset, order[rank::world]), batch_size=batch_size,
                        **loader_kwargs(device, workers))
    vit = vit.to(device).eval()
    feats, labels = {b: [] for b in blocks}, []
    bar = {"disable": True} if rank else {}  # rank 0: tqdm's default, so TQDM_DISABLE=1 silences it
    for x, y in tqdm(loader, desc=desc, leave=False, **bar):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            outs = vit.forward_blocks(x.to(device, non_blocking=True), blocks)
        for b, t in zip(blocks, outs):
            feats[b].append(pool(vit, t, feature).float())
        labels.append(y.to(device, non_blocking=True))

    def gather(parts):  # (n_shard, ...) per rank -> (n, ...) in dataset order
        local = torch.cat(parts)
        full = all_gather(local).reshape(world, -1, *local.shape[1:])  # (world, n_shard, ...)
        return full.transpose(0, 1).reshape(-1, *local.shape[1:])[:n].cpu()  # interleave ranks

    return {b: gather(f) for b, f in feats.items()}, gather(labels).long()


def get_features(cfg, d, splits=("train", "val"), keep_classes=None, vit=None) -> dict:
    """The feature-file dict of `splits`, read from --load-features or extracted from --ckpt (and
    then written to --save-features), with each `{split}_features` as {block: (N, D) float32}
    for the --blocks asked (one concatenated entry under --concat); `blocks` lists the keys.
    keep_classes: class names whose rows are kept (ImageNet subsets)."""
    if cfg.load_features and cfg.save_features:
        raise UserError("give either --load-features or --save-features, not both")
    if cfg.load_features:
        feats = read_feature_file(cfg.load_features, splits)
        for k in ("ckpt", "weights", "data", "feature"):  # the results describe the file, not the flags
            setattr(cfg, k, feats.get(k, cfg.data if k == "data" else None))
        cfg.img_size, cfg.num_heads = (feats.get("arch") or {}).get("img_size"), (feats.get("arch") or {}).get("heads")
        if d.main:
            print(f"features of {cfg.load_features}: {cfg.ckpt or 'checkpoint not recorded'} on {cfg.data}, "
                  f"feature {cfg.feature}, encoder {feats.get('arch') or 'not recorded'}")
        avail = list(feats[f"{splits[0]}_features"])  # block numbers; 'file' for a bare one-block file
        ints = [b for b in avail if isinstance(b, int)]
        blocks = (avail if cfg.blocks == "all" or (len(avail) == 1 and cfg.blocks == "last")
                  else parse_blocks(cfg.blocks, max(ints)) if ints else [cfg.blocks])
        if any(b not in avail for b in blocks):
            raise UserError(f"--blocks {cfg.blocks}: the feature file holds blocks {avail}; "
                            f"extract the others again with --save-features")
    else:
        vit = vit or load_model(cfg)
        if d.main:
            print(f"encoder of {cfg.ckpt}: {vit.arch()}, {vit.heads} heads {getattr(vit, 'heads_from', '')}")
        blocks = parse_blocks(cfg.blocks, vit.depth)
        feats = {"blocks": blocks, "feature": cfg.feature, "ckpt": cfg.ckpt, "weights": cfg.weights,
                 "data": cfg.data, "arch": vit.arch()}  # what the features are of
        for split in splits:
            ds = build_dataset(cfg.data, split, eval_transform(vit.img_size))
            feats["classes"] = list(ds.classes)
            if keep_classes:  # embed only the rows of the subset
                ds = Subset(ds, [i for i, t in enumerate(ds.targets) if ds.classes[t] in keep_classes])
            f, y = extract_features(vit, ds, blocks, cfg.feature, cfg.batch_size, d.device,
                                    cfg.workers, desc=f"{split} features")
            feats[f"{split}_features"], feats[f"{split}_labels"] = f, y
        if cfg.save_features and d.main:
            one = len(blocks) == 1  # one block: plain (N, D) tensors, a bare feature file
            save_atomic({k: (v[blocks[0]] if one and k.endswith("_features") else v)
                         for k, v in feats.items()}, cfg.save_features)
    if keep_classes:
        missing = [c for c in keep_classes if c not in feats.get("classes", [])]
        if missing:
            raise UserError(f"the data lacks the classes {missing[:5]} ({len(missing)} of {len(keep_classes)}); "
                            f"the subset needs a folder (or a feature file) with all of them")
        keep = torch.tensor([c in keep_classes for c in feats["classes"]])
        for s in splits:  # rows of other classes (from a loaded file) dropped
            rows = keep[feats[f"{s}_labels"]]
            feats[f"{s}_features"] = {b: t[rows] for b, t in feats[f"{s}_features"].items()}
            feats[f"{s}_labels"] = feats[f"{s}_labels"][rows]
    for s in splits:
        feats[f"{s}_features"] = select_blocks(feats[f"{s}_features"], blocks, cfg.concat)
    feats["blocks"] = list(feats[f"{splits[0]}_features"])
    return feats


def select_blocks(f: dict, blocks: list, concat: bool) -> dict:
    """{block: (N, D)} -> the chosen blocks as float32, or under --concat one entry
    {'b1+b2+...': (N, D1 + D2 + ...)}."""
    f = {b: f[b].float() for b in blocks}
    if concat and len(blocks) > 1:
        f = {"+".join(map(str, blocks)): torch.cat(list(f.values()), dim=1)}
    return f


def read_feature_file(path: str, splits) -> dict:
    """A --save-features file -> the same dict with `{split}_features` always {block: tensor}."""
    obj = read_checkpoint(path, "feature file", "write one with --save-features")
    need = [f"{s}_{w}" for s in splits for w in ("features", "labels")]
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        raise UserError(f"feature file {path!r} lacks some of {need}; write it with --save-features")
    for s in splits:
        f, y = obj[f"{s}_features"], obj[f"{s}_labels"]
        f = {(obj.get("blocks") or ["file"])[0]: f} if torch.is_tensor(f) else f  # one block
        if any(not torch.is_tensor(t) or t.dim() != 2 or len(t) != len(y) for t in f.values()):
            raise UserError(f"feature file {path!r}: {s}_features must be (N, D) tensors with one "
                            f"row per label; write it with --save-features")
        obj[f"{s}_features"], obj[f"{s}_labels"] = f, y.long()
    return obj


def report(cfg, d, records: list, title: str) -> dict:
    """Print the records as an aligned table and write --out (rank 0); returns the JSON dict."""
    result = {"results": records, "settings": dataclasses.asdict(cfg)}
    if d.main:
        cols = list(dict.fromkeys(k for r in records for k in r))
        cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        rows = [cols] + [[cell(r.get(c)) for c in cols] for r in records]
        width = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        print(title, *("  ".join(v.rjust(w) for v, w in zip(row, width)) for row in rows), sep="\n")
        if cfg.out:
            write_json(cfg.out, result)
    return result
