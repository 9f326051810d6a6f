"""The whole story on the embedded data set, on a CPU, in minutes: `make demo`.

The committed MAE (checkpoints/mae_tiny_digits.pth, from pretrain.py) is refined with MIM-Refiner (Alkin et al. 2024)
and MAE-CT (Lehner et al. 2023); every encoder is evaluated with the same protocols (docs/METHOD.md §11) on the mean of
the patch tokens: weighted k-NN on every block (standardised and plain cosine), linear probe, 1/2/5-shot, k-means.
Beside them, baselines that need no training: raw pixels of the evaluation transform (as they are, and z-scored per
image) and a random encoder of the MAE's shape. Features are extracted once (knn.py --save-features); each stage is a
process (`--jobs` at a time, `--threads` each), the results aggregated into
    OUT/summary.json   {"split", "ckpt", "seeds", "precision", "encoders": {name: {metric: [per seed]}}}, fractions
    OUT/knn_per_block.png, neighbours.png, tsne.png (tools/pictures.py)
    OUT/<encoder>/[seed<s>/]  every stage's JSON, log and feature file
--seeds N: each method N times; --own-view METHODS: also with the anchor's other view as the positive (the swap's
ablation); --control: the random encoder refined both ways, all blocks trainable, same steps; --scratch-epochs N: from
scratch, own view, longer (what MIM pre-training buys). Reported on `jittered-digits:report`: glyphs no recipe saw.

CPU, the embedded default (9 min on 2 cores with bf16 units, 13 in fp32; docs/DEMO.md: the committed 3-seed runs):
    python demo.py
    python demo.py --seeds 3 --own-view mim-refiner,mae-ct --control --one-seed random+mim-refiner,random+mae-ct \
        --scratch-epochs 20 --precision fp32 --out runs/demo-seeds  # docs/demo_summary.json; tools/demo_goals.py
Reduced size (under a minute; what tests/test_demo.py runs on a tiny encoder and image folder):
    python demo.py --quick --ckpt tiny.pth --data folder --out runs/demo-quick
"""
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from model import UserError, ViT, export_encoder, load_encoder
from util import common
from util.common import opt
from util.data import build_dataset, eval_transform

ENCODERS = ("mae", "mim-refiner", "mae-ct")  # the story: the MIM encoder and its two refinements
BASELINES = ("pixels", "pixels, per-image", "random")  # no training
CONTROLS = ("random+mim-refiner", "random+mae-ct")  # --control
SCRATCH = "random+mim-refiner, own view, long"  # --scratch-epochs: refined from scratch, one seed
UNSEEDED = BASELINES + ("mae",)  # evaluated once; every other encoder once per refinement seed
HERE = os.path.dirname(os.path.abspath(__file__))
SUMMARIES = tuple(os.path.join(HERE, "docs", f"demo_summary{f}.json") for f in ("", "_d12", "_d12_long", "_bf16"))
SLOTS = [threading.BoundedSemaphore(2)]  # stage processes at once (--jobs); a freed slot goes to any waiter
FAILED = []  # the failed stages' errors: once one is here no stage starts, and main raises the first


