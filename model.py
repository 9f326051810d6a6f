"""The networks of MAE-CT and MIM-Refiner, and the checkpoint formats they come in.

- `ViT`: a plain Vision Transformer, pre-norm (MAE, timm) or post-norm (data2vec 2.0) (docs/METHOD.md §2).
- `ContrastiveHead`, `NNQueue`, `nna_loss`, `nnclr_loss`: the refinement machinery (docs/METHOD.md §4-6).
- `load_encoder`: reads every public checkpoint layout of docs/METHOD.md §9 into a `ViT`, strictly.
Importing it has no side effects; it depends on torch alone (and safetensors, for .safetensors files)."""
import functools
import json
import math
import os
from argparse import Namespace
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# name: (width, depth, heads, patch). `tiny` and `small` are ours, sized for a CPU; the rest are the papers'.
SIZES = {"tiny": (192, 12, 3, 16), "small": (384, 12, 6, 16), "base": (768, 12, 12, 16),
         "large": (1024, 24, 16, 16), "huge": (1280, 32, 16, 14), "2b": (2560, 24, 32, 14)}
KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 2560: 32}  # head count cannot be read from weights
torch.serialization.add_safe_globals([Namespace])  # MAE's checkpoint-N.pth 'args': plain values, no code


class UserError(Exception):
    """A problem with the user's input; scripts print it as a one-line `error: ...`."""


