"""What the stages read: the data sets behind `--data`, their transforms and loaders, and feature files.

The jittered digits (digits.py) or a folder of images (ImageFolder, or unlabelled for the trainers); the transforms;
loader settings and the trainers' sampler of (epoch, index) keys; a feature file (--load-features), checked."""
import os
import signal
import sys
import threading

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from model import UserError, read_checkpoint
from util.digits import JitteredDigits

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_dataset(data: str, split: str, transform=None, labels: bool = True) -> Dataset:
    """The `split` ('train' or 'val') of `--data`; the result has `.targets` and `.classes`.

    labels=False (the trainers, which read train/ only): also a folder of images without classes, in train/ or not."""
    if data.startswith("jittered-digits"):  # jittered-digits[:select|:report]: which glyphs evaluate
        part = data.partition(":")[2] or "val"
        if part not in ("val", "select", "report"):
            raise UserError(f"--data {data}: give jittered-digits, jittered-digits:select or jittered-digits:report")
        return JitteredDigits(part if split == "val" else split, transform=transform)
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
    """The sampler of a trainer's one DataLoader: this rank's (epoch, index) keys, one epoch at a time.

    One loader serves the whole run, so that its workers persist; they read the epoch from the key, as they never see
    attributes changed in the main process. `start(epoch, skip)`: `indices` (the images that train) in a (seed, epoch)
    order split over the ranks as DistributedSampler does, less the first `skip` (those a resumed run has seen)."""

    def __init__(self, indices=(), world: int = 1, rank: int = 0, seed: int = 0):
        self.indices, self.keys = list(indices), []
        self.order = DistributedSampler(self.indices, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.per_rank = len(self.order)  # images per rank and epoch

    def start(self, epoch: int, skip: int = 0):
        self.order.set_epoch(epoch)
        self.keys = [(epoch, self.indices[j]) for j in list(self.order)[skip:]]  # (per_rank - skip,)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def key_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of image i's random draws in epoch e of a run seeded `seed` (trainers' augmentations)."""
    return (seed * 100_000 + epoch) * 10**8 + i


class Seeded(Dataset):
    """Key (epoch, i) -> (transform(image i), i), torch's CPU generator seeded by key_seed(seed, epoch, i).

    What a step sees depends on the step alone, not the workers, world size or a resume; the caller's RNG is kept."""

    def __init__(self, data, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key_seed(self.seed, epoch, i))
            return self.transform(self.data[i][0].convert("RGB")), i


def quiet_worker(_):
    """DataLoader worker_init_fn: signals are for the main process, which checkpoints first.

    A terminal and SLURM signal every process: SIGINT and SIGUSR1 are ignored, SIGTERM obeyed from the parent alone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        def wait():
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
                pass
            os._exit(0)  # what torch's own handler does on its parent's SIGTERM
        threading.Thread(target=wait, daemon=True).start()


def train_transform(img_size: int, crop_min: float = 0.08):
    """The probe's and fine-tuning's train augmentation: RandomResizedCrop (area crop_min..1, bicubic), flip."""
    from torchvision import transforms as T  # here: its import costs seconds that only training needs
    return T.Compose([T.RandomResizedCrop(img_size, (crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_feature_file(path: str, splits, feature: str = "unknown", warn: bool = True) -> dict:
    """A feature file (docs/METHOD.md §11, --save-features writes it) -> its dict, checked.

    Every `{split}_features` ((N, D) of any float dtype, or {block: (N, D)}) becomes {block: (N, D) float32}, every
    `{split}_labels` (N,) int64. What it does not record is taken as `feature` (the --feature flag) and block 'given',
    with one warning line on stderr."""
    obj = read_checkpoint(path, "feature file", "write one with --save-features")
    need = [f"{s}_{w}" for s in splits for w in ("features", "labels")]
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        raise UserError(f"feature file {path!r} lacks some of {need}; write it with --save-features")
    bare = any(torch.is_tensor(obj[f"{s}_features"]) for s in splits)
    said = [f"feature {feature!r}"] * ("feature" not in obj) + ["block 'given'"] * (bare and not obj.get("blocks"))
    obj.setdefault("feature", feature)
    for s in splits:
        f, y = obj[f"{s}_features"], obj[f"{s}_labels"]
        f = {(obj.get("blocks") or ["given"])[0]: f} if torch.is_tensor(f) else f  # one block
        if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise UserError(f"feature file {path!r}: {s}_labels must be one integer label per row, (N,) int8..int64")
        if not isinstance(f, dict) or not f or not len(y) or (y < 0).any():
            raise UserError(f"feature file {path!r}: {s}_features must be an (N, D) tensor or {{block: (N, D) "
                            f"tensor}}, with N >= 1 labels 0, 1, ... in {s}_labels")
        obj[f"{s}_features"] = {b: check_rows(path, f"{s}_features", b, t, len(y)) for b, t in f.items()}
        obj[f"{s}_labels"] = y.long()
    widths = [{b: t.shape[1] for b, t in obj[f"{s}_features"].items()} for s in splits]
    if any(w != widths[0] for w in widths):  # the same blocks, as wide, in every split
        raise UserError(f"feature file {path!r}: the blocks or widths of {' and '.join(splits)} features differ ("
                        f"{' vs '.join(map(str, widths))}, block: width); extract them with the same encoder")
    if said and warn:
        print(f"warning: feature file {path} does not record its {' or '.join(w.split()[0] for w in said)}: "
              f"taken as {', '.join(said)}", file=sys.stderr)
    return obj


def check_rows(path: str, name: str, block, t, rows: int) -> torch.Tensor:
    """One block's (N, D) features of a feature file as float32, refused unless finite with one row per label."""
    if not torch.is_tensor(t) or t.dim() != 2 or not t.shape[1] or not t.is_floating_point():
        raise UserError(f"feature file {path!r}: {name} of block {block!r} must be an (N, D) float tensor")
    if len(t) != rows:
        raise UserError(f"feature file {path!r}: {name} of block {block!r} has {len(t)} rows for {rows} labels")
    t = t.float()
    if not all(torch.isfinite(v) for v in torch.aminmax(t)):  # NaN propagates to both, an infinity to one
        raise UserError(f"feature file {path!r}: {name} of block {block!r} holds NaN or infinite values")
    return t
