"""augment.py: the refinement's views, cut in the loader workers and coloured on the device."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import model
import recipe
import refine
from util import photometric
from util import views as V
from util.data import IMAGENET_MEAN, IMAGENET_STD

VIT = model.ViT(dim=32, depth=4, patch=4, img_size=32)


def resolved(**kw):
    return recipe.resolve(refine.Settings(**{"batch_size": 4, **kw}), VIT, 1, 100)


def smooth_image(seed=0, size=(400, 300)) -> Image.Image:
    """A smooth RGB image: bicubic upsampling of 30 x 40 noise (resampling differences stay small)."""
    noise = (np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def test_views_are_a_function_of_seed_epoch_index():
    views = V.make_views(resolved(local_crops=2))
    data = V.Views(V.train_set(refine.Settings(limit_train=8)), views, 0)
    (crops, params), i = data[0, 3]  # key (epoch, index)
    assert i == 3 and [tuple(v.shape) for v in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert params.shape == (4, len(photometric.COLUMNS)) and all(c.dtype == torch.uint8 for c in crops)
    torch.manual_seed(123)  # the caller's generator plays no part
    (again, params_again), _ = data[0, 3]
    assert all(torch.equal(a, b) for a, b in zip(crops, again)) and torch.equal(params, params_again)
    assert not torch.equal(crops[0], data[1, 3][0][0][0])


def test_loader_workers_do_not_change_the_batches():
    """--workers 2 and --workers 0 give the same crops and parameters, batch by batch."""
    data = V.Views(V.train_set(refine.Settings(limit_train=16)), V.make_views(resolved()), 0)
    keys = [(1, i) for i in (5, 3, 9, 0, 15, 7, 2, 11)]
    batches = [list(DataLoader(data, 4, sampler=keys, num_workers=w)) for w in (0, 2)]
    for ((c0, p0), i0), ((c2, p2), i2) in zip(*batches):
        assert torch.equal(i0, i2) and torch.equal(p0, p2) and all(torch.equal(a, b) for a, b in zip(c0, c2))


def test_crop_flip_draws_what_torchvision_draws():
    """The same generator state gives torchvision's crop box and flip, and the same picture.

    torch's antialiased uint8 bicubic filter against PIL's (torchvision's on PIL images) differs by rounding, at most 2
    levels at a pixel (measured: 1 on this image) and under a hundredth of a level on average; the mirrored crop is
    far."""
    img, view = smooth_image(), V.View(96, (0.05, 1.0))
    ref = T.Compose([T.RandomResizedCrop(96, (0.05, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(), T.PILToTensor()])
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        ours = V.crop_flip(V.to_uint8(img), view).float()
        torch.manual_seed(seed)
        theirs = ref(img).float()
        assert (ours - theirs).abs().max() <= 2 and (ours - theirs).abs().mean() < 0.01, seed  # levels of 255
        assert (ours - theirs.flip(2)).abs().mean() > 10 * (ours - theirs).abs().mean(), seed
        torch.manual_seed(seed)
        ref.transforms[0](img)  # the crop's draws, then the flip's
        flips += float(torch.rand(1)) < 0.5
    assert 0 < flips < 20  # both branches of the flip were checked


def test_blur_sigma_follows_the_global_side_for_every_view():
    """BYOL's blur draws sigma from U(0.1, 2.0) px at 224 px for every view, the 96 px local crops included.

    As in the papers' code; at other sizes the range scales with the global side only."""
    def ranges(cfg):
        return [(v.colour.sigma_lo, v.colour.sigma_hi) for v in V.make_views(cfg)]
    assert ranges(resolved(global_size=224, local_size=96, local_crops=3)) == [(0.1, 2.0)] * 5
    assert ranges(resolved(local_crops=2)) == [(pytest.approx(0.1 * 32 / 224), pytest.approx(2.0 * 32 / 224))] * 4


def test_byol_recipe_per_view():
    """The views' probabilities: blur, solarisation, jitter and grayscale per view.

    Global 1: blur always, no solarisation; global 2: blur 0.1, solarisation 0.2; locals: blur 0.5; jitter (0.4, 0.4,
    0.2, 0.1) times --jitter with p 0.8, grayscale 0.2 on every view."""
    views = V.make_views(resolved(global_size=224, local_size=96, local_crops=2, jitter=1.0))
    assert [(v.size, v.colour.blur_p, v.colour.solarize_p) for v in views] == [
        (224, 1.0, 0.0), (224, 0.1, 0.2), (96, 0.5, 0.0), (96, 0.5, 0.0)]
    c = views[0].colour
    assert (c.jitter_p, c.brightness, c.contrast, c.saturation, c.hue, c.grayscale_p) == (0.8, 0.4, 0.4, 0.2, 0.1, 0.2)
    assert V.make_views(resolved(views="crop-flip")) == [V.View(32, (0.3, 1.0))] * 2


def test_crop_flip_views_normalised_on_the_device_equal_totensor_normalize():
    img = V.train_set(refine.Settings(limit_train=2))[1][0]
    want = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))
    u8 = T.PILToTensor()(img)[None]  # (1, 3, H, W)
    params = torch.tensor(photometric.IDENTITY)[None, None]  # (B, V, 11)
    got = V.to_input([u8], params, [V.View(32, (1.0, 1.0))], torch.device("cpu"))[0][0]
    assert u8.dtype == torch.uint8 and torch.equal(got, want)


def test_each_view_gets_its_own_images_parameters():
    """to_input on a batch equals, image by image, photometric.augment with that image's parameters of that view.

    Nothing mixes images or views."""
    views = V.make_views(resolved(local_crops=1))
    data = V.Views(V.train_set(refine.Settings(limit_train=8)), views, 0)
    (crops, params), _ = next(iter(DataLoader(data, 4, sampler=[(0, i) for i in range(4)])))
    batch = V.to_input(crops, params, views, torch.device("cpu"))
    for v, view in enumerate(views):
        for b in range(4):
            one = photometric.augment(crops[v][b:b + 1], params[b:b + 1, v], IMAGENET_MEAN, IMAGENET_STD,
                                      view.colour.kernel_size)
            torch.testing.assert_close(batch[v][b:b + 1], one, atol=1e-6, rtol=0)
