"""What the evaluation stages share (knn.py, probe.py, cluster.py, finetune.py): flags, features, report.

Features per block from a checkpoint or a checked feature file, feature sets side by side (Columns), the report."""
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import UserError, load_encoder
from util.common import all_gather, opt, parse_blocks, save_atomic, world_size, write_json
from util.data import build_dataset, eval_transform, loader_kwargs, read_feature_file


@dataclasses.dataclass
class FeatureSettings:
    """The flags of every evaluation stage; each stage's Settings adds its own."""
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "encoder checkpoint, any layout of docs/METHOD.md §9")
    weights: str = opt("ema", "which encoder of a refine.py checkpoint: ema or online")
    num_heads: int = opt(0, "attention heads of --ckpt (printed); 0 = as stored, else width // 64 (1280: 16, 2560: 32)")
    data: str = opt("jittered-digits", "jittered-digits, or a folder with train/ and val/ (ImageFolder)")
    img_size: Optional[int] = opt(None, "input resolution (default: the checkpoint's)")
    blocks: str = opt("last", "blocks to evaluate: last, all, a list 18,20,24 or a range 17-24; with ',norm' also "
                              "'norm': the top one after the encoder's final norm")
    concat: bool = opt(False, "evaluate the chosen blocks concatenated into one feature")
    feature: str = opt("cls", "cls (block output, no final norm), cls-norm (after the final norm) "
                              "or mean (of the patch tokens); cls+mean, cls-norm+mean: with the mean appended")
    batch_size: int = opt(256, "images per extraction batch, per process")
    workers: int = opt(-1, "data-loading processes per process; -1 = by the cores available (at most 4)")
    device: str = opt("auto", "auto, cpu or cuda")
    out: Optional[str] = opt(None, "also write the results as JSON to this file")
    save_features: Optional[str] = opt(None, "write the extracted features to this feature file (docs/METHOD.md §11)")
    load_features: Optional[str] = opt(None, "read this feature file (docs/METHOD.md §11) instead of running the model")


def load_model(cfg):
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: give a positive number")
    return load_encoder(cfg.ckpt, heads=cfg.num_heads or None, weights=cfg.weights, img_size=cfg.img_size)


def pool(vit, tokens, feature: str):
    """One block's tokens (B, 1+N, D) -> (B, D): cls, cls-norm (after the final norm), mean; '+mean': (B, 2D)."""
    if feature in ("cls+mean", "cls-norm+mean"):
        return torch.cat([pool(vit, tokens, feature[:-5]), tokens[:, 1:].mean(1)], dim=1)
    if feature == "mean":
        return tokens[:, 1:].mean(1)
    if feature not in ("cls", "cls-norm"):
        raise UserError(f"unknown --feature {feature!r}; use cls, cls-norm, mean, cls+mean or cls-norm+mean")
    return (vit.final_norm(tokens) if feature == "cls-norm" else tokens)[:, 0]


@torch.inference_mode()
def extract_features(vit, dataset, blocks, feature="cls", batch_size=256, device="cpu", workers=0, desc="features"):
    """{block: (N, D) float32 CPU} and labels (N,), rows in dataset order.

    Block 'norm' (parse_blocks) pools the top numbered block (or the last) after the final norm, --feature without its
    '-norm'. Under torchrun each rank embeds every world-th image; the shards are gathered back and interleaved."""
    device, world = torch.device(device), world_size()
    rank, n = (dist.get_rank() if world > 1 else 0), len(dataset)
    order = list(range(n)) + list(range(n))[: (-n) % world]  # pad so every rank has as many
    loader = DataLoader(Subset(dataset, order[rank::world]), batch_size=batch_size, **loader_kwargs(device, workers))
    vit, run = vit.to(device).eval(), [b for b in blocks if b != "norm"] or [vit.depth]  # the blocks to run
    feats, labels = {b: [] for b in blocks}, []
    bar = {"disable": True} if rank else {}  # rank 0: tqdm's default, so TQDM_DISABLE=1 silences it
    for x, y in tqdm(loader, desc=desc, leave=False, **bar):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            outs = dict(zip(run, vit.forward_blocks(x.to(device, non_blocking=True), run)))
            outs["norm"] = vit.final_norm(outs[max(run)]) if "norm" in blocks else None
        for b in blocks:
            feats[b].append(pool(vit, outs[b], feature.replace("-norm", "") if b == "norm" else feature).float())
        labels.append(y.to(device, non_blocking=True))

    def gather(parts):  # (n_shard, ...) per rank -> (n, ...) in dataset order
        local = torch.cat(parts)
        full = all_gather(local).reshape(world, -1, *local.shape[1:])  # (world, n_shard, ...)
        return full.transpose(0, 1).reshape(-1, *local.shape[1:])[:n].cpu()  # interleave ranks

    return {b: gather(f) for b, f in feats.items()}, gather(labels).long()