@dataclass
class Settings:
    ckpt: str = opt("checkpoints/mae_tiny_digits.pth", "the MAE encoder to refine and evaluate")
    data: str = opt("jittered-digits:report", "jittered-digits[:select|:report] or a folder with train/ and val/")
    out: str = opt("runs/demo", "output folder: summary.json, the pictures, one folder per encoder")
    feature: str = opt("mean", "what the heads and the evaluations read: mean (of the patch tokens) or cls")
    seeds: int = opt(1, "refinement seeds per method (0..N-1); the summary holds one value per seed")
    one_seed: str = opt("", "methods (mae-ct) or encoders (random+mae-ct) refined with seed 0 only, to save time")
    mim_refiner_args: str = opt("", "extra refine.py flags for MIM-Refiner, e.g. '--epochs 3'")
    mae_ct_args: str = opt("", "extra refine.py flags for MAE-CT")
    own_view: str = opt("", "methods also refined with the anchor's other view as the positive (--neighbours none)")
    control: bool = opt(False, "also refine the random encoder both ways, every block trainable, the same steps")
    scratch_epochs: int = opt(0, "also refine the random encoder from scratch, own view, every block trainable, for "
                                 "1 + N epochs, seed 0 (20: about the cost of pre-training plus refinement)")
    k: int = opt(20, "the k of the k-NN numbers in the summary and the plot (knn.py runs 10 and 20)")
    shots: str = opt("1,2,5", "low-shot: labelled images per class")
    precision: str = opt("auto", "refine.py's --precision: bf16, fp32, or auto: bf16 where the CPU has bf16 units "
                                 "(AVX512-BF16, AMX; ~1.7x faster), else fp32 (the committed 6- and 12-block runs)")
    jobs: int = opt(2, "stage processes at once (one per core suits small models)")
    threads: int = opt(1, "torch / OpenMP threads per stage process")
    plot: bool = opt(True, "draw the pictures (needs matplotlib); --no-plot skips them")
    quick: bool = opt(False, "reduced size for smoke tests: a few refine steps on a few images, short evaluations")


def stage_flags(cfg: Settings) -> dict:
    """Flags of each stage. --quick shrinks the work, not the protocol."""
    if not cfg.quick:
        return dict(refine=[], probe=[], shots=[], cluster=[])
    return dict(refine=["--limit-train", "16", "--batch-size", "8", "--queue-size", "8", "--topk", "2",
                        "--head-epochs", "1", "--epochs", "1",
                        "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16"],
                probe=["--epochs", "2"], shots=["--splits", "1"], cluster=["--seeds", "1", "--iters", "20"])


def run(cmd: list, log: str, cfg: Settings):
    """Run one stage script as a child process, its output into `log`; a failure stops the demo with its last lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    with SLOTS[0], open(log, "w") as f:
        if FAILED:
            raise UserError("another stage failed")
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, *cmd], cwd=HERE, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        with open(log) as f:
            tail = f.read().replace("\r", "\n").strip().splitlines()[-3:]
        FAILED.append(UserError(f"{' '.join(cmd[:1] + cmd[-2:])} failed (exit {code}): {' | '.join(tail)}; "
                                f"the whole output is in {log}"))
        raise FAILED[-1]
    print(f"  {time.perf_counter() - t0:6.0f} s  {' '.join(cmd[:3])}  -> {log}", flush=True)


def precision(cfg: Settings, cpuinfo: str = "/proc/cpuinfo") -> str:
    """What --precision auto means on this machine: bf16 where /proc/cpuinfo lists bf16 units, else fp32."""
    flags = open(cpuinfo).read().split() if os.path.isfile(cpuinfo) else []
    return cfg.precision if cfg.precision != "auto" else "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def seeds_of(cfg: Settings, name: str) -> list:
    """The refinement seeds of encoder `name`: none but 0 for the untrained, SCRATCH and the --one-seed ones."""
    named = cfg.one_seed.split(",")
    single = name in (*UNSEEDED, SCRATCH) or name in named or name.split("+")[-1].split(",")[0] in named
    return [0] if single else list(range(cfg.seeds))


def folder(cfg: Settings, name: str, seed: int) -> str:
    """Where an encoder's files go: OUT/<name>/, and OUT/<name>/seed<s>/ for a refined one."""
    return os.path.join(cfg.out, name, *([f"seed{seed}"] if name not in UNSEEDED else []))


def refine_flags(cfg: Settings, name: str) -> list:
    """refine.py's flags beyond the recipe for the encoder `name` (e.g. 'mae-ct, own view')."""
    method = name.split("+")[-1].split(",")[0]
    extra = shlex.split(cfg.mim_refiner_args if method == "mim-refiner" else cfg.mae_ct_args)
    extra += ["--neighbours", "none"] if "own view" in name else []
    extra += ["--freeze-blocks", "0"] if name.startswith("random+") else []  # a fair control: all of it trains
    extra += ["--epochs", str(cfg.scratch_epochs)] if name == SCRATCH else []
    return ["--method", method, *extra]