def default_heads(dim: int) -> int:
    return KNOWN_HEADS.get(dim, max(1, dim // 64))


def check_divisible(h: int, w: int, patch: int):
    if h % patch or w % patch:
        raise UserError(f"image size {h}x{w} is not divisible by the patch size {patch}; "
                        f"use a multiple of {patch} (e.g. --img-size {max(patch, h // patch * patch)})")


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Eq. (1) of docs/METHOD.md: fixed 2-D sine-cosine positions (grid_h * grid_w, dim), row-major.

    The first dim/2 channels code the column, the last dim/2 the row; each half is [sin(pos * w), cos(pos * w)] with
    w_i = 10000^(-i / (dim/4)); float64, so the table matches checkpoints written from numpy."""
    assert dim % 4 == 0, "sin-cos positions need a width divisible by 4"
    # BEGIN SOLUTION task=1
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def half(pos):  # (H*W,) -> (H*W, dim/2)
        ang = pos.reshape(-1, 1) * w
        return torch.cat([ang.sin(), ang.cos()], dim=1)
    return torch.cat([half(cols), half(rows)], dim=1).float()
    # END SOLUTION


class Attention(nn.Module):
    """Multi-head self-attention, the Attn of Eq. (2) of docs/METHOD.md: softmax(q k^T / sqrt(D/h)) v per head."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        # BEGIN SOLUTION task=2
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, C/h)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernel where the device has one
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        # END SOLUTION


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, post_norm: bool = False):
        super().__init__()
        self.post_norm, self.norm1, self.attn = post_norm, nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        hidden = int(dim * mlp_ratio)  # keys mlp.fc1 / mlp.fc2 as in MAE and timm; exact (erf) GELU
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        """Eq. (2) of docs/METHOD.md: pre-norm (MAE, timm) or post-norm (data2vec 2.0) block."""
        if self.post_norm:
            r = self.norm1(x + self.attn(x))  # r = LN_1(x')
            return self.norm2(r + self.mlp(r))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Encoder; the state dict uses MAE/timm key names so timm's VisionTransformer loads it."""

    def __init__(self, dim=192, depth=12, heads=None, patch=16, img_size=224, in_chans=3,
                 mlp_ratio=4.0, post_norm=False, grad_checkpointing=False):
        super().__init__()
        check_divisible(img_size, img_size, patch)
        self.dim, self.depth, self.patch, self.img_size = dim, depth, patch, img_size
        self.heads = heads or default_heads(dim)
        self.mlp_ratio, self.post_norm, self.in_chans, self.grad_checkpointing = (
            mlp_ratio, post_norm, in_chans, grad_checkpointing)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        g = img_size // patch
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, g, g)])  # fixed; row 0 (the CLS slot) zero
        self.register_buffer("pos_embed", pos.unsqueeze(0))  # (1, 1+N, D): saved, never trained
        self.blocks = nn.ModuleList(Block(dim, self.heads, mlp_ratio, post_norm) for _ in range(depth))
        # pre-norm: a final norm after the last block; post-norm: one norm before the first block
        setattr(self, "embed_norm" if post_norm else "norm", nn.LayerNorm(dim, eps=1e-6))
        self.apply(init_weights)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(dim, -1))  # as MAE: a linear map
        nn.init.normal_(self.cls_token, std=0.02)

    def arch(self) -> dict:
        """Constructor arguments, plain values only, stored in our checkpoints."""
        return dict(dim=self.dim, depth=self.depth, heads=self.heads, patch=self.patch, img_size=self.img_size,
                    in_chans=self.in_chans, mlp_ratio=self.mlp_ratio, post_norm=self.post_norm)

    def patch_tokens(self, x):
        """Images (B, C, H, W) -> patch tokens with positions added, (B, N, D)."""
        B, _, H, W = x.shape
        check_divisible(H, W, self.patch)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        return x + self.grid_pos(H // self.patch, W // self.patch)

    def grid_pos(self, h: int, w: int):
        """Patch positions for an h x w grid, (1, h*w, D): bicubic resize of the stored grid."""
        pos, g = self.pos_embed[:, 1:], math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (g, g):
            return pos
        pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, h*w, D)

    def set_img_size(self, img_size: int):
        """Resize the stored position grid to a new native resolution (bicubic, CLS row kept)."""
        check_divisible(img_size, img_size, self.patch)
        g = img_size // self.patch
        self.pos_embed, self.img_size = torch.cat([self.pos_embed[:, :1], self.grid_pos(g, g)], dim=1), img_size

    def prepend_cls(self, x):
        """(B, N, D) -> (B, 1+N, D): the CLS token (position 0 is zero) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.embed_norm(x) if self.post_norm else x

    def run_block(self, i: int, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, use_reentrant=False)
        return self.blocks[i](x)

    def final_norm(self, x):
        """The final norm of a pre-norm model; a post-norm model has none (identity)."""
        return x if self.post_norm else self.norm(x)

    def forward_blocks(self, x, blocks):
        """Raw residual stream (B, 1+N, D) after each requested block (1-indexed, in the order asked)."""
        blocks = list(blocks)
        if bad := [b for b in blocks if not 1 <= b <= self.depth]:
            raise UserError(f"block {bad[0]} does not exist: this model has blocks 1..{self.depth}")
        x = self.prepend_cls(self.patch_tokens(x))
        out = {}
        for i in range(max(blocks)):
            x = self.run_block(i, x)
            if i + 1 in blocks:
                out[i + 1] = x
        return [out[b] for b in blocks]

    def forward(self, x):
        """Final token sequence (B, 1+N, D), after the final norm on pre-norm models."""
        return self.final_norm(self.forward_blocks(x, [self.depth])[0])


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch under DDP on any device (torch's refuses CPU tensors, so gloo tests)."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        xf = x.float()
        n = torch.tensor([x.shape[0]], dtype=xf.dtype, device=x.device)
        moments = torch.cat([xf.sum(0), (xf * xf).sum(0), n])  # (2C + 1,)
        moments = all_reduce(moments)  # sums over ranks; backward sums the gradients back
        C, count = x.shape[1], moments[-1]
        mean = moments[:C] / count
        var = (moments[C:2 * C] / count - mean * mean).clamp_min(0)  # biased, to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


def mlp(dims, act, last_bn: bool):
    """Linear-BN-act stack, the last Linear optionally followed by BN; no biases, as in both papers' heads."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers += [SyncBatchNorm1d(b), act()]
        elif last_bn:
            layers.append(SyncBatchNorm1d(b))
    return nn.Sequential(*layers)


class ContrastiveHead(nn.Module):
    """Eq. (5) of docs/METHOD.md: projector g, predictor q. forward(x (B, D)) -> (projection z, prediction p)."""

    def __init__(self, dim_in, proj_hidden=2048, proj_dim=256, pred_hidden=4096, act="gelu", predictor_bn=True):
        super().__init__()
        act_cls = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        self.projector = mlp([dim_in, proj_hidden, proj_hidden, proj_dim], act_cls, True)
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], act_cls, predictor_bn)
        self.apply(init_weights)

    def forward(self, x):
        return (z := self.projector(x)), self.predictor(z)


