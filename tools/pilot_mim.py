"""Pilots of two other MIM objectives for the tiny encoder, to see whether its per-block k-NN peaks before the end.

MIM-Refiner's premise is an MIM encoder whose best features sit before its last blocks; no MAE of pretrain.py showed
that at this scale (BENCHMARKS.md). Two objectives where the last blocks do more of the reconstruction:

--objective d2v2: data2vec 2.0 (Baevski et al. 2023, arXiv 2212.07525), the encoder whose k-NN falls most after its
peak in MIM-Refiner's Fig. 1. The student is pretrain.py's MAE (encoder on the visible patches, light decoder with mask
tokens) whose decoder predicts, at every hidden patch, the teacher's target instead of pixels (`d2v2_targets`,
`d2v2_loss`, Eqs. (27)-(28) of docs/METHOD.md): an EMA copy of the encoder sees the whole image; the patch tokens of
each of its top K blocks are instance-normalised over the patches, averaged, and layer-normalised. M masks per image
share one teacher pass (multi-mask). Sized for a CPU, it deviates from the paper: uniform random masks (not inverse
block masks), pretrain.py's transformer decoder (not convolutions), block outputs as targets (not the feed-forward
output before the residual), no CLS loss, EMA momentum rising linearly from --ema-start to --ema-end over the run.
--objective simmim: SimMIM (Xie et al. 2022, arXiv 2111.09886) with BEiT's placement: a learned mask token replaces
each hidden patch at the encoder's input, a linear map of the last block's tokens predicts the hidden patches' pixels
(pretrain.py's Eq. (3), normalised pixels, not SimMIM's L1), no decoder; BEiT's linear probe peaks at block 9 of 12.

CPU, one thread (bf16 autocast where the CPU has bf16 units, demo.precision), the pilots of BENCHMARKS.md, then
per-block k-NN and probe on the selection split:
    OMP_NUM_THREADS=1 python tools/pilot_mim.py --objective d2v2 --out runs/pilot-d2v2
    OMP_NUM_THREADS=1 python tools/pilot_mim.py --objective simmim --mask-ratio 0.6 --clones 1 --batch-size 128 \
        --out runs/pilot-simmim
    python tools/pilot_eval.py runs/pilot-d2v2/encoder.pth
OUT/last.pt (student, teacher, optimizer, step, RNG; rerun the command to resume, also after SIGTERM or Ctrl-C),
OUT/encoder.pth (the student, as data2vec 2.0 releases it), OUT/teacher.pth (its EMA), OUT/log.jsonl.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402
import pretrain  # noqa: E402
import refine  # noqa: E402
from model import UserError, ViT, export_encoder, init_weights  # noqa: E402
from util import common  # noqa: E402
from util.common import opt  # noqa: E402
from util.data import EpochKeys, Seeded, build_dataset, train_transform  # noqa: E402
from util.resume import Run, rng_state, set_rng_state, trim_log, write_encoder  # noqa: E402


@dataclass
class Settings:
    objective: str = opt("d2v2", "d2v2 (data2vec 2.0-style targets) or simmim (mask tokens in the encoder, pixels)")
    data: str = opt("jittered-digits", "training images, as pretrain.py's --data")
    out: str = opt("runs/pilot-d2v2", "output folder; resumed if it holds last.pt")
    dim: int = opt(128, "encoder width")
    depth: int = opt(12, "encoder blocks")
    num_heads: int = opt(4, "encoder attention heads")
    dec_dim: int = opt(64, "decoder width")
    dec_depth: int = opt(1, "decoder blocks")
    top_k: int = opt(10, "teacher blocks averaged into the target (data2vec 2.0 ViT-B: 10 of 12)")
    mask_ratio: float = opt(0.8, "fraction of the patches hidden from the student")
    clones: int = opt(4, "masks per image sharing one teacher pass")
    batch_size: int = opt(64, "images per step (times --clones masked samples)")
    steps: int = opt(2400, "optimizer steps, the length of the schedules")
    max_steps: int = opt(0, "stop after this many steps (the schedules still span --steps); 0 = no limit")
    warmup_steps: int = opt(150, "linear warm-up steps, then cosine to 0")
    lr: float = opt(1.5e-3, "peak learning rate per 256 masked samples")
    ema_start: float = opt(0.99, "teacher EMA momentum at step 0")
    ema_end: float = opt(0.999, "teacher EMA momentum at the last step")
    crop_min: float = opt(0.5, "smallest crop area fraction")
    precision: str = opt("auto", "bf16, fp32, or auto: bf16 where the CPU has bf16 units (demo.precision)")
    save_every: int = opt(100, "write last.pt every this many steps")
    log_every: int = opt(10, "append the step's loss to log.jsonl every this many steps")
    seed: int = opt(0, "seed of weights, data order, crops and masks")


def d2v2_targets(blocks: list):
    """Eq. (27) of docs/METHOD.md: [(B, 1+N, D)] top-K teacher blocks -> (B, N, D) per-token targets.

    Each block's patch tokens are instance-normalised (every channel over the N patches of its image), the K averaged,
    the average layer-normalised over the channels."""
    normed = [F.instance_norm(t[:, 1:].float().transpose(1, 2)).transpose(1, 2) for t in blocks]  # (B, N, D) each
    return F.layer_norm(sum(normed) / len(normed), normed[0].shape[-1:])


def d2v2_loss(pred, target, mask):
    """Eq. (28) of docs/METHOD.md: mean squared error to the targets over the hidden patches (mask 1)."""
    return (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()  # pred, target (B, N, D); mask (B, N)


class SimMIM(ViT):
    """A ViT that reads a learned mask token in place of each hidden patch, and a linear map to the patches' pixels."""

    def __init__(self, **vit_kwargs):
        super().__init__(**vit_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.dim))  # export_encoder leaves it and decoder_* out
        self.decoder_pred = nn.Linear(self.dim, self.patch ** 2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_pred.apply(init_weights)

    def forward_loss(self, imgs, mask_ratio: float):
        """Eq. (3) of docs/METHOD.md on the hidden patches, the encoder having seen mask tokens in their place."""
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, N, D), positions not yet added
        (B, N, _), keep = x.shape, int(x.shape[1] * (1 - mask_ratio))  # as random_masking: N - keep hidden
        mask = (torch.rand(B, N, device=x.device).argsort(1).argsort(1) >= keep).float()  # (B, N), 1 = hidden
        x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x) + self.pos_embed[:, 1:]
        x = self.prepend_cls(x)
        for i in range(self.depth):
            x = self.run_block(i, x)
        pred = self.decoder_pred(self.final_norm(x)[:, 1:])  # (B, N, p*p*C)
        return pretrain.MAE.forward_loss(self, imgs, pred.float(), mask)


