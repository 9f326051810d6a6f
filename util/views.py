"""What a refinement trains on: its training images and their views, image i of epoch e a function of (seed, e, i).

Two recipes: crop-flip (MAE-CT's) and BYOL's multi-crop (MIM-Refiner's: two global views plus local crops, colour
jitter, grayscale, blur, solarisation). `ReferenceViews` writes the multi-crop recipe as torchvision would, one
image at a time: the readable reference. What runs splits the work where it is cheapest: a loader worker decodes
the image, cuts and flips each view's crop and draws each view's photometric parameters (photometric.draw); the
device then applies colour jitter, grayscale, blur, solarisation and the normalisation to the whole batch of a view
at once (`to_input`, photometric.augment). Crops leave the worker as uint8, four times less to copy than float32.
"""
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import Subset
from torchvision import transforms as T

from util import photometric
from util.data import IMAGENET_MEAN, IMAGENET_STD, JitteredDigits, Seeded, build_dataset

# --- The reference: the multi-crop recipe in torchvision, one image at a time ---------------------------

class ReferenceViews:
    """MIM-Refiner's multi-crop views of one PIL image, global first, as torchvision writes them.

    What the loader workers ran before the colouring moved to the device: PIL's blur, uint8 tensors out. `Views`
    and `to_input` below draw the same distributions, a batch at a time on the device; tools/bench.py times both.
    """

    def __init__(self, cfg):
        j, s = cfg.jitter, cfg.global_size / 224  # jitter x BYOL's; blur sigma 0.1-2.0 px at 224, scaled

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale, interpolation=T.InterpolationMode.BICUBIC)

        def colour(blur_p, solarize_p):  # flip, BYOL's jitter and grayscale, then blur and solarisation
            return [T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.4 * j, 0.4 * j, 0.2 * j, min(0.5, 0.1 * j))], p=0.8),
                    T.RandomGrayscale(0.2),
                    T.RandomApply([T.Lambda(partial(pil_blur, lo=0.1 * s, hi=2.0 * s))], p=blur_p),
                    T.RandomSolarize(128, p=solarize_p), T.PILToTensor()]
        g, loc = (cfg.global_crop_min, 1.0), (cfg.local_crop_min, cfg.global_crop_min)  # crop area fractions
        # first global view: always blurred, never solarised
        self.global1 = T.Compose([crop(cfg.global_size, g), *colour(1.0, 0.0)])
        # second global view: blurred one time in ten, solarised one in five
        self.global2 = T.Compose([crop(cfg.global_size, g), *colour(0.1, 0.2)])
        # local views: small crops of at most global_crop_min of the area, blurred half the time
        self.local = T.Compose([crop(cfg.local_size, loc), *colour(0.5, 0.0)])
        self.local_crops = cfg.local_crops

    def __call__(self, img: Image.Image) -> list:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]


def pil_blur(img: Image.Image, lo: float, hi: float) -> Image.Image:
    """PIL's Gaussian blur, sigma uniform in [lo, hi] from torch's default generator."""
    return img.filter(ImageFilter.GaussianBlur(float(torch.empty(1).uniform_(lo, hi))))


# --- What runs: crops and parameter draws in the loader, the colouring on the device ---------------------

@dataclass(frozen=True)
class View:
    """One view of every image: a random resized crop of `size` px covering `scale` of the image's area, then colour.

    The crop: aspect 3/4-4/3, bicubic, flipped with probability 1/2; then `colour` on the device (None: nothing)."""
    size: int
    scale: tuple
    colour: Optional[photometric.Photometric] = None