def chain(name: str, seed: int, cfg: Settings, flags: dict) -> str:
    """Evaluate one encoder: refine it (unless untrained), extract its features once, run every protocol."""
    d = folder(cfg, name, seed)
    os.makedirs(d, exist_ok=True)
    feats, common_flags = os.path.join(d, "features.pt"), ["--device", "cpu", "--workers", "0"]
    if name.startswith("pixels"):
        pixel_features(cfg, feats, per_image=name.endswith("per-image"))
        source = ["--load-features", feats]
    else:
        ckpt = os.path.abspath(cfg.ckpt) if not name.startswith("random") else random_encoder(cfg)
        if name not in UNSEEDED:
            quick = flags["refine"] + (["--local-crops", "1"] if cfg.quick and "mim-refiner" in name else [])
            run(["refine.py", "--ckpt", ckpt, "--data", cfg.data, "--out", d, "--seed", str(seed),
                 "--feature", cfg.feature, "--device", "cpu", "--precision", precision(cfg), *quick,
                 *refine_flags(cfg, name)],
                os.path.join(d, "refine.log"), cfg)
            ckpt = os.path.join(d, "encoder.pth")
        if os.path.exists(feats):  # a rerun into the same --out must not read stale features
            os.remove(feats)
        source = ["--ckpt", ckpt, "--save-features", feats]
    run(["knn.py", *source, "--data", cfg.data, "--blocks", "all", "--feature", cfg.feature,
         "--k", ",".join(map(str, sorted({10, 20, cfg.k}))), *common_flags, "--out", os.path.join(d, "knn.json")],
        os.path.join(d, "knn.log"), cfg)
    stages = (("knn_plain", ["knn.py", "--no-standardize", "--k", str(cfg.k)]),
              ("probe", ["probe.py", *flags["probe"]]), ("shots", ["probe.py", "--shots", cfg.shots, *flags["shots"]]),
              ("cluster", ["cluster.py", *flags["cluster"]]))
    with ThreadPoolExecutor(len(stages)) as pool:  # independent: they wait for free slots together
        list(pool.map(lambda st: run([*st[1], "--load-features", feats, "--feature", cfg.feature,
                                      "--blocks", "last", *common_flags, "--out", os.path.join(d, f"{st[0]}.json")],
                                     os.path.join(d, f"{st[0]}.log"), cfg), stages))
    return name


def pixel_features(cfg: Settings, path: str, per_image: bool):
    """The evaluation-transform pixels as a feature file (N, C*H*W); per_image z-scores each image alone."""
    size = load_encoder(cfg.ckpt).img_size
    out = {"feature": "pixels" + (", per-image" if per_image else ""), "blocks": ["pixels"], "data": cfg.data}
    for split in ("train", "val"):
        ds = build_dataset(cfg.data, split, eval_transform(size))
        x = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)  # (N, C*H*W)
        if per_image:
            x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)
        out[f"{split}_features"], out[f"{split}_labels"] = x, torch.as_tensor(ds.targets)
    common.save_atomic(out, path)


def random_encoder(cfg: Settings) -> str:
    """The random baseline: the MAE's architecture with fresh weights (seed 1), written once."""
    path = os.path.join(cfg.out, "random", "encoder.pth")
    if not os.path.isfile(path):
        torch.manual_seed(1)
        fresh = ViT(**load_encoder(cfg.ckpt).arch())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common.save_atomic(export_encoder(fresh), path)
    return path