def pilot_step(student, teacher, imgs, cfg: Settings, bf16: bool):
    """One step's loss: the teacher's targets of the whole images, the student's predictions on M masked copies.

    SimMIM: its loss on M masked copies (no teacher)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        if cfg.objective == "simmim":
            return student.forward_loss(imgs.repeat_interleave(cfg.clones, 0), cfg.mask_ratio)
        with torch.no_grad():
            target = d2v2_targets(teacher.forward_blocks(imgs, range(cfg.depth - cfg.top_k + 1, cfg.depth + 1)))
        latent, mask, ids_restore = student.forward_encoder(imgs.repeat_interleave(cfg.clones, 0), cfg.mask_ratio)
        pred = student.forward_decoder(latent, ids_restore)  # (B*M, N, D)
    return d2v2_loss(pred, target.repeat_interleave(cfg.clones, 0), mask)  # image i's clones: rows i*M .. i*M+M-1


def same_settings(ck: dict, path: str, cfg: Settings):
    """Refuse to resume a run written with other settings."""
    if {**ck.get("settings", {}), "max_steps": 0} != {**asdict(cfg), "max_steps": 0}:
        raise UserError(f"{path} was written with other settings; give the same flags or another --out")


def main(cfg: Settings) -> dict:
    if not 1 <= cfg.top_k <= cfg.depth or not 0 < cfg.mask_ratio < 1 or cfg.clones < 1:
        raise UserError(f"need 1 <= --top-k ({cfg.top_k}) <= --depth ({cfg.depth}), 0 < --mask-ratio < 1 and "
                        f"--clones >= 1")
    if cfg.objective not in ("d2v2", "simmim"):
        raise UserError(f"unknown --objective {cfg.objective!r}; use d2v2 or simmim")
    d = common.setup_distributed("cpu")
    with Run(cfg.out, d) as run:
        common.seed_everything(cfg.seed)
        arch = dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.num_heads, patch=4, img_size=32)
        if cfg.objective == "simmim":
            student = SimMIM(**arch)
        else:
            student = pretrain.MAE(cfg.dec_dim, cfg.dec_depth, 1, **arch)
            student.decoder_pred = nn.Linear(cfg.dec_dim, cfg.dim)  # predicts D-dim targets, not pixels
            student.decoder_pred.apply(init_weights)
        teacher = ViT(**student.arch()).requires_grad_(False)
        teacher.load_state_dict(export_encoder(student))
        data = Seeded(build_dataset(cfg.data, "train", labels=False), train_transform(32, cfg.crop_min), cfg.seed)
        keys = EpochKeys(range(len(data)), 1, 0, cfg.seed)
        spe = keys.per_rank // cfg.batch_size  # steps per epoch
        peak = cfg.lr * cfg.batch_size * cfg.clones / 256
        optim = torch.optim.AdamW(common.param_groups(student, 0.05, prefix=""), lr=peak, betas=(0.9, 0.95))
        ck = run.resume(lambda ck, path: same_settings(ck, path, cfg))
        step = 0
        if ck:
            student.load_state_dict(ck["student"])
            teacher.load_state_dict(ck["teacher"])
            optim.load_state_dict(ck["optimizer"])
            set_rng_state(ck["rng"])
            step = ck["step"]
        trim_log(os.path.join(cfg.out, "log.jsonl"), step)  # lines a killed run wrote past its checkpoint
        end = min(cfg.steps, cfg.max_steps or cfg.steps)
        bf16 = demo.precision(cfg) == "bf16"
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=keys, drop_last=True, generator=torch.Generator())
        what = "no decoder" if cfg.objective == "simmim" else f"decoder {cfg.dec_depth}x{cfg.dec_dim}, top {cfg.top_k}"
        print(f"pilot_mim {cfg.objective}: {student.arch()}, {what}; {cfg.clones} masks of {cfg.mask_ratio}, "
              f"{'bf16' if bf16 else 'fp32'}; steps {step} -> {end} of {cfg.steps}")
        start = time.time()
        while step < end:
            epoch, done = divmod(step, spe)
            keys.start(epoch, done * cfg.batch_size)
            for imgs, _ in loader:
                lr = common.warmup_cosine(step, cfg.steps, cfg.warmup_steps, peak, 0.0)
                for g in optim.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                loss = pilot_step(student, teacher, imgs, cfg, bf16)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                value, stopping = run.gather_loss(loss)
                if not math.isfinite(value):
                    raise UserError(f"the loss is not finite at step {step + 1}; lower --lr")
                optim.step()
                m = cfg.ema_start + (cfg.ema_end - cfg.ema_start) * step / max(1, cfg.steps - 1)
                refine.ema_update(teacher, student, m)  # Eq. (12), the encoder's parameters
                step += 1
                if step % cfg.log_every == 0:
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, loss=value, lr=lr, ema=m, time=time.time() - start)) + "\n")
                if step % cfg.save_every == 0 or step == end or stopping:
                    run.save(dict(student=student.state_dict(), teacher=teacher.state_dict(),
                                  optimizer=optim.state_dict(), rng=rng_state(), step=step, settings=asdict(cfg)))
                run.stop_if(stopping and step < end, step)
                if step == end:
                    break
        write_encoder(export_encoder(student), cfg.out)
        common.save_atomic(export_encoder(teacher), os.path.join(cfg.out, "teacher.pth"))
        print(f"step {step}: wrote {cfg.out}/encoder.pth and teacher.pth")
        return {"step": step, "out": cfg.out}


if __name__ == "__main__":
    common.cli(main, Settings)
