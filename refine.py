"""Contrastive refinement of a masked-image-modeling ViT: MIM-Refiner and MAE-CT (docs/METHOD.md §4-8).

MIM-Refiner (Alkin et al. 2024, arXiv 2402.10093): a contrastive head on every block of the last
third, nearest-neighbour alignment (NNA) over 2 global + local multi-crop views, whole encoder tuned.
MAE-CT (Lehner et al. 2023, arXiv 2304.10520): one NNCLR head on the last block, crop & flip views,
lower half of the encoder frozen, neighbours looked up with an EMA copy of the projector.
One command runs both phases (docs/METHOD.md §7): the heads warm up on the frozen encoder (top-1 neighbour),
then encoder and heads train together (top-k); the queue carries over. Rerun with the same --out to resume from
OUT/last.pt (on SIGTERM/SIGUSR1/SIGINT written after the step, then exit code 3). OUT/encoder.pth, .safetensors:
the EMA encoder in MAE/timm layout. Settings left out (None in --help) follow the encoder and data (recipe.py), printed.

CPU, the embedded default (about 10 min each on one core, 6.5 with --precision bf16 where the CPU has bf16 units;
k-NN of the committed MAE 43% -> 64-66%: README):
    python refine.py --feature mean --out runs/mim-refiner
    torchrun --standalone --nproc_per_node=2 refine.py --method mae-ct --feature mean --device cpu --out runs/mae-ct
ImageNet on 8 GPUs (k-NN from public MAEs: MIM-Refiner ViT-L/16 60.6 -> 81.5; MAE-CT ViT-H/14 58.9 -> 79.1):
    torchrun --nproc_per_node=8 refine.py --ckpt mae_pretrain_vit_large.pth --data /imagenet \\
        --pairing official --out runs/l16
"""
import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import model
from model import UserError
from recipe import resolve, scale_of
from util import common
from util.common import opt
from util.data import EpochKeys, loader_kwargs
from util.resume import Run, data_of, rng_state, set_rng_state, trim_log, write_encoder
from util.views import Views, make_views, to_input, train_set


