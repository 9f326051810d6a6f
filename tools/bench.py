"""Speed, side by side: this codebase against timm, scikit-learn and one-at-a-time loops.

Every comparison runs both sides in this one process, on the same inputs, alternating (ours, theirs, theirs, ours,
...) so that a busy machine slows both alike; the ratio reported is the median over rounds of (their time / our
time), so > 1 means ours is faster.

- `vit_vs_timm`: our `model.ViT` against timm's `VisionTransformer` holding the same weights
  (`model.export_encoder`), forward + backward images/s, same size, dtype and batch.
- `knn_vs_sklearn`: `knn.knn_predict` against `KNeighborsClassifier(algorithm='brute', metric='cosine')` given the
  same vote weight exp(sim / T) as a callable; same k, same features; the predictions must agree.
- `kmeans_vs_sklearn`: `cluster.kmeans` against `sklearn.cluster.KMeans`, same K, n_init, iterations and data; from
  the same initial centres both reach the same inertia (within 1%).
- `probe_grid_vs_sequential`: the 13 learning rates of the MIM-Refiner grid trained one after the other against the
  stacked-grid probe of `probe.py` (one pass for all 13), in the papers' protocol (`probe.py --augment`: crops
  re-embedded every epoch; the ratio) and, as a detail row, on features extracted once.
- refinement step (not a ratio): images/s and peak memory of refine.py's own training step, `refine.refine_step` in
  phase 2 (encoder and heads train, queues and EMA encoder update), on the parts refine.main builds for a preset's
  encoder (recipe.py's settings, 2 global + 10 local views: synthetic, normalised, already on the device), with and
  without activation checkpointing; on CUDA also the model FLOP utilisation MFU = 6 x params x tokens per image
  (summed over the views) x images/s / peak, and the largest ViT-L batch that fits.
- data loading (`--only loader`, not by default): refine.py's MIM-Refiner views (2 x 224 + 10 x 96) of 500 x 375
  JPEGs, img/s per loader worker side by side, before (the per-image torchvision / PIL recipe in the worker,
  `util.views.ReferenceViews`) and after (crops and parameter draws in the worker, colour on the device); and the
  device's colouring time per batch.

CPU, the quick version (about 70 s on 2 cores; writes all four ratios):
    python tools/bench.py --quick --device cpu --out bench.json
its refinement part alone (tiny preset, checkpointing on and off; about 6 s, 50 s beside other jobs):
    python tools/bench.py --quick --device cpu --only refine
every part at microscopic sizes, as the test suite runs them (timings meaningless; about 13 s):
    python tools/bench.py --tiny --device cpu
the loader, one worker (about 17 s on this CPU):
    python tools/bench.py --quick --device cpu --only loader --workers 1
One GPU, about 15 minutes (ViT-B/L in bf16, k-NN 50k x 10k at D = 384, ViT-L/16 refinement step):
    python tools/bench.py --device cuda --out bench_gpu.json
See BENCHMARKS.md for the figures measured so far and the machines they come from."""
import gc
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("TQDM_DISABLE", "1")  # read as tqdm is imported (torch imports it): no bars from the features

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import cluster  # noqa: E402
import knn
import model
import probe
import refine
from recipe import resolve
from util import common
from util.common import cli, opt, write_json
from util.data import Seeded

# the goals: a ratio at or above its goal is a win (CPU, CUDA)
GOALS = {"vit_vs_timm": (1.0, 1.0), "knn_vs_sklearn": (2.0, 50.0),
         "kmeans_vs_sklearn": (1.0, 20.0), "probe_grid_vs_sequential": (8.0, 8.0)}
# dense bf16 tensor-core peak in FLOP/s, by the name the device reports (datasheet numbers)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
MIM_REFINER_LR_GRID = [float(v) for v in probe.LR_GRID.split(",")]  # probe.py's default grid


