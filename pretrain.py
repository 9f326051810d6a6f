"""MAE pre-training (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The masked-image-modeling encoder that MAE-CT and MIM-Refiner start from. The encoder sees a random 25% of the patches;
a light decoder predicts the pixels of the hidden 75%; the loss is the MSE to per-patch normalised pixels on hidden
patches (`MAE.forward_loss`). AdamW (0.9, 0.95), lr = base 1.5e-4 x global batch / 256, weight decay 0.05 on weight
matrices only, per-step linear warm-up then cosine; augmentation RandomResizedCrop + flip, nothing else. `--crop-min
0.35` by default, not MAE's 0.2: at 32 px a 20% crop is ~14 px blown up 2.3x, blur that neighbours predict trivially,
and it often cuts away the 14-26 px digit of jittered-digits.

CPU, the committed checkpoints/mae_tiny_digits.pth (ViT 128 wide, 6 deep, 2 heads, patch 4 on 32 px;
decoder 64 x 2; 1950 steps of 256 = 0.5M images, 31 min on one thread; base lr 10x the paper's for a
run ~100x shorter; crops of at least half the image keep most of the digit); the command that made it:
    OMP_NUM_THREADS=1 python pretrain.py --out runs/mae_tiny_digits --base-lr 1.5e-3 --epochs 50 \
        --crop-min 0.5 --save-every 100 --export runs/mae_tiny_digits/mae_tiny_digits.pth
GPU nodes, the paper's ViT-L/16 recipe (global batch 4096) on an ImageNet folder with train/:
    torchrun --nproc_per_node=8 pretrain.py --data /data/imagenet --img-size 224 --patch 16 \
        --dim 1024 --depth 24 --dec-dim 512 --dec-depth 8 --dec-heads 16 --batch-size 512 \
        --epochs 800 --warmup-epochs 40 --crop-min 0.2 --workers 10 --compile --out runs/mae_l16

Files in --out (rank 0 writes): last.pt = {'model': MAE state dict (encoder keys in the MAE/timm layout, decoder_* and
mask_token), 'arch', 'decoder', 'optimizer', 'step', 'loss', 'settings', 'rng', 'window'}, atomically every
--save-every steps, at the end and on SIGTERM/SIGUSR1/SIGINT (then exit code 3; rerun to resume, bit-identical on CPU),
the one before kept as last.prev.pt; run.lock while running; encoder.pth and encoder.safetensors, the bare encoder that
timm loads; log.jsonl, a line per log.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import Block, UserError, ViT, export_encoder, init_weights, sincos_pos_embed
from util import common
from util.common import cli, opt
from util.data import EpochKeys, Seeded, build_dataset, loader_kwargs, train_transform
from util.resume import Run, all_rng_states, set_rng_state, trim_log, write_encoder


@dataclass
class Settings:
    data: str = opt("jittered-digits", "'jittered-digits', a folder of images, or one with train/ (class folders)")
    out: str = opt("runs/pretrain", "output folder (last.pt, encoder.pth, log.jsonl); resumed if it holds last.pt")
    export: str = opt("", "also write a slim checkpoint here: MAE weights and arch, no optimizer or RNG state")
    img_size: int = opt(32, "training resolution in pixels")
    patch: int = opt(4, "patch size in pixels")
    dim: int = opt(128, "encoder width")
    depth: int = opt(6, "encoder blocks")
    num_heads: int = opt(0, "encoder attention heads; 0 = width // 64 (every file written stores the count)")
    dec_dim: int = opt(64, "decoder width")
    dec_depth: int = opt(2, "decoder blocks")
    dec_heads: int = opt(2, "decoder attention heads")
    mask_ratio: float = opt(0.75, "fraction of the patches hidden from the encoder")
    epochs: int = opt(100, "length of the learning-rate schedule in epochs")
    warmup_epochs: float = opt(5.0, "epochs of linear warm-up before the cosine decay")
    max_steps: int = opt(0, "stop after this many optimizer steps (the schedule still spans --epochs); 0 = no limit")
    batch_size: int = opt(256, "images per process per step")
    base_lr: float = opt(1.5e-4, "learning rate per 256 images of global batch")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine")
    weight_decay: float = opt(0.05, "AdamW weight decay of weight matrices (none on biases, norms, tokens)")
    crop_min: float = opt(0.35, "smallest crop area fraction of RandomResizedCrop (MAE at 224 px: 0.2)")
    seed: int = opt(0, "seed of the initial weights, data order, crops and masks")
    save_every: int = opt(500, "write last.pt every this many steps (and at the end)")
    log_every: int = opt(10, "append the mean loss of the last steps to log.jsonl every this many steps")
    workers: int = opt(0, "data loader processes per rank")
    device: str = opt("auto", "auto, cpu or cuda")
    compile: bool = opt(False, "torch.compile the training computation")
    resume: bool = opt(True, "continue from --out/last.pt when it exists (--no-resume starts afresh)")


# --- The MAE: model.ViT as the encoder, plus a light decoder (He et al. 2022) ---

def patchify(imgs, p: int):
    """(B, C, H, W) -> (B, h*w, p*p*C), patches row-major, pixels (row, col, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def random_masking(x, ratio: float):
    """Keep a random (1 - ratio) of the tokens of each row (argsort of uniform noise, as MAE).

    x (B, N, D) -> kept (B, K, D), mask (B, N) with 1 = hidden, ids_restore (B, N)."""
    (B, N, D), keep = x.shape, int(x.shape[1] * (1 - ratio))
    ids_shuffle = torch.rand(B, N, device=x.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MAE(ViT):
    """ViT encoder plus the MAE decoder; the state dict has the MAE repo's `*_full` layout."""

    def __init__(self, dec_dim=512, dec_depth=8, dec_heads=16, **vit_kwargs):
        super().__init__(**vit_kwargs)
        self.dec_arch = dict(dec_dim=dec_dim, dec_depth=dec_depth, dec_heads=dec_heads)
        g = self.img_size // self.patch
        self.decoder_embed = nn.Linear(self.dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        pos = torch.cat([torch.zeros(1, dec_dim), sincos_pos_embed(dec_dim, g, g)])
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0))  # (1, 1+N, Dd)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads, self.mlp_ratio) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, self.patch ** 2 * self.in_chans)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs, mask_ratio=None):
        """The encoder's tokens (as ViT); with a mask ratio the MAE loss.

        One forward for both, so that DDP and torch.compile wrap the whole training computation."""
        if mask_ratio is None:
            return super().forward(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        return self.forward_loss(imgs, self.forward_decoder(latent, ids_restore), mask)

    def forward_encoder(self, imgs, mask_ratio: float):
        """The encoder on a random (1 - mask_ratio) of the patches: latent (B, 1+K, D), mask, ids_restore."""
        kept, mask, ids_restore = random_masking(self.patch_tokens(imgs), mask_ratio)
        x = self.prepend_cls(kept)
        for i in range(self.depth):
            x = self.run_block(i, x)
        return self.final_norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """The light decoder: the visible tokens and a mask token per hidden patch -> pixels (B, N, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, N = ids_restore.shape
        fill = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], fill], dim=1)  # (B, N, Dd), shuffled order
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C)

    def forward_loss(self, imgs, pred, mask):
        """Eq. (3) of docs/METHOD.md: MSE to per-patch normalised pixels, averaged over hidden patches."""
        target = patchify(imgs, self.patch)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)  # (B, N)
        return (loss * mask).sum() / mask.sum()


def make_checkpoint(mae: MAE, step: int, loss: float, cfg: Settings, optimizer=None, rngs=None) -> dict:
    """Our MAE layout; without optimizer and RNG states it is the slim export.

    Host tensors: a plain torch.load of a file written on a GPU then works on a machine without one."""
    sd = mae.state_dict()
    for k, v in sd.items():
        sd[k] = v.cpu()
    ck = {"model": sd, "arch": mae.arch(), "decoder": dict(mae.dec_arch),
          "step": step, "loss": loss, "settings": asdict(cfg)}
    if optimizer is not None:
        ck.update(optimizer=optimizer.state_dict(), rng=rngs)
    return ck


def resume(ck: dict, path: str, mae: MAE, cfg: Settings, d: common.Dist, optimizer=None):
    """Raise UserError unless ck (read from path) is a checkpoint of this run.

    With the optimizer, load it into the model, optimizer and this rank's generators: returns (step, loss, the losses
    since the last log line)."""
    if not isinstance(ck, dict) or "optimizer" not in ck or "rng" not in ck:
        raise UserError(f"{path} is not a pretrain.py run checkpoint; use another --out or --no-resume")
    if ck["arch"] != mae.arch() or ck["decoder"] != mae.dec_arch:
        raise UserError(f"{path} holds another model ({ck['arch']}, decoder {ck['decoder']}); "
                        f"give the same model settings, another --out, or --no-resume")
    if ck["settings"]["batch_size"] * len(ck["rng"]) != cfg.batch_size * d.world:
        raise UserError(f"{path} was trained with {len(ck['rng'])} process(es) x batch "
                        f"{ck['settings']['batch_size']}; resume with the same, or use --no-resume")
    if optimizer is None:
        return None
    mae.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    set_rng_state(ck["rng"][d.rank])
    return ck["step"], ck["loss"], ck.get("window", [])


def main(cfg: Settings) -> dict:
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise UserError(f"--mask-ratio {cfg.mask_ratio} must lie strictly between 0 and 1 (MAE: 0.75)")
    if not 0.0 < cfg.crop_min <= 1.0 or cfg.batch_size < 1:
        raise UserError(f"--crop-min {cfg.crop_min} must be in (0, 1] and --batch-size {cfg.batch_size} positive")
    d = common.setup_distributed(cfg.device)
    with Run(cfg.out, d) as run:  # the folder, its lock; SIGTERM/SIGUSR1/SIGINT: checkpoint after the step
        common.seed_everything(cfg.seed)  # the same initial weights on every rank
        mae = MAE(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, dim=cfg.dim, depth=cfg.depth,
                  heads=cfg.num_heads or None, patch=cfg.patch, img_size=cfg.img_size).to(d.device)
        # image i of epoch e drawn from (seed, e, i): the same images whatever the workers, and on resuming
        data = Seeded(build_dataset(cfg.data, "train", labels=False), train_transform(cfg.img_size, cfg.crop_min),
                      cfg.seed)
        keys = EpochKeys(range(len(data)), d.world, d.rank, cfg.seed)  # the one loader's sampler
        steps_per_epoch = keys.per_rank // cfg.batch_size
        if steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} x {d.world} process(es) is larger than the "
                            f"{len(data)} training images; use a smaller --batch-size")
        total = cfg.epochs * steps_per_epoch
        end = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        peak = cfg.base_lr * cfg.batch_size * d.world / 256  # the linear scaling rule
        optimizer = torch.optim.AdamW(common.param_groups(mae, cfg.weight_decay, prefix=""), lr=peak, betas=(0.9, 0.95))

        common.seed_everything(cfg.seed + 1000 * (d.rank + 1))  # every rank masks differently
        last, log_path = run.last, os.path.join(cfg.out, "log.jsonl")
        ck = run.resume(lambda ck, path: resume(ck, path, mae, cfg, d)) if cfg.resume else None  # or last.prev.pt
        step, loss_logged, window = resume(ck, last, mae, cfg, d, optimizer) if ck else (0, float("nan"), [])
        if d.main:
            trim_log(log_path, step)
            print(f"MAE: encoder {mae.arch()}, decoder {mae.dec_arch}; {len(data)} images, "
                  f"{steps_per_epoch} steps/epoch, global batch {cfg.batch_size * d.world}, lr {peak:.3g}; "
                  f"steps {step} -> {end} of {total}")

        net = mae  # net(imgs, mask_ratio) is the loss
        if d.world > 1:  # positions are fixed buffers: nothing to broadcast
            net = DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                          broadcast_buffers=False)
        if cfg.compile:
            net = torch.compile(net)
        # one loader for the run, so its workers persist; its own generator, as starting an epoch must
        # not draw from the global one (the masks)
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=keys, drop_last=True,
                            generator=torch.Generator(), **loader_kwargs(d.device, cfg.workers))
        bar = tqdm(total=end, initial=step, desc="pretrain", disable=not d.main, dynamic_ncols=True)
        start = time.time()
        while step < end:
            epoch, done = divmod(step, steps_per_epoch)
            keys.start(epoch, done * cfg.batch_size)  # less the batches done
            for imgs, _ in loader:
                lr = common.warmup_cosine(step, total, warmup, peak, cfg.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]  # 1: MAE has no layer decay
                with torch.autocast(d.device.type, torch.bfloat16, enabled=d.device.type == "cuda"):
                    loss = net(imgs.to(d.device, non_blocking=True), cfg.mask_ratio)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # queued before the step's one host sync, the loss check
                loss_value, stopping = run.gather_loss(loss)  # the same on all ranks; a signal to any stops all
                if not math.isfinite(loss_value):  # stop before the update: the weights stay good
                    raise UserError(f"the loss is not finite at step {step + 1}; {last} keeps the last good state "
                                    f"(if any); lower --base-lr or lengthen --warmup-epochs")
                optimizer.step()
                step += 1
                window.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", epoch=epoch)
                if step % cfg.log_every == 0 or step == end:
                    loss_logged = sum(window) / len(window)  # mean since the previous line
                    window = []
                    if d.main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": loss_logged,
                                                "lr": lr, "time": round(time.time() - start, 2)}) + "\n")
                if step % cfg.save_every == 0 or step == end or stopping:
                    rngs = all_rng_states(d.world)  # a collective: every rank takes part
                    if not common.all_finite(mae):  # a diverged update must not overwrite a good file
                        raise UserError(f"the weights are not finite at step {step}; {last} keeps the last good state")
                    if d.main:
                        run.save({**make_checkpoint(mae, step, loss_logged, cfg, optimizer, rngs), "window": window})
                run.stop_if(stopping and step < end, step)  # after the checkpoint: every rank exits with code 3
                if step == end:
                    break
        bar.close()
        if d.main:
            write_encoder(export_encoder(mae), cfg.out)  # encoder.pth and encoder.safetensors
            if cfg.export:
                common.save_atomic(make_checkpoint(mae, step, loss_logged, cfg), cfg.export)
            print(f"step {step}: loss {loss_logged:.4f}; wrote {last}, encoder.pth {cfg.export}")
        return {"step": step, "loss": loss_logged, "out": cfg.out, "seconds": time.time() - start}


if __name__ == "__main__":
    cli(main, Settings)