@dataclass
class Settings:
    """Every setting left at None ("by recipe") takes recipe.py's value for the encoder and data: printed."""
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "pre-trained encoder, any layout load_encoder reads")
    num_heads: int = opt(0, "attention heads of --ckpt; 0 = as the file stores them, else by width (printed)")
    data: str = opt("jittered-digits", "jittered-digits, a folder of images, or one with train/ (class folders)")
    out: str = opt("runs/refine", "output folder: last.pt (resumable), encoder.pth/.safetensors, log.jsonl")
    method: str = opt("mim-refiner", "mim-refiner or mae-ct")
    views: Optional[str] = opt(None, "multicrop (2 global + local crops, BYOL) or crop-flip; by method")
    local_crops: Optional[int] = opt(None, "local crops of multicrop; by scale (10, small 0)")
    global_size: Optional[int] = opt(None, "global crop side in px; by recipe the encoder's native image size")
    local_size: Optional[int] = opt(None, "local crop side; by recipe 96/224 of the global side, a multiple of "
                                          "the patch")
    global_crop_min: Optional[float] = opt(None, "smallest area fraction of a global crop; by scale "
                                                 "(0.25, MAE-CT 0.08; small 0.3)")
    local_crop_min: Optional[float] = opt(None, "smallest area fraction of a local crop (the largest is "
                                                "--global-crop-min); by scale (0.05, small 0.25)")
    jitter: Optional[float] = opt(None, "colour jitter strength of multicrop views, x BYOL's (0.4, 0.4, 0.2, "
                                        "0.1); by scale (1, small 2: the digits' grey levels are nuisance)")
    neighbours: Optional[str] = opt(None, "phases whose positives are queue neighbours: all, refine (not the "
                                          "heads' warm-up: its anchors are their own), none (the augmentation-only "
                                          "control); by scale (all; small: refine)")
    heads: Optional[str] = opt(None, "blocks with a head, e.g. 17-24 or 18,20,24; by depth (docs/METHOD.md §8)")
    feature: str = opt("cls", "what the heads read: cls (CLS token) or mean (of the patch tokens)")
    freeze_blocks: Optional[int] = opt(None, "lower blocks (+ stem) frozen in phase 2; by method (MAE-CT half)")
    head_epochs: Optional[int] = opt(None, "phase 1: heads on the frozen encoder; 0 skips; by scale (20, small 1)")
    epochs: Optional[int] = opt(None, "phase 2: encoder and heads; by scale (30/30/20 L/H/2b; MAE-CT 20/30 L/H)")
    batch_size: Optional[int] = opt(None, "images per process; by recipe the global batch (1024, huge 512) / world")
    lr: Optional[float] = opt(None, "phase 2 lr per 256 images (MAE-CT: 128); by method (4e-4, MAE-CT 1e-4)")
    head_lr: Optional[float] = opt(None, "phase 1 lr per 256 images (MAE-CT: 128); by method (2e-4, MAE-CT 1e-4)")
    min_lr: float = opt(1e-6, "end of the cosine schedule")
    head_warmup_epochs: Optional[float] = opt(None, "phase 1 linear warm-up in epochs (at most the phase); "
                                                    "by method (4, MAE-CT 20% of the phase)")
    warmup_epochs: Optional[float] = opt(None, "phase 2 linear warm-up in epochs (at most the phase); "
                                               "by method (4, MAE-CT 20% of the phase)")
    weight_decay: float = opt(0.05, "AdamW weight decay of the encoder")
    head_weight_decay: float = opt(1e-5, "AdamW weight decay of the heads")
    layer_decay: Optional[float] = opt(None, "layer-wise lr decay: block j gets decay^(depth+1-j); by scale "
                                             "(0.65, small 1)")
    temperature: Optional[float] = opt(None, "phase 2 tau; by scale (.2/.3/.35 L/H/2b, MAE-CT .15/.2/.3 B/L/H)")
    head_temperature: Optional[float] = opt(None, "phase 1 tau; by method (MAE-CT 0.15, else the phase 2 tau)")
    topk: Optional[int] = opt(None, "phase 2 picks the neighbour uniformly among the top-k (phase 1: top-1); "
                                    "by scale (20, small 5)")
    queue_size: Optional[int] = opt(None, "queue entries; by scale (65536, small 4096; at most half the train set)")
    proj_hidden: Optional[int] = opt(None, "projector hidden width; by scale (2048, small 512)")
    proj_dim: Optional[int] = opt(None, "projection width; by scale (256, small 128)")
    pred_hidden: Optional[int] = opt(None, "predictor hidden width; by scale (4096, small 1024)")
    ema_momentum: Optional[float] = opt(None, "EMA encoder momentum per step; by scale (0.9999, small 0.95)")
    target_momentum: Optional[float] = opt(None, "MAE-CT's EMA projector momentum; by scale (0.99, huge 0.995)")
    workers: Optional[int] = opt(None, "data loader processes per rank; by device (10 on CUDA, 0 on CPU)")
    max_steps: int = opt(0, "stop after N optimizer steps in all (saves as at the end); 0 = run all")
    limit_train: int = opt(0, "use N training images, evenly spaced over the (sorted) classes; 0 = all")
    save_every: int = opt(500, "write OUT/last.pt every N steps (and at the end)")
    log_every: int = opt(10, "append a line to OUT/log.jsonl every N steps")
    seed: int = opt(0, "seed of initialisation, data order, augmentation and neighbour picks")
    device: str = opt("auto", "auto, cpu or cuda")
    compile: bool = opt(False, "torch.compile the model")
    precision: str = opt("auto", "bf16 (autocast), fp32, or auto: bf16 on CUDA, fp32 on a CPU (bf16 there is ~1.7x "
                                 "faster only where the CPU has bf16 units: AVX512-BF16, AMX)")
    grad_checkpointing: bool = opt(False, "recompute block activations in the backward pass (less memory)")
    pairing: str = opt("intended", "MIM-Refiner's view pairs: intended (each global view with every other view, "
                                   "Eq. (9)) or official (the public code's terms, Eq. (9'); 22 for 10 locals)")