def summarize(d: str, k: int, quick: bool) -> dict:
    """The numbers of one encoder from the stage JSONs in folder `d` (fractions in [0, 1])."""
    read = lambda name: json.load(open(os.path.join(d, name)))["results"]  # noqa: E731  a stage's records
    curve = {r["block"]: r["top1"] for r in read("knn.json") if r["k"] == k}  # {block: top-1}
    probe = [r for r in read("probe.json") if r.get("best")]
    shots = {r["shots"]: r["top1"] for r in read("shots.json") if r["split"] == "mean" or (r["split"] == 0 and quick)}
    cl = read("cluster.json")[0]  # (shots: --quick has one draw, no mean)
    out = dict(knn_top1=list(curve.values())[-1], knn_plain_top1=read("knn_plain.json")[0]["top1"],
               probe_top1=probe[0]["top1"], **{f"shot{s}_top1": shots[s] for s in sorted(shots)},
               cluster_acc=cl["acc"], cluster_nmi=cl["nmi"], cluster_ari=cl["ari"])
    if all(isinstance(b, int) for b in curve):  # an encoder's blocks (not a pixel file)
        out.update(knn_best_block_top1=max(curve.values()), knn_best_block=max(curve, key=curve.get),
                   knn_per_block={str(b): v for b, v in curve.items()})
    return out


def collect(cfg: Settings, names: list) -> dict:
    """{"split", "ckpt", "seeds", "encoders": {name: {metric: [per seed]}}}: a baseline's list holds its one value."""
    encoders = {}
    for name in names:
        runs = [summarize(folder(cfg, name, s), cfg.k, cfg.quick) for s in seeds_of(cfg, name)]
        encoders[name] = {m: {b: [r[m][b] for r in runs] for b in v} if m == "knn_per_block" else [r[m] for r in runs]
                          for m, v in runs[0].items()}
    ckpt = os.path.relpath(os.path.abspath(cfg.ckpt), HERE)  # the spread of a committed run is its checkpoint's
    return {"split": cfg.data, "ckpt": ckpt, "seeds": list(range(cfg.seeds)), "precision": precision(cfg),
            "encoders": encoders}


def cell(values: list, scale: float = 100) -> str:
    """'m' for one value, 'm ± sd' (sample SD) for several, in percent."""
    mean = f"{scale * statistics.mean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} ± {scale * statistics.stdev(values):.1f}"


COLUMNS = (("k-NN", "knn_top1"), ("k-NN plain", "knn_plain_top1"), ("best block", "knn_best_block_top1"),
           ("probe", "probe_top1"), ("1-shot", "shot1_top1"), ("2-shot", "shot2_top1"), ("5-shot", "shot5_top1"),
           ("k-means ACC", "cluster_acc"), ("NMI", "cluster_nmi"), ("ARI", "cluster_ari"))


def table(summary: dict, markdown: bool = False) -> str:
    """One row per encoder, in percent (x100 for NMI and ARI); mean ± SD over the seeds of a refined one."""
    cols = [(h, k) for h, k in COLUMNS if any(k in e for e in summary["encoders"].values())]
    rows = [["encoder", *(h for h, _ in cols)]]
    for name, e in summary["encoders"].items():
        best = f" (b{statistics.mode(e['knn_best_block'])})" if "knn_best_block" in e else ""
        rows.append([name, *((cell(e[k]) + (best if k == "knn_best_block_top1" else "")) if k in e else "-"
                             for _, k in cols)])
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [["---"] * len(rows[0])] + rows[1:])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, width)))
                     for r in rows)