@dataclass
class Settings:
    quick: bool = opt(False, "small sizes, CPU-friendly (about 70 s on 2 cores)")
    device: str = opt("auto", "auto, cpu or cuda")
    out: str = opt("", "write {'ratios': ..., 'details': ...} to this JSON file")
    only: str = opt("", "comma-separated subset of vit,knn,kmeans,probe,refine,loader (default: "
                        "all but loader, the data-loading throughput of the refinement views)")
    workers: int = opt(-1, "loader benchmark: DataLoader processes (-1: all cores but one on CUDA, 1 on CPU)")
    rounds: int = opt(0, "alternating timed rounds per comparison (0: 5 quick, 7 otherwise)")
    refine_batch: int = opt(0, "batch per step for the refinement benchmark (0: by preset)")
    presets: str = opt("", "refinement presets, comma-separated of tiny,base,large (default: tiny "
                           "on CPU, tiny,base,large on CUDA)")
    refine_ckpt: str = opt("both", "refinement with activation checkpointing: on, off or both")
    compile: str = opt("", "torch.compile in the refinement benchmark: '' (no), blocks (each encoder block, "
                           "as refine.py --compile) or model (the whole Refiner)")
    max_batch: bool = opt(True, "on CUDA, search the largest ViT-L refinement batch that fits")
    peak_tflops: float = opt(0.0, "peak bf16 TFLOP/s for the MFU (0: from the device name)")
    threads: int = opt(0, "CPU threads for torch and, through threadpoolctl, for numpy/scikit-learn, "
                         "the same for both sides (0: the libraries' defaults, all cores)")
    tiny: bool = opt(False, "microscopic sizes, for the test suite only (timings meaningless)")