FREE_ON_RESUME = {"ckpt", "out", "max_steps", "save_every", "log_every", "device", "workers",  # settings a resumed
                  "compile", "grad_checkpointing"}  # run may change without changing the result


# --- Model, optimiser, objectives ---

class Refiner(nn.Module):
    """What trains, one module for DDP: the encoder and one contrastive head per chosen block.

    per_view (MAE-CT): each view through the heads alone, BatchNorm statistics of one view (MIM-Refiner: all)."""

    def __init__(self, vit, blocks, feature: str, per_view: bool = False, **head_kwargs):
        super().__init__()
        self.vit, self.blocks, self.feature, self.per_view = vit, blocks, feature, per_view
        self.heads = nn.ModuleDict({str(b): model.ContrastiveHead(vit.dim, **head_kwargs) for b in blocks})

    def forward(self, views):
        """Eq. (4) of docs/METHOD.md: views [(B, C, H, W)], global first -> features and projections per block.

        Features {block: (V*B, D)}, {block: (z, p)} each (V*B, d), views in order. Views of one resolution run together
        through the encoder (local: interpolated positions); through the heads, see per_view."""
        h = {b: [] for b in self.blocks}
        for _, same in itertools.groupby(views, key=lambda v: v.shape):
            x = torch.cat(list(same))  # (n*B, C, H, W)
            for b, t in zip(self.blocks, self.vit.forward_blocks(x, self.blocks)):  # t (n*B, 1+N, D)
                if b == self.vit.depth:  # the last block's head reads the final-normed output
                    t = self.vit.final_norm(t)
                h[b].append(t[:, 0] if self.feature == "cls" else t[:, 1:].mean(1))  # (n*B, D)
        h, n = {b: torch.cat(f) for b, f in h.items()}, len(views) if self.per_view else 1  # n row blocks
        return h, {b: tuple(map(torch.cat, zip(*map(self.heads[str(b)], h[b].chunk(n))))) for b in self.blocks}


def set_trainable(refiner: Refiner, phase: str, freeze_blocks: int):
    """Make what trains in `phase` trainable: "heads" the heads only, "refine" the encoder too.

    Never the frozen lower blocks (nor the stem if any), nor what no head reads (blocks past the last head,
    the final norm unless the last block has a head): DDP without find_unused_parameters needs a gradient
    for each."""
    vit, last = refiner.vit, max(refiner.blocks)
    for name, p in vit.named_parameters():
        if name.startswith("blocks."):
            train = freeze_blocks < int(name.split(".")[1]) + 1 <= last
        elif name.startswith("norm."):
            train = last == vit.depth
        else:  # the stem: patch embedding, CLS token, post-norm embedding norm
            train = freeze_blocks == 0
        p.requires_grad_(phase == "refine" and train)


def mim_refiner_loss(z, nns, p_all, tau: float, offset: int, pairing: str = "intended"):
    """Eq. (9) of docs/METHOD.md: the MIM-Refiner objective, NNA for every pair of views.

    The pairs: anchor = global view i, prediction = view v, v != i, over all 2 + V views; the mean of the 2 * (1 + V)
    terms. z, nns: this rank's projections and neighbours per view [(B, d)]; p_all: each view's predictions of all
    ranks [(W*B, d)]. pairing="official", Eq. (9'): the public code's, cross-global pairs, then each anchor with views
    0..V-1."""
    v = len(p_all)
    pairs = ([(i, 1 - i) for i in range(2)] + [(i, j) for i in range(2) for j in range(v - 2)] if pairing == "official"
             else [(i, j) for i in range(2) for j in range(v) if j != i])
    terms = [model.nna_loss(z[i], nns[i], p_all[j], tau, offset) for i, j in pairs]
    return sum(terms) / len(terms)