def fp32(fn):
    """Run fn with autocast off: similarities divided by a small tau must not be rounded to bf16."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapped


class NNQueue(nn.Module):
    """FIFO of normalised projections with the dataset index of each (docs/METHOD.md §4)."""

    def __init__(self, size: int, dim: int = 256):
        super().__init__()
        self.register_buffer("z", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("idx", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, z, idx):
        """Eq. (7) of docs/METHOD.md: write z (n, d) and their dataset indices (n,) over the oldest entries."""
        # BEGIN SOLUTION task=4
        n, size = z.shape[0], self.z.shape[0]
        pos = (self.ptr + torch.arange(n, device=z.device)) % size  # wraps around
        self.z[pos] = F.normalize(z.float(), dim=1)
        self.idx[pos] = idx
        self.ptr.copy_((self.ptr + n) % size)
        # END SOLUTION

    @torch.no_grad()
    @fp32
    def lookup(self, z, idx, k: int = 1, generator=None):
        """Eq. (6) of docs/METHOD.md: for each query z (B, d) a stored neighbour (B, d).

        One of the k most similar entries, picked uniformly; the query's own image (its dataset index) excluded."""
        # BEGIN SOLUTION task=3
        sim = F.normalize(z.float(), dim=1) @ self.z.T  # (B, Q) cosine similarities
        sim = sim.masked_fill(self.idx[None, :] == idx[:, None], -1.0)  # never oneself
        top = sim.topk(k, dim=1).indices  # (B, k)
        pick = torch.randint(k, (z.shape[0], 1), device=z.device, generator=generator)
        return self.z[top.gather(1, pick).squeeze(1)]  # (B, d)
        # END SOLUTION


@fp32
def nna_loss(z, nn_z, p_all, tau: float, offset: int = 0):
    """Eq. (8) of docs/METHOD.md: MIM-Refiner's nearest-neighbour alignment; the positive is another image.

    z, nn_z: this rank's anchors and their queue neighbours (B, d); p_all: every rank's predictions (W*B, d), gathered
    with gradient. Row j's positive (column offset + j) is NN(z_j) . p_j; its negatives z_j . p_k stay in-batch."""
    # BEGIN SOLUTION task=5
    z, nn_z = F.normalize(z.detach().float(), dim=1), F.normalize(nn_z.detach().float(), dim=1)
    p = F.normalize(p_all.float(), dim=1)
    target = torch.arange(z.shape[0], device=z.device) + offset
    logits = z @ p.T / tau  # (B, W*B)
    pos = (nn_z * p[target]).sum(1) / tau  # (B,) NN(z_j) . p_j
    logits = logits.scatter(1, target[:, None], pos[:, None])  # swap in the positive only
    return F.cross_entropy(logits, target)
    # END SOLUTION


@fp32
def nnclr_loss(nn_z, p_all, tau: float, offset: int = 0):
    """Eq. (10) of docs/METHOD.md: NNCLR as MAE-CT uses it; shapes as in `nna_loss`.

    The whole row is the anchor's neighbour against every prediction, logit[j, k] = NN(z_j) . p_k / tau."""
    # BEGIN SOLUTION task=6
    nn_z, p = F.normalize(nn_z.detach().float(), dim=1), F.normalize(p_all.float(), dim=1)
    target = torch.arange(nn_z.shape[0], device=nn_z.device) + offset
    return F.cross_entropy(nn_z @ p.T / tau, target)
    # END SOLUTION


# --- Checkpoints (docs/METHOD.md §9) ---

def convert_state_dict(sd: dict) -> dict:
    """Any layout of docs/METHOD.md §9 -> our keys (MAE / timm names, pos_embed (1, 1+N, D))."""
    d2v = "modality_encoders.IMAGE."
    rename = {"module.": "", d2v + "local_encoder.proj.": "patch_embed.proj.", d2v + "extra_tokens": "cls_token",
              d2v + "fixed_positional_encoder.positions": "pos_embed", d2v + "context_encoder.norm.": "embed_norm.",
              "cls_tokens.tokens": "cls_token", "pos_embed.embed": "pos_embed"}  # in order: "module." goes first
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v) or "decoder" in k or "_ema" in k or k == "mask_token" or k.startswith("head."):
            continue  # the MAE decoder, data2vec's EMA teacher, a timm classifier: not the encoder
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    if (pos := out.get("pos_embed")) is not None:
        if pos.dim() == 4:  # MIM-Refiner (1, H, W, D) -> (1, H*W, D)
            pos = pos.flatten(1, 2)
        if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no CLS slot: add a zero row
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        out["pos_embed"] = pos
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"][:, :1].reshape(1, 1, -1)
    return out