# ---------------------------------------------------------------------------------------------
# Timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(ours, theirs, rounds: int, device, warmup: int = 1):
    """Time two callables alternately (ABBA...) after `warmup` untimed calls of each: (ours, theirs, ratio)."""
    for _ in range(warmup):
        ours(), theirs()
    sync(device)
    t_ours, t_theirs = [], []
    for r in range(rounds):
        pair = [(ours, t_ours), (theirs, t_theirs)]
        for fn, acc in (pair if r % 2 == 0 else pair[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t0)
    ratio = statistics.median(b / a for a, b in zip(t_ours, t_theirs))
    return t_ours, t_theirs, ratio


def summary(t_ours, t_theirs, ratio, goal, **extra):
    return dict(ours_s=statistics.median(t_ours), theirs_s=statistics.median(t_theirs),
                ratio=ratio, ratio_min=min(b / a for a, b in zip(t_ours, t_theirs)),
                ratio_max=max(b / a for a, b in zip(t_ours, t_theirs)),
                goal=goal, ok=ratio >= goal, rounds=len(t_ours), **extra)


# ---------------------------------------------------------------------------------------------
# ViT against timm

def timm_twin(vit: model.ViT):
    """timm's VisionTransformer of the same size holding the same weights."""
    from timm.models.vision_transformer import VisionTransformer
    t = VisionTransformer(img_size=vit.img_size, patch_size=vit.patch, embed_dim=vit.dim,
                          depth=vit.depth, num_heads=vit.heads, mlp_ratio=vit.mlp_ratio,
                          num_classes=0, global_pool="token", class_token=True)
    t.load_state_dict(model.export_encoder(vit), strict=True)
    return t


def bench_vit(name, dim, depth, heads, patch, img, batch, device, bf16, rounds, goal, reps=1):
    torch.manual_seed(0)
    vit = model.ViT(dim=dim, depth=depth, heads=heads, patch=patch, img_size=img)
    theirs = timm_twin(vit)
    vit, theirs = vit.to(device).train(), theirs.to(device).train()
    # same weights -> same function: checked on a few images in float32 before timing
    with torch.no_grad():
        xs = torch.randn(2, 3, img, img, device=device)
        diff = (vit(xs) - theirs.forward_features(xs)).abs().max().item()
    x = torch.randn(batch, 3, img, img, device=device)

    def step(net, fwd):
        def run():  # `reps` steps per timed call: a GPU step alone is too short for a host clock
            for _ in range(reps):
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    out = fwd(x)  # (B, 1+N, D) final-normed tokens, both
                out.float().square().mean().backward()
                net.zero_grad(set_to_none=True)
        return run

    t_ours, t_theirs, ratio = alternate(step(vit, vit), step(theirs, theirs.forward_features),
                                        rounds, device)
    n_params = sum(p.numel() for p in vit.parameters())
    res = summary(t_ours, t_theirs, ratio, goal, model=name, dim=dim, depth=depth, heads=heads,
                  patch=patch, img_size=img, batch=batch, dtype="bf16 autocast" if bf16 else "float32",
                  params=n_params, ours_img_s=reps * batch / statistics.median(t_ours),
                  theirs_img_s=reps * batch / statistics.median(t_theirs), max_abs_diff_fp32=diff, agree_ok=diff < 1e-4,
                  steps_per_round=reps)
    return res  # the models and the batch go with the frame


# ---------------------------------------------------------------------------------------------
# k-NN against scikit-learn

def clustered_features(n, m, d, classes, seed=0, spread=1.0):
    """Train (n, d) / test (m, d) float32 features around `classes` random centres (no sea of ties), int64 labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    ytr, yte = rng.integers(classes, size=n), rng.integers(classes, size=m)
    xtr = centres[ytr] + spread * rng.standard_normal((n, d), dtype=np.float32)
    xte = centres[yte] + spread * rng.standard_normal((m, d), dtype=np.float32)
    return xtr, ytr, xte, yte


def bench_knn(n, m, d, k, classes, device, rounds, goal):
    from sklearn.neighbors import KNeighborsClassifier
    T = 0.07
    xtr, ytr, xte, yte = clustered_features(n, m, d, classes, spread=2.0)
    # the same vote as ours: scikit-learn hands the weight function cosine distances 1 - sim
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                              weights=lambda dist: np.exp((1.0 - dist) / T))
    out = {}

    def theirs():
        sk.fit(xtr, ytr)
        out["theirs"] = sk.predict(xte)

    def ours():  # host -> device, search and vote, result back on the host: all counted
        tr = torch.from_numpy(xtr).to(device)
        te = torch.from_numpy(xte).to(device)
        ys = torch.from_numpy(ytr).to(device)
        out["ours"] = knn.knn_predict(tr, ys, te, k, temperature=T, num_classes=classes).cpu().numpy()

    t_ours, t_theirs, ratio = alternate(ours, theirs, rounds, device)
    agree = float((out["ours"] == out["theirs"]).mean())
    # the neighbour sets themselves, on the first 200 test rows (ties aside they must be equal)
    q = min(200, m)
    sk_idx = sk.kneighbors(xte[:q], return_distance=False)
    sims = F.normalize(torch.from_numpy(xte[:q]), dim=1) @ F.normalize(torch.from_numpy(xtr), dim=1).T
    our_idx = sims.topk(k, dim=1).indices.numpy()
    same_sets = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(sk_idx, our_idx)]))
    return summary(t_ours, t_theirs, ratio, goal, train=n, test=m, dim=d, k=k, classes=classes,
                   sklearn="KNeighborsClassifier(algorithm='brute', metric='cosine', "
                           "weights=exp((1-dist)/0.07)) fit + predict",
                   prediction_agreement=agree, neighbour_set_overlap=same_sets,
                   top1_ours=float((out["ours"] == yte).mean()), agree_ok=agree >= 0.99)


# ---------------------------------------------------------------------------------------------
# k-means against scikit-learn

def bench_kmeans(n, d, K, n_init, iters, device, rounds, goal):
    from sklearn.cluster import KMeans
    x, _, _, _ = clustered_features(n, 1, d, K, seed=1, spread=0.5)
    sk = KMeans(n_clusters=K, init="k-means++", n_init=n_init, max_iter=iters, tol=1e-4,
                algorithm="lloyd", random_state=0)
    out = {}

    def theirs():
        out["theirs"] = sk.fit(x).inertia_

    def ours():  # n_init seeded runs, the lowest inertia kept, as scikit-learn does
        xt = torch.from_numpy(x).to(device)
        out["ours"] = min(cluster.kmeans(xt, K, iters=iters, seed=s, tol=1e-4)[2] for s in range(n_init))

    t_ours, t_theirs, ratio = alternate(ours, theirs, rounds, device)
    rel = abs(out["ours"] - out["theirs"]) / out["theirs"]
    # The best of a few k-means++ draws is a lottery (on these 50 blobs single runs of either side
    # land 5-15% apart), so the check that both do the same work starts both from the same centres.
    xt = torch.from_numpy(x).to(device)
    start = cluster.kmeans_plusplus(xt, (xt * xt).sum(1), K, torch.Generator(device=device).manual_seed(0))
    same_ours = cluster.kmeans(xt, K, iters=iters, init=start, tol=1e-4)[2]
    same_sk = KMeans(n_clusters=K, init=start.cpu().numpy(), n_init=1, max_iter=iters, tol=1e-4,
                     algorithm="lloyd").fit(x).inertia_
    same_rel = abs(same_ours - same_sk) / same_sk
    return summary(t_ours, t_theirs, ratio, goal, points=n, dim=d, k=K, n_init=n_init, max_iter=iters,
                   tol=1e-4, sklearn=f"KMeans(k-means++, n_init={n_init}, max_iter={iters}, lloyd)",
                   sklearn_iters_best_run=int(sk.n_iter_), inertia_ours=out["ours"],
                   inertia_sklearn=out["theirs"], inertia_rel_diff=rel, inertia_same_start_ours=same_ours,
                   inertia_same_start_sklearn=same_sk, inertia_same_start_rel_diff=same_rel,
                   agree_ok=same_rel <= 0.01)


# ---------------------------------------------------------------------------------------------
# Stacked-grid probe against 13 separate trainings

def bench_probe(n, d, classes, epochs, device, rounds, goal):
    xtr, ytr, xva, yva = clustered_features(n, max(1, n // 5), d, classes, seed=2, spread=4.0)
    x, y, vx, vy = (torch.from_numpy(a).to(device) for a in (xtr, ytr, xva, yva))
    batch = min(1024, n)
    out = {}

    def ours():  # the whole grid as one stacked layer, one pass over the features per epoch
        out["ours"] = probe.linear_probe(x, y, vx, vy, MIM_REFINER_LR_GRID, epochs, batch)

    def theirs():  # the grid the usual way: one training per learning rate
        out["theirs"] = [probe.linear_probe(x, y, vx, vy, [lr], epochs, batch)[0]
                         for lr in MIM_REFINER_LR_GRID]

    t_ours, t_theirs, ratio = alternate(ours, theirs, rounds, device)
    diffs = [abs(a - b) for a, b in zip(out["ours"], out["theirs"])]
    return summary(t_ours, t_theirs, ratio, goal, train=n, dim=d, classes=classes, epochs=epochs,
                   batch=batch, grid=len(MIM_REFINER_LR_GRID), top1_grid=out["ours"],
                   top1_sequential=out["theirs"], max_top1_diff=max(diffs),
                   # the probes differ only in their random init and data order: same best top-1
                   best_top1_diff=abs(max(out["ours"]) - max(out["theirs"])),
                   agree_ok=abs(max(out["ours"]) - max(out["theirs"])) <= 0.02)


def bench_probe_augment(n, epochs, device, rounds, goal):
    """The probe protocol of the papers (`probe.py --augment`), one lr at a time against the stacked grid.

    Every epoch the frozen encoder embeds a new RandomResizedCrop + flip of every train image: each of the 13 single-lr
    trainings needs its own encoder passes, the grid one per epoch. Encoder: pretrain.py's tiny MAE size (128 wide, 6
    deep, patch 4) on the embedded data set."""
    from util.data import JitteredDigits
    from util.features import extract_features
    data = JitteredDigits("train", n=n, transform=probe.train_transform(32))
    y = torch.as_tensor(data.targets).to(device)
    torch.manual_seed(0)
    vit = model.ViT(dim=128, depth=6, heads=2, patch=4, img_size=32).to(device).eval()
    batch = min(1024, n)

    def train(lrs):
        trainer = probe.GridTrainer(vit.dim, 10, lrs, batch, epochs, n, 0.1 * epochs, 0, device)
        for epoch in range(epochs):
            torch.manual_seed(epoch)  # the same crops in every training
            feats, _ = extract_features(vit, data, [vit.depth], "cls", 256, device, 0)
            trainer.train_epoch(feats[vit.depth].to(device), y)
        return trainer

    t_ours, t_theirs, ratio = alternate(lambda: train(MIM_REFINER_LR_GRID),
                                        lambda: [train([lr]) for lr in MIM_REFINER_LR_GRID],
                                        rounds, device, warmup=0)  # 13 trainings warm themselves
    return summary(t_ours, t_theirs, ratio, goal, protocol="augment (probe.py --augment)", train=n,
                   epochs=epochs, batch=batch, grid=len(MIM_REFINER_LR_GRID),
                   encoder="ViT 128 wide, 6 deep, patch 4, 32 px")


# ---------------------------------------------------------------------------------------------
# Data loading of the refinement views

def bench_loader(device, n_images, batch, workers, epochs=3):
    """refine.py's MIM-Refiner views, coloured per image in the loader or per batch on the device.

    2 x 224 + 10 x 96 views (BYOL) of 500 x 375 JPEGs (ImageNet's typical size): before, the worker colours every
    view (`V.ReferenceViews`); after, it decodes, crops, flips and draws the parameters (V.Views) and the device
    colours whole batches (V.to_input). One DataLoader per side with `workers` processes (0: the main process, the
    one worker), batches only collated and copied to the device, epochs alternating (before, after, after, before,
    ...); img/s per worker = img/s / max(1, workers), median over the epochs after the first; then to_input's time."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from util import views as V
    from util.data import EpochKeys, loader_kwargs
    root = tempfile.mkdtemp()
    try:
        os.makedirs(os.path.join(root, "c0"))
        rng = np.random.default_rng(0)
        for i in range(n_images):  # smooth random pictures: JPEG sizes like photographs
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(
                os.path.join(root, "c0", f"{i}.jpg"), quality=90)
        vit = SimpleNamespace(dim=1024, depth=24, patch=16, img_size=224, post_norm=False)  # ViT-L/16's recipe
        cfg = resolve(refine.Settings(batch_size=batch), vit, 1, 1_281_167)
        images, views = datasets.ImageFolder(root), V.make_views(cfg)
        sides = {"before": Seeded(images, V.ReferenceViews(cfg), 0),  # ([views], index), seeded as V.Views
                 "after": V.Views(images, views, 0)}  # (([crops], params), index)
        keys = {k: EpochKeys() for k in sides}
        loaders = {k: DataLoader(ds, batch, sampler=keys[k], drop_last=True, **loader_kwargs(device, workers))
                   for k, ds in sides.items()}
        rates = {k: [] for k in sides}
        for epoch in range(epochs):
            for k in (("before", "after") if epoch % 2 == 0 else ("after", "before")):
                keys[k].keys = [(epoch, i) for i in torch.randperm(n_images).tolist()]
                t0, n = time.perf_counter(), 0
                for x, _ in loaders[k]:  # collate and copy only: what the GPU would wait for
                    x = [t.to(device, non_blocking=True) for t in (x[0] if k == "after" else x)]  # the crops
                    n += batch
                sync(device)
                rates[k].append(n / (time.perf_counter() - t0))
        del loaders  # the workers end
        (crops, params), _ = next(iter(DataLoader(sides["after"], batch, sampler=[(0, i) for i in range(batch)])))
        crops, params = [c.to(device) for c in crops], params.to(device)
        times = []
        for _ in range(3 if device.type == "cpu" else 20):
            t0 = time.perf_counter()
            V.to_input(crops, params, views, device)
            sync(device)
            times.append(time.perf_counter() - t0)
        per = {k: statistics.median(v[1:] or v) / max(1, workers) for k, v in rates.items()}
        r = dict(images=n_images, batch=batch, workers=workers, views="2x224 + 10x96 (BYOL)",
                 before_img_s_per_worker=per["before"], after_img_s_per_worker=per["after"],
                 ratio=per["after"] / per["before"], img_s=per["after"] * max(1, workers),
                 device_augment_ms_per_batch=1e3 * statistics.median(times),
                 device_augment_img_s=batch / statistics.median(times), cpu_count=os.cpu_count(),
                 note="persistent workers, pinned memory on CUDA; JPEG 500x375; loader batches collated and "
                      "copied, not coloured; the device's colouring timed apart")
        print(f"loader, img/s per worker ({workers} workers): before {per['before']:.1f}, after {per['after']:.1f}, "
              f"ratio {r['ratio']:.2f}; device augmentation {r['device_augment_ms_per_batch']:.0f} ms per batch "
              f"of {batch} ({r['device_augment_img_s']:.0f} img/s on {device.type})", flush=True)
        return r
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The refinement step: refine.py's own

# name: (dim, depth, heads, patch, image size, train images; the recipe follows both). micro: the test suite's;
# tiny: pretrain.py's tiny MAE on the embedded digits (recipe.py's small recipe); base, large: ViT-B/16 and
# ViT-L/16 on ImageNet-1k (the papers' recipe).
REFINE_PRESETS = {"micro": (32, 2, 2, 8, 16, 10_000), "tiny": (128, 6, 2, 4, 32, 10_000),
                  "base": (*model.SIZES["base"], 224, 1_281_167), "large": (*model.SIZES["large"], 224, 1_281_167)}


def tokens_per_image(patch, views):
    """Encoder tokens one image costs, summed over its views (CLS included)."""
    return sum(n * (1 + (s // patch) ** 2) for s, n in views)


def free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


class RefineBench:
    """refine.py's MIM-Refiner parts for a preset's encoder, built as refine.main builds them, in phase 2.

    recipe.py's settings, 2 global + 10 local views; encoder and heads train, the EMA encoder follows; stepped by
    `refine.refine_step` at any batch size, the optimizer state kept allocated between batch sizes as in a real run."""

    def __init__(self, preset, ckpt, device, batch, compile=""):
        dim, depth, heads, patch, img, n_train = REFINE_PRESETS[preset]
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: ViT-L init on a CPU takes seconds
            vit = model.ViT(dim=dim, depth=depth, heads=heads, patch=patch, img_size=img, grad_checkpointing=ckpt)
        for blk in vit.blocks if compile == "blocks" else []:  # as refine.py --compile: each block, in place
            blk.compile()
        self.cfg = resolve(refine.Settings(local_crops=10, batch_size=batch, device=device.type,
                                           grad_checkpointing=ckpt), vit, 1, n_train)
        self.parts = refine.build(self.cfg, vit)
        for part in self.parts.state().values():
            part.to(device)
        self.phase = refine.make_phases(self.cfg, n_train // batch, batch)[1]
        self.net, self.optim = refine.start_phase(self.parts, self.cfg, self.phase, common.Dist(0, 1, device), None)
        if compile == "model":  # the whole Refiner, as refine.py --compile did before it compiled each block
            self.net = torch.compile(self.net)
        self.desc = "refine.refine_step, phase 2" + (f", torch.compile ({compile})" if compile else "")
        self.preset, self.ckpt, self.device, self.patch, self.steps_done = preset, ckpt, device, patch, 0
        self.views_spec = [(self.cfg.global_size, 2), (self.cfg.local_size, self.cfg.local_crops)]
        self.n_params = sum(p.numel() for p in vit.parameters())

    def run(self, batch, steps, warmup=1):
        """Median seconds per step at this batch (synthetic views on the device), peak memory on CUDA; raises on OOM."""
        dev = self.device
        views = [torch.randn(batch, 3, s, s, device=dev) for s, n in self.views_spec for _ in range(n)]
        idx = torch.arange(batch, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for i in range(warmup + steps):
            sync(dev)
            t0 = time.perf_counter()
            loss, _ = refine.refine_step(self.net, self.optim, self.parts, views, idx, self.phase, self.steps_done,
                                         self.cfg, rank=0)  # its default sync: the loss read back, once a step
            sync(dev)
            self.steps_done += 1
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        blocks = self.parts.refiner.blocks
        res = dict(preset=self.preset, step=self.desc, batch=batch, grad_checkpointing=self.ckpt,
                   views=" + ".join(f"{n}x{s}" for s, n in self.views_spec),
                   heads_on_blocks=f"{blocks[0]}-{blocks[-1]}", frozen_blocks=self.cfg.freeze_blocks,
                   encoder_params=self.n_params, tokens_per_image=tokens_per_image(self.patch, self.views_spec),
                   steps=steps, loss=loss, step_s=statistics.median(times), img_s=batch / statistics.median(times))
        if dev.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        else:  # no allocator statistics on a CPU: the peak resident set of the process so far
            res["peak_rss_gib_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return res

    def fits(self, batch):
        """Peak GiB of one step at this batch (after a warm-up step), or None if out of memory."""
        try:
            return self.run(batch, 1)["peak_mem_gib"]
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
        self.recover()  # outside the except block, whose traceback still holds the activations
        return None

    def recover(self):
        self.optim.zero_grad(set_to_none=True)
        free_cuda()

    def largest_batch(self, start=32, granularity=16, cap=4096):
        """Double until a step runs out of memory, then bisect down to `granularity` images."""
        lo, hi, b, mem = 0, None, start, {}
        while hi is None and b <= cap:
            m = self.fits(b)
            if m is None:
                hi = b
            else:
                lo, mem[b], b = b, m, b * 2
        while hi is not None and hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            m = self.fits(mid)
            if m is None:
                hi = mid
            else:
                lo, mem[mid] = mid, m
        return dict(preset=self.preset, grad_checkpointing=self.ckpt, largest=lo,
                    peak_mem_gib=mem.get(lo), first_oom=hi, tried_ok=sorted(mem))

    def close(self):
        del self.net, self.optim, self.parts
        free_cuda()


# ---------------------------------------------------------------------------------------------

def peak_flops(device, override_tflops):
    if override_tflops:
        return override_tflops * 1e12, "given"
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():  # the first match: "H100 PCIe" before "H100"
        if key in name:
            return val, name
    return None, name


def machine(device):
    info = dict(python=platform.python_version(), torch=torch.__version__,
                threads=torch.get_num_threads(), load_avg=os.getloadavg())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return info


def print_table(rows):
    print(f"{'comparison':<28}{'setting':<44}{'ours s':>9}{'theirs s':>10}{'ratio':>8}{'goal':>7}  ok   same result")
    for key, r in rows:
        print(f"{key:<28}{r.get('setting', ''):<44}{r['ours_s']:>9.4f}{r['theirs_s']:>10.4f}"
              f"{r['ratio']:>8.2f}{r['goal']:>7.1f}  {'yes' if r['ok'] else 'NO ':<5}"
              f"{({True: 'yes', False: 'NO'}.get(r.get('agree_ok'), '-'))}")


def print_refine(details: dict):
    """The lines under the table: refinement step per run (img/s, memory, MFU), largest ViT-L batch, loader."""
    for r in details.get("refine_step", {}).get("runs", []):
        line = f"refine step {r['preset']:<6} batch {r['batch']:>4}  checkpointing {str(r['grad_checkpointing']):<5}"
        if r.get("oom"):
            print(line + "  out of memory")
            continue
        line += f" {r['img_s']:>9.1f} img/s"
        if "peak_mem_gib" in r:
            line += f"  peak {r['peak_mem_gib']:.2f} GiB"
        if "mfu" in r:
            line += f"  MFU {100 * r['mfu']:.1f}%"
        print(line)
    if "mfu_formula" in details.get("refine_step", {}):
        print(details["refine_step"]["mfu_formula"])
    for r in details.get("refine_step", {}).get("largest_batch", []):
        print(f"largest ViT-L refinement batch per GPU, checkpointing {r['grad_checkpointing']}: "
              f"{r['largest']} (peak {r['peak_mem_gib'] or 0:.1f} GiB; {r['first_oom']} ran out of memory)")
    if "img_s" in details.get("refine_loader", {}):
        r = details["refine_loader"]
        print(f"refinement views through the DataLoader: {r['img_s']:.0f} img/s with {r['workers']} workers")


def bench_device(cfg) -> torch.device:
    """The device of --device; the thread count of torch, BLAS and OpenMP set unless --threads 0."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise model.UserError(f"unknown --device {cfg.device!r}; use auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise model.UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    threads = 1 if cfg.tiny else max(0, cfg.threads)  # tiny: the test suite, one thread per test
    if threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
        torch.set_num_threads(threads)
        threadpool_limits(threads)  # BLAS and OpenMP of numpy and scikit-learn
    return device


def main(cfg: Settings) -> dict:
    device = bench_device(cfg)
    known = {"vit", "knn", "kmeans", "probe", "refine", "loader"}
    only = set(cfg.only.split(",")) if cfg.only else known - {"loader"}
    if only - known:
        raise model.UserError(f"--only {cfg.only}: unknown part(s) {sorted(only - known)}; use {sorted(known)}")
    gpu, quick, tiny = device.type == "cuda", cfg.quick or cfg.tiny, cfg.tiny
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (k-NN, k-means) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    rounds = cfg.rounds or (2 if tiny else 5 if quick else 7)
    slow_rounds = cfg.rounds or (2 if tiny else 5 if quick else 3)  # on GPU scikit-learn takes seconds a round
    goal = {k: v[1 if gpu else 0] for k, v in GOALS.items()}
    details, ratios, rows = {"machine": machine(device)}, {}, []
    t_start = time.perf_counter()

    def save():  # after every part, so that a run cut short still leaves its figures
        if cfg.out:
            write_json(cfg.out, {"ratios": ratios, "details": details})
        print(f"[{time.perf_counter() - t_start:6.1f} s] done: {', '.join(k for k in details if k != 'machine')}",
              flush=True)

    def record(row: str, key: str, r: dict, setting: str):  # one comparison into the table and the JSON
        r["setting"] = setting
        rows.append((row, r))
        details[key] = r
        if key in GOALS and "ratio" in r:  # a comparison with a goal (not a detail row)
            ratios[key] = r["ratio"]

    if "vit" in only:
        if tiny:
            sizes = [("micro", 32, 2, 2, 8, 16, 4)]
        elif gpu:
            sizes = [("ViT-B/16", *model.SIZES["base"], 224, 128),
                     ("ViT-L/16", *model.SIZES["large"], 224, 64)]
        else:
            sizes = [("ViT-Ti/16 @ 64px", *model.SIZES["tiny"], 64, 32)]
        # same kernels on both sides: the ratio sits near 1, so twice the rounds on CPU to narrow the median
        res = [bench_vit(*s, device, gpu, rounds if gpu else 2 * rounds, goal["vit_vs_timm"], reps=5 if gpu else 1)
               for s in sizes]
        for r in res:
            r["setting"] = f"{r['model']} img {r['img_size']} batch {r['batch']} {r['dtype']}"
            rows.append(("vit_vs_timm", r))
        details["vit_vs_timm"] = res
        ratios["vit_vs_timm"] = min(r["ratio"] for r in res)  # the worst size counts
        save()

    if "knn" in only:
        # quick: D 128, the width of the CPU encoder (pretrain.py's tiny MAE); else D 384
        n, m, d, k, c = ((300, 50, 16, 5, 5) if tiny else (10000, 2000, 128, 20, 10) if quick
                         else (50000, 10000, 384, 20, 1000))
        r = bench_knn(n, m, d, k, c, device, slow_rounds, goal["knn_vs_sklearn"])
        record("knn_vs_sklearn", "knn_vs_sklearn", r, f"{n} x {m}, D {d}, k {k}")
        save()

    if "kmeans" in only:
        n, d, K, n_init, iters = ((400, 8, 4, 2, 10) if tiny else (20000, 128, 50, 3, 30) if quick
                                  else (50000, 384, 1000, 3, 50))
        r = bench_kmeans(n, d, K, n_init, iters, device, slow_rounds, goal["kmeans_vs_sklearn"])
        record("kmeans_vs_sklearn", "kmeans_vs_sklearn", r, f"{n} x D {d}, K {K}, n_init {n_init}, {iters} it")
        save()

    if "probe" in only:
        # the papers' protocol: crops re-embedded every epoch (the reported ratio)
        n_img, ep_aug = (64, 1) if tiny else (256, 2) if quick else (4096, 2)
        r = bench_probe_augment(n_img, ep_aug, device, 1, goal["probe_grid_vs_sequential"])
        record("probe_grid_vs_sequential", "probe_grid_vs_sequential", r,
               f"--augment, {n_img} images, {ep_aug} epochs")
        save()
        # the fast mode: features extracted once, only the probe steps differ
        n, d, c, ep = ((256, 16, 4, 2) if tiny else (5188, 128, 10, 10) if quick
                       else (100000, 1024, 1000, 2))
        r = bench_probe(n, d, c, ep, device, max(1, rounds // 2), goal["probe_grid_vs_sequential"])
        record("probe (features once)", "probe_grid_vs_sequential_features_once", r,
               f"features once: {n} x D {d}, {c} classes, {ep} epochs")
        save()

    if "loader" in only:
        w = cfg.workers if cfg.workers >= 0 else (max(1, (os.cpu_count() or 2) - 1) if gpu else 0 if tiny else 1)
        details["refine_loader"] = bench_loader(device, 8 if tiny else 1024 if gpu else 128,
                                                4 if tiny else 64 if gpu else 32, w, 2 if tiny else 3)
        save()

    if "refine" in only:
        def partial(r):
            details["refine_step"] = r
            save()
        details["refine_step"] = bench_refine(cfg, device, tiny, quick, partial=partial)

    details["wall_s"] = time.perf_counter() - t_start
    print_table(rows)
    print_refine(details)
    print(f"total {details['wall_s']:.1f} s on {details['machine'].get('gpu', details['machine']['cpu'])}")
    result = {"ratios": ratios, "details": details}
    if cfg.out:
        write_json(cfg.out, result)
    return result


def bench_refine(cfg, device, tiny, quick, partial=None):
    """Refinement step per preset, checkpointing on and off; on CUDA the MFU and the largest ViT-L batch."""
    gpu = device.type == "cuda"
    default_batch = {"micro": 4, "tiny": 256 if gpu else 32, "base": 128 if gpu else 8, "large": 128 if gpu else 2}
    names = (cfg.presets.split(",") if cfg.presets else ["micro"] if tiny
             else ["tiny", "base", "large"] if gpu else ["tiny"] if quick else ["tiny", "base"])
    if set(names) - set(REFINE_PRESETS) or cfg.refine_ckpt not in ("on", "off", "both"):
        raise model.UserError(f"--presets {cfg.presets} / --refine-ckpt {cfg.refine_ckpt}: use presets "
                              f"from {sorted(REFINE_PRESETS)} and on, off or both")
    if cfg.compile not in ("", "model", "blocks"):
        raise model.UserError(f"--compile {cfg.compile!r}: use model or blocks")
    ckpts = {"on": (True,), "off": (False,), "both": (True, False)}[cfg.refine_ckpt]
    steps = 2 if tiny else 3 if quick else 10
    out = {"runs": [], "note": "refine.refine_step in phase 2 on refine.build's parts, settings by recipe.py; "
                               "synthetic views (2 global + 10 local) already on the device: data loading not timed"}
    if gpu:
        peak, src = peak_flops(device, cfg.peak_tflops)
        out["peak_flops"], out["peak_source"] = peak, src
        out["mfu_formula"] = ("MFU = 6 x encoder params x tokens per image (CLS included, summed over "
                              "the views) x images/s / peak bf16 FLOP/s"
                              f" (peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, {src}; "
                              "attention scores, heads and checkpoint recompute not counted)")
    for preset in names:
        batch = cfg.refine_batch or default_batch[preset]
        for ckpt in ckpts:  # checkpointed first: on a CPU its peak RSS is not masked
            rb = RefineBench(preset, ckpt, device, batch, compile=cfg.compile)
            r = dict(preset=preset, batch=batch, grad_checkpointing=ckpt, oom=True)
            try:
                r = rb.run(batch, steps)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
            if r.get("oom"):
                rb.recover()
            if gpu and peak and "img_s" in r:
                r["mfu"] = 6 * r["encoder_params"] * r["tokens_per_image"] * r["img_s"] / peak
            out["runs"].append(r)
            if gpu and cfg.max_batch and preset == "large":
                out.setdefault("largest_batch", []).append(rb.largest_batch())
            rb.close()
            if partial is not None:
                partial(out)
    return out


if __name__ == "__main__":
    cli(main, Settings)