def mae_ct_loss(nns, p_all, tau: float, offset: int):
    """Eq. (11) of docs/METHOD.md: the MAE-CT objective, NNCLR of the two views, both directions, averaged."""
    return sum(model.nnclr_loss(nns[i], p_all[1 - i], tau, offset) for i in range(2)) / 2


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float):
    """Eq. (12) of docs/METHOD.md: ema <- momentum * ema + (1 - momentum) * online, parameters only.

    Used for the EMA encoder and MAE-CT's target projector; each parameter of `ema` follows the one of the same name
    in `online`, which may hold more (tools/pilot_mim.py: an MAE's encoder and decoder behind an encoder-only EMA)."""
    by_name = dict(online.named_parameters())
    for name, e in ema.named_parameters():
        e.lerp_(by_name[name].detach(), 1 - momentum)  # SOLUTION task=7


PHASES = ("heads", "refine")  # docs/METHOD.md §7: the heads warm up, then everything refines


@dataclass
class Phase:
    """One of the run's two phases (docs/METHOD.md §7), steps [first, first + steps) of the run."""
    name: str  # "heads": the heads on the frozen encoder; "refine": encoder and heads together
    first: int
    steps: int
    peak_lr: float  # for the global batch
    warmup: int  # steps of linear warm-up
    tau: float
    topk: int  # the positive is drawn among the top-k neighbours
    neighbours: bool  # positives from the queues; False: each anchor's own projection (the control)


def make_phases(cfg, spe: int, gb: int) -> list:
    """Both phases at `spe` steps per epoch.

    The peak lr scales with the global batch `gb` (MAE-CT counts both views, docs/METHOD.md §8); the warm-up is counted
    in epochs, at most the phase."""
    mult = gb / 256 * (1 if cfg.method == "mim-refiner" else 2)
    per_phase = [(cfg.head_epochs, cfg.head_lr, cfg.head_warmup_epochs, cfg.head_temperature, 1),
                 (cfg.epochs, cfg.lr, cfg.warmup_epochs, cfg.temperature, cfg.topk)]
    return [Phase(name, i * cfg.head_epochs * spe, ep * spe, lr * mult, min(ep * spe, round(warm * spe)), tau, k,
                  cfg.neighbours in ("all", name))
            for i, (name, (ep, lr, warm, tau, k)) in enumerate(zip(PHASES, per_phase))]


@dataclass
class Parts:
    """What a refinement trains and keeps besides the optimizer, all of it in last.pt."""
    refiner: Refiner  # the encoder and one contrastive head per chosen block
    ema: nn.Module  # the EMA encoder, what encoder.pth gets
    queues: nn.ModuleDict  # one nearest-neighbour queue per head
    targets: nn.ModuleDict  # MAE-CT: the EMA copy of each head's projector (MIM-Refiner: empty)

    def state(self) -> dict:
        return dict(encoder=self.refiner.vit, ema=self.ema, heads=self.refiner.heads, queues=self.queues,
                    targets=self.targets)


