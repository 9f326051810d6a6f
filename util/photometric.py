"""BYOL's photometric view augmentation batched on the device, each image with its own random parameters.

Loader workers decode, crop and flip, and `draw` each view's parameters (a float32 vector laid out as `COLUMNS`);
`augment` colours a view's whole batch at once (jitter, grayscale, blur, solarisation), on the GPU or the CPU, each
operation as torchvision defines it on float images (named in its docstring). Nothing waits for the device (no
`.item()`, `.nonzero()` or branch on a tensor's value): every image takes every operation, with identity parameters or
undone by `torch.where` where it should not. Images: float (B, 3, H, W) in [0, 1] unless said; parameters (B,)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

# One view's parameters, fixed columns. "Not applied" is stored as the identity (IDENTITY), so one batched call
# handles every image. order0..order3: the colour-jitter operations in the order this image applies them,
# 0 brightness, 1 contrast, 2 saturation, 3 hue (a permutation, as torchvision's ColorJitter's randperm(4)).
# grayscale and solarize: 1.0 applied, 0.0 not; sigma: the blur's sigma in pixels, 0.0 for no blur.
COLUMNS = ("brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3",
           "grayscale", "sigma", "solarize")
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
ORDER = slice(4, 8)  # the order columns


def _each(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1): one value per image, broadcast over its channels and pixels."""
    return v.view(-1, 1, 1, 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): torchvision.transforms.functional.rgb_to_grayscale's 0.2989 r + 0.587 g + 0.114 b.

    The same weights and order of the sum; they add up to 0.9999, so white becomes 0.9999."""
    r, g, b = x.unbind(1)  # 3 x (B, H, W)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (B, 1, H, W)


def _blend(x: torch.Tensor, y, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x + (1 - f) y, 0, 1): torchvision's _blend on float images, f per image. f = 1 gives x exactly."""
    f = _each(f)
    return (f * x + (1.0 - f) * y).clamp(0.0, 1.0)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x, 0, 1), a blend with black: torchvision.transforms.functional.adjust_brightness."""
    return _blend(x, 0.0, f)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x + (1 - f) m, 0, 1), m the image's mean gray(x): torchvision.transforms.functional.adjust_contrast."""
    return _blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f)  # mean: (B, 1, 1, 1)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x + (1 - f) gray(x), 0, 1): torchvision.transforms.functional.adjust_saturation."""
    return _blend(x, gray(x), f)


def _rgb2hsv(x: torch.Tensor):
    """(B, 3, H, W) -> h, s, v, each (B, H, W): torchvision's _rgb2hsv, operation for operation.

    Where max = min (gray) the divisors are set to 1, which makes h = s = 0 there instead of NaN."""
    r, g, b = x.unbind(1)  # 3 x (B, H, W)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv2rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h, s, v (B, H, W) -> (B, 3, H, W): torchvision's _hsv2rgb, by gather instead of its one-hot einsum.

    It picks r, g, b for the sector i of the hue circle from (v, p, q, t); the same values, exactly."""
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    i = i.to(torch.int64) % 6  # (B, H, W)
    table = torch.stack((v, q, p, p, t, v,  # r in sectors 0..5
                         t, v, v, q, p, p,  # g
                         p, p, t, v, v, q), dim=1)  # b; (B, 18, H, W)
    index = i.unsqueeze(1) + torch.arange(0, 18, 6, device=h.device).view(1, 3, 1, 1)  # (B, 3, H, W): 6 c + i
    return table.gather(1, index)  # (B, 3, H, W)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """h <- (h + f) mod 1 in HSV, f in [-0.5, 0.5] per image: torchvision.transforms.functional.adjust_hue, batched.

    Its float algorithm. The HSV round trip is inexact: images with f = 0 keep their input (ColorJitter skips them)."""
    h, s, v = _rgb2hsv(x)
    h = (h + f.view(-1, 1, 1)) % 1.0  # f: (B,) -> (B, 1, 1) against (B, H, W)
    return torch.where(_each(f) == 0, x, _hsv2rgb(h, s, v))


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Where `on` (B,), gray(x) in all three channels: torchvision.transforms.functional.rgb_to_grayscale(x, 3)."""
    return torch.where(_each(on), gray(x).expand_as(x), x)


