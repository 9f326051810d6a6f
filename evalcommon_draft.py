"""What knn.py, probe.py and cluster.py share: their common flags, features from a checkpoint or
a feature file (`--save-features` / `--load-features`), and the results table and JSON.
Importing it has no side effects."""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Subset

import model
from common import build_dataset, eval_transform, extract_features, opt, parse_blocks, save_atomic, write_json
from model import UserError


@dataclass
class FeatureSettings:
    """The flags of every evaluation stage; each stage's Settings adds its own."""
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "encoder checkpoint, any layout of SPEC §3")
    weights: str = opt("ema", "which encoder of a refine.py checkpoint: ema or online")
    data: str = opt("cluttered-digits", "cluttered-digits, or a folder with train/ and val/ (ImageFolder)")
    img_size: Optional[int] = opt(None, "input resolution in pixels; None = the checkpoint's")
    blocks: str = opt("last", "blocks to evaluate: last, all, a list 18,20,24 or a range 17-24")
    concat: bool = opt(False, "evaluate the chosen blocks concatenated into one feature")
    feature: str = opt("cls", "cls (block output, no final norm), cls-norm (after the final norm) "
                              "or mean (of the patch tokens)")
    batch_size: int = opt(256, "images per extraction batch, per process")
    workers: int = opt(4, "data-loading processes per process")
    device: str = opt("auto", "auto, cpu or cuda")
    out: Optional[str] = opt(None, "also write the results as JSON to this file")
    save_features: Optional[str] = opt(None, "save the extracted features to this file")
    load_features: Optional[str] = opt(None, "read the features from this file (the model is not run)")


def parse_ints(spec: str, flag: str) -> list:
    """'10,20' -> [10, 20]; every value must be a positive integer."""
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"cannot read {flag} {spec!r}; give positive integers such as 10,20") from None
    if not vals or min(vals) < 1:
        raise UserError(f"{flag} {spec!r}: give positive integers such as 10,20")
    return vals


def load_model(cfg) -> model.ViT:
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: give a positive number")
    return model.load_encoder(cfg.ckpt, weights=cfg.weights, img_size=cfg.img_size)


def get_features(cfg, d, splits=("train", "val"), keep_classes=None, vit=None) -> dict:
    """Features of `splits` from --load-features, or extracted from --ckpt (then saved to
    --save-features). Returns the feature-file dict with every `{split}_features` as
    {block: (N, D) float32}, restricted to --blocks (concatenated under --concat); `blocks` lists
    the keys. keep_classes: class names to keep (rows of other classes are dropped)."""
    if cfg.load_features and cfg.save_features:
        raise UserError("give either --load-features or --save-features, not both")
    if cfg.load_features:
        feats = read_feature_file(cfg.load_features, splits)
        feats = restrict_classes(feats, splits, keep_classes)
        blocks = pick_blocks(list(feats[f"{splits[0]}_features"]), cfg.blocks)
    else:
        vit = vit or load_model(cfg)
        blocks = parse_blocks(cfg.blocks, vit.depth)
        feats = {"blocks": blocks, "feature": cfg.feature}
        for split in splits:
            ds = build_dataset(cfg.data, split, eval_transform(vit.img_size))
            feats["classes"] = list(ds.classes)
            if keep_classes:  # only the rows of these classes are embedded
                check_classes(ds.classes, keep_classes, cfg.data)
                ds = Subset(ds, [i for i, t in enumerate(ds.targets) if ds.classes[t] in keep_classes])
            f, y = extract_features(vit, ds, blocks, cfg.feature, cfg.batch_size, d.device,
                                    cfg.workers, desc=f"{split} features")
            feats[f"{split}_features"], feats[f"{split}_labels"] = f, y.long()
        if cfg.save_features and d.main:
            one = len(blocks) == 1  # the file holds a plain tensor for one block, a dict for several
            save_atomic({k: (v[blocks[0]] if one and k.endswith("_features") else v)
                         for k, v in feats.items()}, cfg.save_features)
    for split in splits:
        feats[f"{split}_features"] = select_blocks(feats[f"{split}_features"], blocks, cfg.concat)
    feats["blocks"] = list(feats[f"{splits[0]}_features"])
    return feats