def heads_loss(net, parts: Parts, views, idx, phase: Phase, mim: bool, offset: int, gen, pairing: str):
    """One step's loss: Eq. (9) (MIM-Refiner) or Eq. (11) (MAE-CT) per head, summed over the heads.

    Neighbours are drawn from each head's queue by `gen`; also returned, per head, the first global view's projections
    (B, d), what the queue gets. offset: this rank's first row in the gathered batch."""
    loss, first_view = 0.0, {}
    h, zp = net(views)  # h {block: (V*B, D)}, zp {block: (z, p)} each (V*B, d)
    for b, (z, p) in zp.items():
        if not mim and phase.name == "refine":  # MAE-CT's refinement: the EMA projector's projections, view by view
            with torch.no_grad():
                z = torch.cat([parts.targets[str(b)](x) for x in h[b].detach().chunk(len(views))])
        z = z.detach().float().chunk(len(views))  # per view (B, d)
        p_all = [common.all_gather(pv, grad=True) for pv in p.chunk(len(views))]  # [(W*B, d)]
        nns = [parts.queues[str(b)].lookup(z[i], idx, phase.topk, gen) if phase.neighbours else z[i]
               for i in range(2)]  # (B, d) each
        loss = loss + (mim_refiner_loss(z, nns, p_all, phase.tau, offset, pairing) if mim
                       else mae_ct_loss(nns, p_all, phase.tau, offset))  # heads summed
        first_view[b] = z[0]
    return loss, first_view


def refine_step(net, optim, parts: Parts, views, idx, phase: Phase, step: int, cfg, rank: int = 0,
                sync=lambda loss: (loss.item(), False)) -> tuple:
    """One optimizer step (docs/METHOD.md §7); returns (loss value, stop).

    The heads' losses with neighbours from the queues, backward, AdamW; then every head's queue takes every rank's
    first global view (Eq. (7)) and, in phase 2, the EMA encoder and MAE-CT's target projectors follow (Eq. (12)).
    views: normalised, on the device, global first; idx (B,): their data set indices. sync(loss) -> (value, stop) is
    the step's one host sync (refine.main's also averages over the ranks and carries a stop signal)."""
    gen = torch.Generator(views[0].device).manual_seed((cfg.seed * 10**9 + step) * 10**4 + rank)  # the picks
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and views[0].is_cuda)
    with torch.autocast(views[0].device.type, torch.bfloat16, enabled=bf16):
        loss, first_view = heads_loss(net, parts, views, idx, phase, cfg.method == "mim-refiner",
                                      rank * len(idx), gen, cfg.pairing)  # row j's positive: column offset + j
    optim.zero_grad(set_to_none=True)
    loss.backward()  # queued before the host sync
    value, stop = sync(loss)
    if not math.isfinite(value):
        raise UserError(f"the loss is not finite at step {step + 1}; {cfg.out}/last.pt keeps the last good state")
    optim.step()
    for b, queue in parts.queues.items():  # (W*B, d) and the data set indices (W*B,)
        queue.enqueue(common.all_gather(first_view[int(b)]), common.all_gather(idx))
    if phase.name == "refine":  # the warm-up leaves the encoder untouched, so its EMA stays equal
        ema_update(parts.ema, parts.refiner.vit, cfg.ema_momentum)
        for b, target in parts.targets.items():
            ema_update(target, parts.refiner.heads[b].projector, cfg.target_momentum)
    return value, stop


def check_same_settings(ck: dict, cfg, world: int, last: str, n_train: int = 0):
    """A resumed run has the settings of the one that wrote `last`, but for FREE_ON_RESUME (and a moved --data)."""
    old = dict(ck["settings"], batch_size=ck["global_batch"] // world, data=data_of(ck, cfg.data, n_train))
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in FREE_ON_RESUME and k in old and old[k] != v]
    if diff:
        raise UserError(f"{last} was written with other settings ({'; '.join(diff[:3])}); "
                        f"rerun with the same flags or give a new --out")