def kernel_size_for(sigma_hi: float) -> int:
    """The odd kernel 2 ceil(3 sigma_hi) + 1: the Gaussian truncated at 3 sigma on each side.

    BYOL's torchvision recipe used a 23 px kernel at 224 px (sigma <= 2, so 5.5 sigma); for sigma 2 this gives 13 px.
    The 23 px kernel's weight beyond 3 sigma is 0.1% per axis, 0.2% in all, so on any image in [0, 1] the two blurs
    differ by at most half the kernels' L1 distance, 0.52 / 255 per pixel (tested on a random image)."""
    return 2 * math.ceil(3 * sigma_hi) + 1


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) -> (B, k): torchvision's _get_gaussian_kernel1d per image, exp(-t^2 / (2 sigma^2)) normalised to sum 1.

    t = linspace(-(k-1)/2, (k-1)/2, k). Sigma 0 (0 / 0 at t = 0) is computed as 1; gaussian_blur keeps those inputs."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=sigma.dtype, device=sigma.device)  # (k,)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    pdf = torch.exp(-0.5 * (t / sigma.unsqueeze(1)).pow(2))  # (B, k)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur, sigma per image (0: none, exactly): torchvision.transforms.functional.gaussian_blur, batched.

    Reflect padding and kernel as gaussian_blur(x, [k, k], [sigma, sigma]). Separable, rows then columns (2k
    multiply-adds per pixel, not k^2): a grouped conv2d per axis, a group per channel of each image, with its image's
    kernel. k odd, below 2 min(H, W)."""
    b, c, height, width = x.shape
    pad = kernel_size // 2
    kernel = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B * 3, k)
    y = nnf.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, 3, H + 2 pad, W + 2 pad)
    y = y.view(1, b * c, height + 2 * pad, width + 2 * pad)  # one sample, B * 3 channels
    y = nnf.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)  # (1, B * 3, H + 2 pad, W): rows
    y = nnf.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)  # (1, B * 3, H, W): columns
    return torch.where(_each(sigma) > 0, y.view(b, c, height, width), x)  # (B, 3, H, W)


def solarize(x: torch.Tensor, on: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Where `on`, pixels >= threshold become 1 - x: torchvision.transforms.functional.solarize on float images.

    The default 0.5 = 127.5 / 255 inverts on u / 255 the pixels that torchvision's uint8 RandomSolarize(128) inverts, u
    >= 128, whatever the float rounding (a threshold of 128 / 255 would put level 128 exactly on the boundary)."""
    return torch.where(_each(on) & (x >= threshold), 1.0 - x, x)