def get_features(cfg, d, splits=("train", "val"), keep_classes=None, vit=None) -> dict:
    """The feature-file dict of `splits`, read from --load-features or extracted from --ckpt (and --save-features).

    Each `{split}_features` as {block: (N, D) float32} for the --blocks asked (one entry under --concat), `blocks` its
    keys; keep_classes: the class names whose rows are kept (ImageNet subsets)."""
    if cfg.load_features and cfg.save_features:
        raise UserError("give either --load-features or --save-features, not both")
    if cfg.load_features:
        feats = read_feature_file(cfg.load_features, splits, cfg.feature, warn=d.main)
        for k in ("ckpt", "weights", "data", "feature"):  # the results describe the file, not the flags
            setattr(cfg, k, feats.get(k, cfg.data if k == "data" else None))
        cfg.img_size, cfg.num_heads = (feats.get("arch") or {}).get("img_size"), (feats.get("arch") or {}).get("heads")
        if d.main:
            print(f"features of {cfg.load_features}: {cfg.ckpt or 'checkpoint not recorded'} on {cfg.data}, "
                  f"feature {cfg.feature}, encoder {feats.get('arch') or 'not recorded'}")
        avail = list(feats[f"{splits[0]}_features"])  # block numbers; 'given' for a bare file's one
        ints = [b for b in avail if isinstance(b, int)]
        blocks = (avail if cfg.blocks == "all" or (len(avail) == 1 and cfg.blocks == "last")
                  else parse_blocks(cfg.blocks, max(ints)) if ints else [cfg.blocks])
        if any(b not in avail for b in blocks):
            raise UserError(f"--blocks {cfg.blocks}: the feature file holds blocks {avail}; "
                            f"extract the others again with --save-features")
    else:
        vit = vit or load_model(cfg)
        if d.main:
            print(f"encoder of {cfg.ckpt}: {vit.arch()}, {vit.heads} heads {getattr(vit, 'heads_from', '')}")
        blocks = parse_blocks(cfg.blocks, vit.depth)
        feats = {"blocks": blocks, "feature": cfg.feature, "ckpt": cfg.ckpt, "weights": cfg.weights,
                 "data": cfg.data, "arch": vit.arch()}  # what the features are of
        for split in splits:
            ds = build_dataset(cfg.data, split, eval_transform(vit.img_size))
            feats["classes"] = list(ds.classes)
            if keep_classes:  # embed only the rows of the subset
                ds = Subset(ds, [i for i, t in enumerate(ds.targets) if ds.classes[t] in keep_classes])
            feats[f"{split}_features"], feats[f"{split}_labels"] = extract_features(
                vit, ds, blocks, cfg.feature, cfg.batch_size, d.device, cfg.workers, desc=f"{split} features")
        if cfg.save_features and d.main:
            one = len(blocks) == 1  # one block: plain (N, D) tensors, a bare feature file
            save_atomic({k: (v[blocks[0]] if one and k.endswith("_features") else v)
                         for k, v in feats.items()}, cfg.save_features)
    missing = [c for c in keep_classes or [] if c not in feats.get("classes", [])]
    if missing:
        raise UserError(f"the data lacks the classes {missing[:5]} ({len(missing)} of {len(keep_classes)}); "
                        f"the subset needs a folder (or a feature file) with all of them")
    keep = torch.tensor([c in keep_classes for c in feats["classes"]]) if keep_classes else None
    for s in splits:  # rows of other classes (from a loaded file) dropped, then the blocks asked kept
        rows = slice(None) if keep is None else keep[feats[f"{s}_labels"]]
        f = select_blocks({b: t[rows] for b, t in feats[f"{s}_features"].items()}, blocks, cfg.concat)
        feats[f"{s}_features"], feats[f"{s}_labels"] = f, feats[f"{s}_labels"][rows]
    feats["blocks"] = list(feats[f"{splits[0]}_features"])
    return feats


def select_blocks(f: dict, blocks: list, concat: bool) -> dict:
    """{block: (N, D)} -> the chosen blocks as float32; under --concat one entry {'b1+b2+...': (N, D1 + D2 + ...)}."""
    f = {b: f[b].float() for b in blocks}
    if concat and len(blocks) > 1:
        f = {"+".join(map(str, blocks)): torch.cat(list(f.values()), dim=1)}
    return f


class Columns:
    """Rows of several (N, D_i) feature tensors side by side, joined a batch at a time: probe.py's grid, no copy."""

    def __init__(self, parts):
        self.parts, self.dim, self.device = parts, sum(p.shape[1] for p in parts), parts[0].device

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, rows):
        return torch.cat([p[rows] for p in self.parts], dim=1)


def report(cfg, d, records: list, title: str) -> dict:
    """Print the records as an aligned table and write --out (rank 0); returns the JSON dict."""
    result = {"results": records, "settings": dataclasses.asdict(cfg)}
    if d.main:
        cols = list(dict.fromkeys(k for r in records for k in r))
        cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        rows = [cols] + [[cell(r.get(c)) for c in cols] for r in records]
        width = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        print(title, *("  ".join(v.rjust(w) for v, w in zip(row, width)) for row in rows), sep="\n")
        if cfg.out:
            write_json(cfg.out, result)
    return result