def start_phase(parts: Parts, cfg, phase: Phase, d, ck):
    """What trains in `phase`, wrapped for DDP, and a new AdamW.

    The wrapper is rebuilt per phase, as what trains changes. Resuming inside this phase: with the optimizer state of
    the checkpoint `ck`. As the second phase starts (not resumes), MAE-CT's target projectors become exact copies of
    the projectors."""
    refiner = parts.refiner
    set_trainable(refiner, phase.name, cfg.freeze_blocks)
    if phase.name == "refine" and not (ck and ck["phase"] == "refine"):
        for b, target in parts.targets.items():  # weights and BatchNorm statistics
            target.load_state_dict(refiner.heads[b].projector.state_dict())
    gc.collect()  # the last phase's DDP wrapper, dropped by the caller, drops its gradient hooks
    net = refiner if d.world == 1 else DDP(refiner, [d.device] if d.device.type == "cuda" else None)
    groups = common.param_groups(refiner, cfg.weight_decay, cfg.layer_decay, refiner.vit.depth,
                                 head_weight_decay=cfg.head_weight_decay)  # what trains in this phase
    optim = torch.optim.AdamW(groups, lr=phase.peak_lr, betas=(0.9, 0.95))
    if ck and ck["phase"] == phase.name:  # resuming inside this phase
        optim.load_state_dict(ck["optimizer"])
    return net, optim


def build(cfg, vit) -> Parts:
    """The heads, queues, EMA encoder and target projectors around `vit`, seeded alike on every rank."""
    mim = cfg.method == "mim-refiner"
    blocks = [int(b) for b in cfg.heads.split(",")]
    refiner = Refiner(vit, blocks, cfg.feature, not mim, proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim,
                      pred_hidden=cfg.pred_hidden, act="gelu" if mim else "relu", predictor_bn=mim)
    queues = nn.ModuleDict({str(b): model.NNQueue(cfg.queue_size, cfg.proj_dim) for b in blocks})
    # MAE-CT looks up and enqueues with an EMA copy of the projector in phase 2 (docs/METHOD.md §6)
    targets = nn.ModuleDict({} if mim else {b: copy.deepcopy(h.projector) for b, h in refiner.heads.items()})
    return Parts(refiner, copy.deepcopy(vit).requires_grad_(False), queues, targets)


# --- Training ---