def make_views(cfg) -> list:
    """The views, global first: crop-flip (MAE-CT) or BYOL multicrop (MIM-Refiner).

    BYOL: blur p 1.0 / 0.1 / 0.5 on global 1 / global 2 / local, solarize on global 2. cfg: views, global_size,
    local_size, local_crops, global_crop_min, local_crop_min, jitter (x BYOL's)."""
    g, loc = (cfg.global_crop_min, 1.0), (cfg.local_crop_min, cfg.global_crop_min)  # crop area fractions
    if cfg.views == "crop-flip":
        return [View(cfg.global_size, g)] * 2
    j, s = cfg.jitter, cfg.global_size / 224  # blur sigma 0.1-2.0 px at 224, scaled with the global side

    def byol(blur_p, solarize_p):
        return photometric.Photometric(0.8, 0.4 * j, 0.4 * j, 0.2 * j, min(0.5, 0.1 * j), 0.2, blur_p, 0.1 * s, 2.0 * s,
                                  solarize_p)
    return ([View(cfg.global_size, g, byol(1.0, 0.0)), View(cfg.global_size, g, byol(0.1, 0.2))]
            + [View(cfg.local_size, loc, byol(0.5, 0.0))] * cfg.local_crops)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W), a view of the (H, W, 3) pixels (channels-last strides)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def crop_flip(img: torch.Tensor, view: View) -> torch.Tensor:
    """torchvision's RandomResizedCrop(view.size, view.scale, bicubic) + RandomHorizontalFlip on a uint8 image.

    Image (3, H, W), drawn from torch's default generator -> uint8 (3, size, size). torch's antialiased uint8 bicubic
    resize is PIL's filter (at most 2 levels apart) at a third of its time."""
    top, left, h, w = T.RandomResizedCrop.get_params(img, view.scale, (3 / 4, 4 / 3))
    x = img[None, :, top:top + h, left:left + w]  # (1, 3, h, w), a view
    x = F.interpolate(x, (view.size, view.size), mode="bicubic", antialias=True)[0]  # (3, size, size)
    return x.flip(2) if float(torch.rand(1)) < 0.5 else x


def cut_views(views: list, img: Image.Image) -> tuple:
    """One image's views: a uint8 crop (3, s, s) per view and their photometric parameters.

    The parameters: (V, len(photometric.COLUMNS)), drawn from torch's default generator (seeded by Views)."""
    img, crops, params = to_uint8(img), [], []  # img (3, H, W)
    for view in views:  # each view's crop, then its parameters: one stream of draws
        crops.append(crop_flip(img, view))
        params.append(view.colour.draw() if view.colour else torch.tensor(photometric.IDENTITY))
    return crops, torch.stack(params)  # params (V, 11)


class Views(Seeded):
    """Key (epoch, index) -> ((crops, params), index) of cut_views, seeded by (seed, epoch, index).

    Drawn from the generator so seeded, as every trainer's data (data.Seeded): the data do not depend on workers, world
    size or resuming."""

    def __init__(self, data, views: list, seed: int):
        super().__init__(data, partial(cut_views, views), seed)


def to_input(crops: list, params: torch.Tensor, views: list, device) -> list:
    """A batch from Views -> the views the encoder reads, float32 normalised on `device`.

    Per view v the uint8 crops (B, 3, s, s) with their parameters params[:, v] (B, 11) through photometric.augment, or
    (no colour) ToTensor + Normalize's arithmetic alone."""
    params = params.to(device, non_blocking=True)  # (B, V, 11)
    out = []
    for v, (x, view) in enumerate(zip(crops, views)):
        x = x.to(device, non_blocking=True)
        out.append(photometric.augment(x, params[:, v], IMAGENET_MEAN, IMAGENET_STD, view.colour.kernel_size)
                   if view.colour else photometric.normalize(x.float().div(255), IMAGENET_MEAN, IMAGENET_STD))
    return out


def train_set(cfg):
    """The training images of --data (labels unused); with --limit-train, N of them."""
    if cfg.data.startswith("jittered-digits") and cfg.limit_train:  # drawn per index: the same first N, faster
        return JitteredDigits("train", n=cfg.limit_train)
    ds = build_dataset(cfg.data, "train", labels=False)
    n = min(cfg.limit_train, len(ds)) or len(ds)  # evenly spaced: an ImageFolder is sorted by class
    return Subset(ds, [i * len(ds) // n for i in range(n)]) if cfg.limit_train else ds
