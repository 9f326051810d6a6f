"""What every stage script shares: settings from the command line, distributed set-up, flags, schedules.

Also file and seed helpers; importing it has no side effects. Data sets: data.py, views.py; --out folders: resume.py."""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import typing

import numpy as np
import torch
import torch.distributed as dist

from model import UserError

# --- Settings: one typed dataclass per script is the single source of flags, defaults, help ---

def opt(default, help: str):
    """A settings field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_settings(cls, argv=None):
    """Dataclass -> argparse: `batch_size` becomes `--batch-size`, booleans `--x/--no-x`."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if typing.get_origin(typ) is typing.Union:  # Optional[X] -> X
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")  # argparse's format
        kind = dict(action=argparse.BooleanOptionalAction) if typ is bool else dict(type=typ)
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=text, **kind)
    return cls(**vars(p.parse_args(argv)))


def cli(main, cls):
    """Run main(settings) from the command line; user errors become one line on stderr, exit 2."""
    try:
        main(parse_settings(cls))
    except UserError as e:  # from a data-loader worker the message comes wrapped: keep its last line
        print("error:", str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1], file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    finally:
        teardown_distributed()


# --- Distributed: a process group only under torchrun / srun (RANK and WORLD_SIZE set) ---

@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    main = property(lambda self: self.rank == 0)  # rank 0 alone prints and writes files


def setup_distributed(device: str = "auto") -> Dist:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"))


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """All ranks' equal-shaped tensors along dim 0, rank order; grad=True: each rank gets its rows' gradient, summed."""
    if world_size() == 1:
        return x
    if grad:
        from torch.distributed.nn.functional import all_gather as all_gather_grad
        return torch.cat(all_gather_grad(x.contiguous()), dim=0)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


# --- Flags that name lists and blocks ---

def parse_ints(spec: str, flag: str) -> list:
    """'10,20' -> [10, 20]; every value must be a positive integer."""
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UserError(f"cannot use {flag} {spec!r}; give positive integers such as 10,20")
    return vals


def parse_blocks(spec: str, depth: int) -> list:
    """'last' | 'all' | '18,20,24' | '17-24' -> sorted block numbers within 1..depth.

    A part 'norm' ('norm', 'last,norm') appends 'norm': the final norm applied to the top block asked (or the last)."""
    parts = str(spec).split(",")
    norm, spec = ["norm"] * ("norm" in parts), ",".join(p for p in parts if p != "norm")
    if spec in ("last", "all") or norm and not spec:
        return ([] if not spec else [depth] if spec == "last" else list(range(1, depth + 1))) + norm
    try:
        out = sorted({b for part in spec.split(",") for lo, _, hi in [part.partition("-")]
                      for b in range(int(lo), int(hi or lo) + 1)})
    except ValueError:
        raise UserError(f"cannot read --blocks {spec!r}; use last, all, a list 18,20,24 or a range 17-24, "
                        f"each with ,norm or not") from None
    bad = [b for b in out if not 1 <= b <= depth] or ([] if out else ["none"])
    if bad:
        raise UserError(f"--blocks {spec}: block {bad[0]} does not exist (the model has blocks 1..{depth})")
    return out + norm


# --- Optimisation: Eq. (13) layer decay and Eq. (14) schedule, for every trainer and the probe ---

def lr_scale(name: str, depth: int, decay: float) -> float:
    """Eq. (13) of docs/METHOD.md: the lr multiplier of the ViT parameter `name` (as named inside the ViT).

    Block j (1..depth) gets decay^(depth+1-j); the stem (patch embedding, CLS token, positions, embedding
    norm) decay^(depth+1); the final norm 1."""
    # BEGIN SOLUTION task=8
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))  # the stored index is j - 1
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "embed_norm.")):
        return decay ** (depth + 1)
    return 1.0
    # END SOLUTION


def param_groups(net, weight_decay: float, layer_decay: float = 1.0, depth: int = 0, prefix: str = "vit.",
                 head_weight_decay: typing.Optional[float] = None) -> list:
    """AdamW groups by (lr scale, weight decay) of the parameters that train now, each with its `lr_scale`.

    Parameters `prefix` + ... are the ViT's, with Eq. (13)'s scale; the rest (heads, a decoder) scale 1 and weight decay
    `head_weight_decay` (default: `weight_decay`). None on 1-D parameters (biases, norms), the tokens and positions."""
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        inner = name[len(prefix):] if name.startswith(prefix) else None
        scale = 1.0 if inner is None else lr_scale(inner, depth, layer_decay)
        wd = weight_decay if inner is not None or head_weight_decay is None else head_weight_decay
        wd = 0.0 if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token")) else wd
        groups.setdefault((scale, wd), dict(params=[], lr_scale=scale, weight_decay=wd))["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Eq. (14) of docs/METHOD.md: linear warm-up to `peak` over `warmup` steps, half a cosine to `floor` at `steps`."""
    # BEGIN PROMPT
    # linear warm-up peak * (step + 1) / warmup, then half a cosine from peak down to floor
    # END PROMPT
    # BEGIN SOLUTION task=9
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))
    # END SOLUTION


# --- Files, seeds ---

def all_finite(module) -> bool:
    """Checked before every checkpoint write, so a diverged update never overwrites a good file."""
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def write_json(path: str, obj):
    if os.path.isdir(path):
        raise UserError(f"--out {path!r} is a folder; give a file name such as results.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_tmp(obj, path: str, save=None) -> str:
    """save(obj, tmp), torch.save by default, to a flushed temporary file beside `path`; a failure leaves none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}-{os.urandom(4).hex()}"  # random bytes: threads of one process do not share it
    try:
        (save or torch.save)(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or OSError for a full disk
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({(str(e).strip() or type(e).__name__).splitlines()[0]}); "
                        f"{path} keeps what it held: free some disk space and rerun") from None
    return tmp


def save_atomic(obj, path: str, save=None):
    """save(obj, tmp) to a temporary file, then rename: a kill or a full disk never leaves a torn file."""
    os.replace(write_tmp(obj, path, save), path)