def main(cfg: Settings) -> dict:
    d = common.setup_distributed(cfg.device)
    with Run(cfg.out, d) as run:  # the folder, its lock; SIGTERM/SIGUSR1/SIGINT: checkpoint after the step
        common.seed_everything(cfg.seed)  # the same heads and queues on every rank
        data = train_set(cfg)
        resumed = None  # the recipe resolved for the encoder of the checkpoint resumed from

        def check(ck, path):  # last.pt, or last.prev.pt if it cannot be used
            nonlocal resumed
            resumed = resolve(cfg, SimpleNamespace(**ck["arch"]), d.world, len(data))
            check_same_settings(ck, resumed, d.world, path, len(data))
        ck, last = run.resume(check), run.last
        vit = (model.ViT(**ck["arch"], grad_checkpointing=cfg.grad_checkpointing) if ck
               else model.load_encoder(cfg.ckpt, cfg.num_heads or None, grad_checkpointing=cfg.grad_checkpointing))
        for blk in vit.blocks if cfg.compile else []:  # per block, in place: keys stay, memory as checkpointed
            blk.compile()
        cfg = resumed if ck else resolve(cfg, vit, d.world, len(data))  # the recipe, resolved once
        gb = cfg.batch_size * d.world
        views = make_views(cfg)
        data, keys = Views(data, views, cfg.seed), EpochKeys(range(len(data)), d.world, d.rank, cfg.seed)
        loader = DataLoader(data, cfg.batch_size, sampler=keys, drop_last=True, generator=torch.Generator(),
                            **loader_kwargs(d.device, cfg.workers))
        parts = build(cfg, vit)
        for key, part in parts.state().items():
            if ck:
                model.load_state_dict_strict(part, ck[key], f"{last} ({key})")
            part.to(d.device)
        step = ck["step"] if ck else 0
        if ck:  # (the run draws on its own generators; restored for whatever else may draw)
            set_rng_state(ck["rng"])
        spe = keys.per_rank // cfg.batch_size  # steps per epoch
        phases, total = make_phases(cfg, spe, gb), (cfg.head_epochs + cfg.epochs) * spe
        stop = min(total, cfg.max_steps or total)
        if d.main:
            print(f"refine.py: {cfg.method} on {cfg.data} ({len(data)} images), encoder {vit.arch()} "
                  f"{getattr(vit, 'heads_from', '')}, world {d.world} x {d.device}, torch {torch.__version__}\n"
                  f"recipe: {' ('.join(scale_of(vit, len(data)))})\n"
                  f"heads on blocks {cfg.heads}; views 2x{cfg.global_size} + {cfg.local_crops}x{cfg.local_size} px; "
                  f"global batch {gb}; lr {phases[0].peak_lr:.3g} / {phases[1].peak_lr:.3g} for {cfg.head_epochs} + "
                  f"{cfg.epochs} epochs of {spe} steps" + (f"; resuming at step {step}" if ck else "")
                  + "\nsettings: " + json.dumps(dataclasses.asdict(cfg)))
            trim_log(os.path.join(cfg.out, "log.jsonl"), step)  # a killed run logged past last.pt

        def save(phase, optim):  # every rank checks (the weights are the same), so all stop together
            if not all(map(common.all_finite, parts.state().values())):  # a diverged update keeps the last file
                raise UserError(f"the weights are not finite at step {step}; {last} keeps the last good state")
            if d.main:
                run.save({**{k: m.state_dict() for k, m in parts.state().items()}, "arch": vit.arch(), "phase": phase,
                          "optimizer": optim.state_dict(), "step": step, "global_batch": gb, "loss": loss_value,
                          "settings": dataclasses.asdict(cfg), "rng": rng_state(), "n_train": len(data)})

        bar = tqdm(total=stop, initial=step, disable=not d.main, desc=cfg.method, dynamic_ncols=True)
        phase, net, loss_value, t0, step0 = None, None, (ck or {}).get("loss", math.nan), time.perf_counter(), step
        while step < stop:
            epoch = step // spe
            if phase is not phases[epoch >= cfg.head_epochs]:  # a phase starts (or resumes)
                phase, net = phases[epoch >= cfg.head_epochs], None  # the last wrapper goes before the next
                net, optim = start_phase(parts, cfg, phase, d, ck)
                ck = None
            keys.start(epoch, (step - epoch * spe) * cfg.batch_size)  # less the batches done
            for (crops, params), idx in loader:  # uint8 crops and their photometric parameters
                lr = common.warmup_cosine(step - phase.first, phase.steps, phase.warmup, phase.peak_lr, cfg.min_lr)
                for g in optim.param_groups:  # Eq. (14), times each group's layer-wise scale (Eq. (13))
                    g["lr"] = lr * g["lr_scale"]
                x = to_input(crops, params, views, d.device)  # colour jitter, blur, ... on the device, batched
                idx = idx.to(d.device, non_blocking=True)
                loss_value, stopping = refine_step(net, optim, parts, x, idx, phase, step, cfg, d.rank,
                                                   run.gather_loss)  # the same on every rank; a signal stops all
                step += 1
                ips = gb * (step - step0) / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                if d.main and (step % cfg.log_every == 0 or step == stop):
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, loss=loss_value, lr=lr, images_per_s=ips,
                                                phase=phase.name, epoch=epoch)) + "\n")
                if step % cfg.save_every == 0 or step == stop or stopping:
                    save(phase.name, optim)
                run.stop_if(stopping and step < stop, step)  # after the checkpoint: every rank exits with code 3
                if step >= stop:
                    break
        bar.close()
        out = os.path.join(cfg.out, "encoder.pth")
        if d.main:
            write_encoder(model.export_encoder(parts.ema), cfg.out)  # and encoder.safetensors
            print(f"step {step}/{total}: loss {loss_value:.4f}; EMA encoder -> {out}")
        return dict(step=step, loss=loss_value, encoder=out, global_batch=gb, settings=dataclasses.asdict(cfg))


if __name__ == "__main__":
    common.cli(main, Settings)