def _blend_step(x: torch.Tensor, op: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One position of the jitter sequence: per image op 0 brightness, 1 contrast, 2 saturation, else none.

    Factor 1 leaves x exactly. One blend over the batch serves all three (partners: black, mean gray, gray image)."""
    g = gray(x)  # (B, 1, H, W)
    partner = torch.where(_each(op == 1), g.mean(dim=(1, 2, 3), keepdim=True), g)  # (B, 1, H, W)
    partner = torch.where(_each(op == 0), 0.0, partner)
    f = torch.where(op == 0, params[:, 0], torch.where(op == 1, params[:, 1], params[:, 2]))  # (B,)
    return _blend(x, partner, torch.where(op <= 2, f, 1.0))


def colour_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with each image's factors (params (B, len(COLUMNS))) in each image's own order.

    Hue, the costly one, runs once for the whole batch: first the blends of positions 0-2 that come before each image's
    hue, then hue, then the blends of positions 1-3 after it. An image with nothing to do at a step gets the identity
    (blend factor 1, hue 0): unchanged, exactly; the host never learns which image does what."""
    order = params[:, ORDER]  # (B, 4)
    hue_at = (order == 3).to(torch.uint8).argmax(dim=1)  # (B,): the position of hue in each image's order
    for k in range(3):
        x = _blend_step(x, torch.where(hue_at > k, order[:, k], 3.0), params)  # 3: no blend here
    x = hue(x, params[:, 3])
    for k in range(1, 4):
        x = _blend_step(x, torch.where(hue_at < k, order[:, k], 3.0), params)
    return x


def augment(x: torch.Tensor, params: torch.Tensor, mean, std, kernel_size: int) -> torch.Tensor:
    """A view's batch, uint8 (B, 3, H, W) -> float32 (B, 3, H, W) on x's device: coloured, then normalised.

    /255 -> colour jitter -> grayscale -> blur -> solarize -> (x - mean) / std. params: (B, len(COLUMNS)) from `draw`,
    moved to x's device; mean, std: 3 Python floats each (a tensor of them copied to the GPU would sync every call)."""
    params = params.to(x.device, torch.float32, non_blocking=True)  # (B, 11)
    p = dict(zip(COLUMNS, params.unbind(1)))  # name -> (B,)
    y = x.float().div(255)  # (B, 3, H, W) in [0, 1]
    y = colour_jitter(y, params)
    y = grayscale(y, p["grayscale"] > 0)
    y = gaussian_blur(y, p["sigma"], kernel_size)
    return normalize(solarize(y, p["solarize"] > 0), mean, std)  # solarize's torch.where made a new tensor


def normalize(y: torch.Tensor, mean, std) -> torch.Tensor:
    """(y - mean) / std per channel in place, float (B, 3, H, W): torchvision's Normalize (mean, std: as augment's)."""
    for ch, (m, s) in enumerate(zip(mean, std)):
        y[:, ch].sub_(m).div_(s)
    return y


def draw(jitter_p: float, brightness: float, contrast: float, saturation: float, hue: float, grayscale_p: float,
         blur_p: float, sigma_lo: float, sigma_hi: float, solarize_p: float) -> torch.Tensor:
    """One view's parameters, (len(COLUMNS),) float32, from torch's default CPU generator (the caller seeds it).

    As torchvision's RandomApply([ColorJitter(brightness, contrast, saturation, hue)], jitter_p),
    RandomGrayscale(grayscale_p), a blur with probability blur_p and sigma uniform in [sigma_lo, sigma_hi], and
    RandomSolarize(p=solarize_p): factors uniform in [max(0, 1 - b), 1 + b], hue in [-hue, hue], the order a random
    permutation. Every call consumes the same randomness whatever is applied or the ranges (torchvision draws only what
    it applies), so one view's draws never shift the next's. An event happens when its uniform draw is < p."""
    jitter = float(torch.rand(1)) < jitter_p
    order = torch.randperm(4).float()  # (4,)
    factors = torch.cat([torch.empty(1).uniform_(max(0.0, 1.0 - brightness), 1.0 + brightness),
                         torch.empty(1).uniform_(max(0.0, 1.0 - contrast), 1.0 + contrast),
                         torch.empty(1).uniform_(max(0.0, 1.0 - saturation), 1.0 + saturation),
                         torch.empty(1).uniform_(-hue, hue)])  # (4,)
    gray_on = float(torch.rand(1)) < grayscale_p
    blur_on = float(torch.rand(1)) < blur_p
    sigma = float(torch.empty(1).uniform_(sigma_lo, sigma_hi))
    solarize_on = float(torch.rand(1)) < solarize_p
    v = torch.tensor(IDENTITY)  # (11,) float32
    if jitter:
        v[:4], v[ORDER] = factors, order
    v[COLUMNS.index("grayscale")] = float(gray_on)
    v[COLUMNS.index("sigma")] = sigma if blur_on else 0.0
    v[COLUMNS.index("solarize")] = float(solarize_on)
    return v


@dataclass(frozen=True)
class Photometric:
    """One view's photometric recipe, the arguments of `draw`; the defaults are BYOL's first global view at 224 px."""
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    sigma_lo: float = 0.1
    sigma_hi: float = 2.0
    solarize_p: float = 0.0

    @property
    def kernel_size(self) -> int:
        """The blur's kernel for augment: kernel_size_for(sigma_hi)."""
        return kernel_size_for(self.sigma_hi)

    def draw(self) -> torch.Tensor:
        """draw() with this recipe's numbers."""
        return draw(self.jitter_p, self.brightness, self.contrast, self.saturation, self.hue, self.grayscale_p,
                    self.blur_p, self.sigma_lo, self.sigma_hi, self.solarize_p)