def spread(summary: dict, paths: tuple = SUMMARIES) -> str:
    """Where a one-seed run's refined k-NN and k-means sit in the committed run of its checkpoint, split, precision."""
    refs = [(p, json.load(open(p))) for p in paths if os.path.isfile(p)]
    for path, ref in sorted(refs, key=lambda r: r[1].get("precision", "fp32") != summary.get("precision", "fp32")):
        if (ref["split"], ref.get("ckpt")) == (summary["split"], summary["ckpt"]):
            head = (f"against the committed {len(ref['seeds'])}-seed run ({os.path.relpath(path, HERE)}, refined in "
                    f"{ref.get('precision', 'fp32')}; this run: {summary.get('precision', 'fp32')}):")
            return "\n".join([head] + [
                f"  {n}: k-NN {cell(e['knn_top1'])} (committed {cell(ref['encoders'][n]['knn_top1'])}), k-means ACC "
                f"{cell(e['cluster_acc'])} (committed {cell(ref['encoders'][n]['cluster_acc'])})"
                for n, e in summary["encoders"].items() if n not in UNSEEDED and n in ref["encoders"]])
    return f"(no committed multi-seed run of {summary['ckpt']} on {summary['split']} to compare with)"


def main(cfg: Settings) -> dict:
    if not os.path.isfile(cfg.ckpt):
        raise UserError(f"--ckpt {cfg.ckpt} does not exist; make demo-full pre-trains one, "
                        f"or give any encoder checkpoint load_encoder reads")
    if cfg.jobs < 1 or cfg.threads < 1 or cfg.seeds < 1:
        raise UserError("--jobs, --threads and --seeds must be at least 1")
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:  # fail now, not after minutes of work
        raise UserError("the pictures need matplotlib: pip install -r requirements-demo.txt (or --no-plot)")
    os.makedirs(cfg.out, exist_ok=True)
    flags, t0 = stage_flags(cfg), time.perf_counter()
    extra = [f"{m}, own view" for m in ENCODERS[1:] if m in cfg.own_view.split(",")]
    extra += [*(CONTROLS if cfg.control else ()), *([SCRATCH] if cfg.scratch_epochs else ())]
    names = [*BASELINES, *ENCODERS, *extra]
    print(f"demo.py: {cfg.ckpt} on {cfg.data}, {cfg.seeds} seed(s); {cfg.jobs} processes x {cfg.threads} "
          f"threads; stage outputs in {cfg.out}/<encoder>/", flush=True)
    SLOTS[0] = threading.BoundedSemaphore(cfg.jobs)
    random_encoder(cfg)  # before the threads start: pixel_features' load_encoder draws from the same global RNG
    FAILED.clear()
    # All chains start at once, refinements submitted first; stage order varies (see SLOTS), results do not.
    work = sorted(((n, s) for n in names for s in seeds_of(cfg, n)), key=lambda ns: (ns[0] in UNSEEDED, ns[1]))
    with ThreadPoolExecutor(len(work)) as pool:
        jobs = [pool.submit(chain, n, s, cfg, flags) for n, s in work]
        errors = [e for e in (job.exception() for job in jobs) if e is not None]  # no stage starts after a failure
    if errors:  # the stage that failed, not the chains that stopped because of it
        raise (FAILED or errors)[0]
    summary = collect(cfg, names)
    common.write_json(os.path.join(cfg.out, "summary.json"), summary)
    print(f"\n{cfg.k}-NN / probe / low-shot top-1 and k-means ACC, NMI, ARI (x100) on {cfg.data}"
          f"{f', mean ± SD over {cfg.seeds} refinement seeds' if cfg.seeds > 1 else ''}:\n{table(summary)}\n")
    if cfg.seeds == 1:
        print(spread(summary))
    if cfg.plot:
        from tools import pictures
        pictures.plot(summary, os.path.join(cfg.out, "knn_per_block.png"), cfg.k)
        feats = {n: pictures.last_block(os.path.join(folder(cfg, n, 0), "features.pt")) for n in ENCODERS}
        pictures.neighbour_grid(cfg.data, feats, os.path.join(cfg.out, "neighbours.png"))
        pictures.feature_map(feats, os.path.join(cfg.out, "tsne.png"))
    print(f"{time.perf_counter() - t0:.0f} s; wrote {cfg.out}/summary.json" +
          (" and knn_per_block.png, neighbours.png, tsne.png" if cfg.plot else ""))
    return summary


if __name__ == "__main__":
    common.cli(main, Settings)