def infer_arch(sd: dict) -> dict:
    """Width, depth, patch, image size and norm placement, from tensor shapes only."""
    need = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"]
    if any(k not in sd for k in need):
        raise UserError(f"not a ViT encoder checkpoint: missing {[k for k in need if k not in sd]} (found keys like "
                        f"{sorted(sd)[:5]}); give an MAE, timm, data2vec 2.0, MIM-Refiner, MAE-CT or our checkpoint")
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    dim, patch, grid = w.shape[0], w.shape[-1], math.isqrt(sd["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return dict(dim=dim, depth=depth, heads=default_heads(dim), patch=patch, img_size=grid * patch,
                in_chans=w.shape[1], mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                post_norm="embed_norm.weight" in sd)


def load_state_dict_strict(module: nn.Module, sd: dict, what: str = "checkpoint"):
    """load_state_dict(strict=True), with the mismatch reported as one readable line."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{what} does not fit the model: missing keys {missing[:8]}, unexpected "
                        f"keys {unexpected[:8]}, shape mismatches {shapes[:4]}")
    module.load_state_dict(sd, strict=True)


def read_checkpoint(path: str, what: str = "checkpoint", fix: str = "give a torch checkpoint of plain tensors"):
    """torch.load with weights_only=True, argparse.Namespace allowed (the `args` of MAE's training checkpoints).

    A file that needs unpickling of code is refused. *.safetensors -> {'model': tensors, 'arch': stored or None}."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; check the path")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open  # the one dependency besides torch, needed here only
            with safe_open(path, "pt") as f:
                return {"model": {k: f.get_tensor(k) for k in f.keys()},
                        "arch": json.loads((f.metadata() or {}).get("arch") or "null")}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        text = str(e).strip() or type(e).__name__
        if "GLOBAL " in text:  # a pickled object; torch's own text runs over several lines, cut it
            text, fix = f"it holds a pickled {text.split('GLOBAL ')[1].split()[0]}", (f"only if you trust the file, "
                f"save its weights once: torch.save(torch.load({path!r}, weights_only=False)['model'], 'weights.pth')")
        raise UserError(f"{path!r} is not a readable weights-only {what} ({text.splitlines()[0]}); {fix}") from None


def load_encoder(path: str, heads=None, weights: str = "ema", img_size=None, **overrides) -> ViT:
    """Any checkpoint of docs/METHOD.md §9 -> a ViT, strictly.

    `heads` overrides the head count (not in the weights); `weights`: ema/online of refine.py checkpoints; `img_size`:
    new resolution (bicubic). The ViT's arguments: as our files store them (or in `_metadata`), else by shape."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise UserError("the file holds no state dict; give a checkpoint of a ViT encoder")
    if (ours := "ema" in obj and "encoder" in obj) and weights not in ("ema", "online"):  # refine.py's layout
        raise UserError(f"unknown --weights {weights!r}; use ema or online")
    sd = (obj["ema" if weights == "ema" else "encoder"] if ours else  # MAE / pretrain.py / data2vec 2.0: 'model'
          next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj))  # MIM-Refiner...
    arch = obj.get("arch") or getattr(sd, "_metadata", {}).get("", {}).get("arch")
    sd = convert_state_dict(sd)  # our keys
    vit = ViT(**{**(arch or infer_arch(sd)), **({"heads": heads} if heads else {}), **overrides})
    vit.heads_from = "(given)" if heads else "(stored in the file)" if arch else "(by width: not stored in the file)"
    load_state_dict_strict(vit, sd, f"checkpoint {path!r}")
    if img_size and img_size != vit.img_size:
        vit.set_img_size(img_size)
    return vit


def export_encoder(vit: ViT) -> dict:
    """Bare encoder state dict in MAE / timm layout, which timm's VisionTransformer and the MAE repo load strictly.

    Cloned, to save while training; `vit.arch()` in its `_metadata` (load_state_dict ignores it)."""
    sd = OrderedDict((k, v.detach().clone().cpu()) for k, v in vit.state_dict().items()
                     if "decoder" not in k and k != "mask_token")  # an MAE's decoder is not the encoder
    sd._metadata = {"": {"arch": vit.arch()}}
    return sd
