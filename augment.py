"""What a refinement trains on: its training images, and their views, image i of epoch e a pure
function of (seed, e, i).

Two recipes: crop-flip (MAE-CT's) and BYOL's multi-crop (MIM-Refiner's: two global views plus
local crops, colour jitter, grayscale, blur, solarisation). Views leave the loader as uint8 and are
normalised on the device (`to_input`): four times less to copy than float32.
"""
from functools import partial

import torch
from PIL import ImageFilter
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchvision import transforms as T

from data import IMAGENET_MEAN, IMAGENET_STD, JitteredDigits, build_dataset


def blur(img, lo: float, hi: float):
    """Gaussian blur, sigma uniform in (lo, hi); PIL's, as torchvision's takes ~50 ms per 32 px image."""
    return img.filter(ImageFilter.GaussianBlur(float(torch.empty(1).uniform_(lo, hi))))


def make_views(cfg) -> list:
    """Transforms, global views first: crop-flip (MAE-CT) or BYOL multicrop (MIM-Refiner: blur
    p 1.0 / 0.1 / 0.5 on global 1 / global 2 / local, solarize on global 2); uint8, see to_input.
    cfg: views, global_size, local_size, local_crops, global_crop_min, local_crop_min, jitter (x BYOL's)."""
    j = cfg.jitter
    bicubic = T.InterpolationMode.BICUBIC
    if cfg.views == "crop-flip":
        v = T.Compose([T.RandomResizedCrop(cfg.global_size, (cfg.global_crop_min, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.PILToTensor()])
        return [v, v]

    def byol(size, scale, blur_p, solarize_p):
        s = cfg.global_size / 224  # blur sigma 0.1-2.0 px at 224, scaled with the global side for every view
        return T.Compose([
            T.RandomResizedCrop(size, scale, interpolation=bicubic), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4 * j, 0.4 * j, 0.2 * j, min(0.5, 0.1 * j))], p=0.8),
            T.RandomGrayscale(0.2), T.RandomApply([T.Lambda(partial(blur, lo=0.1 * s, hi=2.0 * s))], p=blur_p),
            T.RandomSolarize(128, p=solarize_p), T.PILToTensor()])

    g, loc = (cfg.global_crop_min, 1.0), (cfg.local_crop_min, cfg.global_crop_min)  # crop area fractions
    return ([byol(cfg.global_size, g, 1.0, 0.0), byol(cfg.global_size, g, 0.1, 0.2)]
            + [byol(cfg.local_size, loc, 0.5, 0.0)] * cfg.local_crops)


def to_input(view: torch.Tensor, device) -> torch.Tensor:
    """uint8 views (B, C, H, W) -> float32 on `device`: ToTensor + Normalize's ops, after a 4x smaller copy."""
    x = view.to(device, non_blocking=True).float().div(255)  # (B, C, H, W)
    for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        x[:, c].sub_(m).div_(s)  # python scalars: a mean/std tensor copied to the GPU would sync each time
    return x


class Views(Dataset):
    """Key (epoch, index) -> (list of views, index). The augmentations draw from torch's CPU generator
    seeded by (seed, epoch, index), so the data do not depend on workers, world size or resuming."""

    def __init__(self, data, views, seed: int):
        self.data, self.views, self.seed = data, views, seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        img = self.data[i][0].convert("RGB")
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
            torch.default_generator.manual_seed((self.seed * 100_000 + epoch) * 10**8 + i)
            return [t(img) for t in self.views], i


def train_set(cfg):
    """The training images of --data (labels unused); with --limit-train, N of them."""
    if cfg.data == "jittered-digits" and cfg.limit_train:  # drawn per index: the same first N, faster
        return JitteredDigits("train", n=cfg.limit_train)
    ds = build_dataset(cfg.data, "train", labels=False)
    n = min(cfg.limit_train, len(ds)) or len(ds)  # evenly spaced: an ImageFolder is sorted by class
    return Subset(ds, [i * len(ds) // n for i in range(n)]) if cfg.limit_train else ds


def epoch_keys(data, cfg, d, epoch: int, skip: int) -> list:
    """This rank's (epoch, index) keys in a (seed, epoch) order, less the `skip` batches a resumed run had."""
    sampler = DistributedSampler(data, d.world, d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return [(epoch, i) for i in list(sampler)[skip * cfg.batch_size:]]  # (N // W - skip * B,)
