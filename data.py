"""The data sets behind `--data`: the embedded jittered digits (digits.py) or a folder of images
(ImageFolder with train/ and val/, or unlabelled images for the trainers); the evaluation
transform; data-loader settings and the trainers' sampler of (epoch, index) keys."""
import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from digits import JitteredDigits
from model import UserError
from runguard import quiet_worker

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def key_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of image i's random draws in epoch e of a run seeded `seed` (trainers' augmentations)."""
    return (seed * 100_000 + epoch) * 10**8 + i


class Seeded(Dataset):
    """Key (epoch, i) -> (transform(image i), i), the transform drawing from torch's CPU generator seeded by
    key_seed(seed, epoch, i): what a step sees depends on the step alone, not on the loader workers, the
    world size or a resume. The caller's generator is left as it was."""

    def __init__(self, data, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key_seed(self.seed, epoch, i))
            return self.transform(self.data[i][0].convert("RGB")), i