def select_blocks(f: dict, blocks: list, concat: bool) -> dict:
    """{block: (N, D)} -> the chosen blocks as float32, or under --concat their concatenation
    {'b1+b2+...': (N, D1 + D2 + ...)}."""
    f = {b: f[b].float() for b in blocks}
    if concat and len(blocks) > 1:
        f = {"+".join(map(str, blocks)): torch.cat([f[b] for b in blocks], dim=1)}
    return f


def read_feature_file(path: str, splits) -> dict:
    """A --save-features file -> the same dict with `{split}_features` always {block: tensor}."""
    if not os.path.isfile(path):
        raise UserError(f"feature file {path!r} does not exist; write one with --save-features")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise UserError(f"{path!r} is not a readable feature file ({type(e).__name__}); "
                        f"write one with --save-features") from None
    need = [f"{s}_{w}" for s in splits for w in ("features", "labels")]
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"feature file {path!r} lacks {[k for k in need if k not in obj]} (has "
                        f"{have}); it needs {need}: write it with --save-features")
    block_keys = None
    for s in splits:
        f, y = obj[f"{s}_features"], obj[f"{s}_labels"]
        if torch.is_tensor(f):  # one block: a plain (N, D) tensor
            f = {(obj.get("blocks") or ["file"])[0]: f}
        obj[f"{s}_features"], obj[f"{s}_labels"] = f, y.long()
        bad = [b for b, t in f.items() if not torch.is_tensor(t) or t.dim() != 2 or len(t) != len(y)]
        if bad or (block_keys is not None and list(f) != block_keys):
            raise UserError(f"feature file {path!r}: {s}_features must be (N, D) tensors with one row "
                            f"per label and the same blocks in every split; write it with --save-features")
        block_keys = list(f)
    return obj


def pick_blocks(avail: list, spec: str) -> list:
    """--blocks for a loaded file: 'all' = every block in it, 'last' = its highest block."""
    if spec == "all" or (spec == "last" and len(avail) == 1):
        return avail
    want = parse_blocks(spec, max(avail))
    missing = [b for b in want if b not in avail]
    if missing:
        raise UserError(f"--blocks {spec}: block {missing[0]} is not in the feature file (it has "
                        f"{avail}); extract it again with --save-features")
    return want


def restrict_classes(feats: dict, splits, keep_classes) -> dict:
    """Drop the rows of a loaded file whose class is not in keep_classes (needs `classes`)."""
    if not keep_classes:
        return feats
    if "classes" not in feats:
        raise UserError("the feature file has no class names; extract it again with --save-features")
    check_classes(feats["classes"], keep_classes, "the feature file")
    keep = torch.tensor([c in keep_classes for c in feats["classes"]])
    for s in splits:
        rows = keep[feats[f"{s}_labels"]]
        feats[f"{s}_features"] = {b: t[rows] for b, t in feats[f"{s}_features"].items()}
        feats[f"{s}_labels"] = feats[f"{s}_labels"][rows]
    return feats


def check_classes(classes, keep_classes, where):
    missing = [c for c in keep_classes if c not in classes]
    if missing:
        raise UserError(f"{where} lacks the classes {missing[:5]} ({len(missing)} of "
                        f"{len(keep_classes)}); the subset needs a folder with all of them")


def format_table(records: list) -> str:
    """Records (dicts) -> an aligned text table, one row per record, floats to 4 decimals."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [cols] + [[cell(r.get(c)) for c in cols] for r in records]
    width = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, width)) for row in rows)


def report(cfg, d, records: list, title: str) -> dict:
    """Print the table and write --out (rank 0 only); returns {"results", "settings"}."""
    result = {"results": records, "settings": dataclasses.asdict(cfg)}
    if d.main:
        print(f"{title}\n{format_table(records)}")
        if cfg.out:
            write_json(cfg.out, result)
    return result
