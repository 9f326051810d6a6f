"""The embedded data set (digits.py): a pure function of its seed, with the properties it promises.

Glyph-disjoint splits, the pose and grey levels it promises, and nuisance that dominates the pixels."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from util.data import build_dataset
from util.digits import JitteredDigits, draw


@pytest.fixture(scope="module")
def digits():
    """300 train and 200 val images of jittered-digits, built once for the module."""
    return JitteredDigits("train", n=300), JitteredDigits("val", n=200)


def test_deterministic_prefix_stable_and_glyph_disjoint(digits):
    train, val = digits
    again = JitteredDigits("train", n=300)
    assert np.array_equal(train.images, again.images) and train.targets == again.targets
    assert np.array_equal(JitteredDigits("train", n=50).images, train.images[:50])  # image i depends on i only
    assert not np.array_equal(train.images, JitteredDigits("train", n=300, seed=1).images)
    assert train.images.shape == (300, 32, 32, 3) and train.images.dtype == np.uint8
    assert set(train.glyph_ids) <= set(range(1297)) and set(val.glyph_ids) <= set(range(1297, 1797))
    assert sorted(set(train.targets)) == list(range(10))
    assert train.targets == [int(load_digits().target[g]) for g in train.glyph_ids]
    img, label = train[5]
    assert img.size == (32, 32) and label == train.targets[5]
    assert build_dataset("jittered-digits", "val").glyph_ids[-1] == 1796  # 2000 images: every glyph


def test_an_empty_glyph_is_flat_and_a_full_glyph_keeps_its_area_and_contrast():
    rng = np.random.default_rng(0)
    for _ in range(20):
        flat = draw(np.zeros((8, 8)), rng)
        assert (flat == flat[0, 0, 0]).all()  # the background alone: one grey level
        img = draw(np.full((8, 8), 16.0), rng).astype(int)[..., 0]  # a filled square glyph
        corner = np.array([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
        bg = np.bincount(corner).argmax()  # the square never covers most corners
        assert bg <= 0.4 * 255 + 1 and img.max() >= 0.6 * 255 - 1  # a darker background, a brighter digit
        far = img - bg >= 0.2 * 255  # the digit is at least a fifth of the range brighter
        # the pose (rotation, shear) preserves area: the 8x8 square becomes side^2 px, side 14-26
        assert 14 ** 2 * 0.75 <= far.sum() <= 26 ** 2 * 1.1, far.sum()


def test_nuisance_dominates_the_pixels(digits):
    """The premise of the demo: raw-pixel k-NN is far below k-NN on the glyphs alone (printed)."""
    def knn_top1(train_x, train_y, test_x, test_y, k=10):
        sim = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
        votes = torch.zeros(len(test_x), 10).scatter_add_(1, train_y[sim.topk(k).indices], torch.ones(len(test_x), k))
        return (votes.argmax(1) == test_y).float().mean().item()
    flat = lambda d: torch.tensor(d.images.reshape(len(d), -1), dtype=torch.float32)  # noqa: E731
    glyph = lambda d: torch.tensor(load_digits().data[d.glyph_ids], dtype=torch.float32)  # noqa: E731
    labels = lambda d: torch.tensor(d.targets)  # noqa: E731
    train, val = digits
    pixels = knn_top1(flat(train), labels(train), flat(val), labels(val))
    glyphs = knn_top1(glyph(train), labels(train), glyph(val), labels(val))
    print(f"\nk-NN (k=10) top-1 on the images' pixels: {pixels:.3f}, on their 8x8 glyphs: {glyphs:.3f}")
    assert glyphs > pixels + 0.3
