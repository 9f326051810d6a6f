"""demo.py: the whole chain at a reduced size on a tiny encoder and image folder.

The chain: refine twice, extract once, k-NN, probe, low-shot, clustering, summary; the summary checked against the
stages."""
import importlib.util
import json
import os
import statistics
import sys

import pytest
import torch
from conftest import ROOT, make_checkpoint, make_image_folder

import demo
import knn
import model
from model import UserError
from util import common
from util.data import build_dataset, eval_transform


def test_demo_quick_chain(tmp_path, capsys):
    """Every encoder's row (baselines, two seeds of a refinement, own view, from scratch) is what its stages wrote."""
    folder = make_image_folder(tmp_path / "data", per_class=(8, 2))  # 3 classes: 24 train, 6 val
    ckpt = str(tmp_path / "tiny.pth")
    make_checkpoint(ckpt, depth=3)
    out = str(tmp_path / "demo")
    has_plot = importlib.util.find_spec("matplotlib") is not None
    summary = demo.main(demo.Settings(ckpt=ckpt, data=folder, out=out, quick=True, jobs=3, seeds=2,
                                      plot=has_plot, own_view="mim-refiner,mae-ct", scratch_epochs=2))

    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    enc = summary["encoders"]
    assert summary["split"] == folder and summary["seeds"] == [0, 1]
    assert list(enc) == ["pixels", "pixels, per-image", "random", "mae", "mim-refiner", "mae-ct",
                         "mim-refiner, own view", "mae-ct, own view", demo.SCRATCH]
    keys = ("knn_top1", "knn_plain_top1", "probe_top1", "shot1_top1", "shot5_top1", "cluster_acc", "cluster_nmi")
    for name, s in enc.items():
        n = 1 if name in ("pixels", "pixels, per-image", "random", "mae", demo.SCRATCH) else 2  # one per seed
        assert all(len(s[k]) == n and all(0.0 <= v <= 1.0 for v in s[k]) for k in keys), (name, s)
        if not name.startswith("pixels"):  # an encoder: a k-NN per block, the last one is knn_top1
            assert list(s["knn_per_block"]) == ["1", "2", "3"] and s["knn_top1"] == s["knn_per_block"]["3"]
            assert s["knn_best_block_top1"] == [max(v[i] for v in s["knn_per_block"].values()) for i in range(n)]
    for name in ("mim-refiner", "mae-ct, own view"):  # each seed a new encoder
        a, b = (model.load_encoder(os.path.join(out, name, f"seed{s}", "encoder.pth")) for s in (0, 1))
        assert not torch.equal(a.blocks[-1].mlp.fc1.weight, b.blocks[-1].mlp.fc1.weight), name
    ck = torch.load(os.path.join(out, "mae-ct, own view", "seed1", "last.pt"), weights_only=True)
    assert ck["settings"]["neighbours"] == "none" and ck["settings"]["seed"] == 1
    ck = torch.load(os.path.join(out, demo.SCRATCH, "seed0", "last.pt"), weights_only=True)["settings"]
    assert (ck["neighbours"], ck["freeze_blocks"], ck["epochs"], ck["ckpt"]) == (
        "none", 0, 2, os.path.join(out, "random", "encoder.pth"))
    # the random baseline: fresh weights of the MAE's shape, not the MAE, the same in every run (seed 1, drawn
    # before the chains' threads start, whose load_encoder calls draw from the same global RNG)
    fresh, mae = model.load_encoder(os.path.join(out, "random", "encoder.pth")), model.load_encoder(ckpt)
    assert fresh.arch() == mae.arch()
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    torch.manual_seed(1)
    alone = model.ViT(**model.load_encoder(ckpt).arch())
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), fresh.state_dict().values()))
    # the MAE's numbers are what knn.py reports for the checkpoint itself (k = 20, every block)
    ref = knn.main(knn.Settings(ckpt=ckpt, data=folder, blocks="all", k="20", device="cpu", workers=0))
    assert {str(r["block"]): [r["top1"]] for r in ref["results"]} == enc["mae"]["knn_per_block"]
    # the pixel baseline is knn.py on the flattened evaluation-transform pixels, by hand
    ds = {s: build_dataset(folder, s, eval_transform(32)) for s in ("train", "val")}
    x = {s: torch.stack([ds[s][i][0] for i in range(len(ds[s]))]).flatten(1) for s in ds}
    y = {s: torch.as_tensor(ds[s].targets) for s in ds}
    tr, va = knn.standardize(x["train"], x["val"])
    assert enc["pixels"]["knn_top1"] == [float((knn.knn_predict(tr, y["train"], va, 20) == y["val"]).float().mean())]
    text = capsys.readouterr().out
    assert "mim-refiner, own view" in text and "k-means ACC" in text and " ± " in text
    for picture in ("knn_per_block.png", "neighbours.png", "tsne.png"):
        assert os.path.isfile(os.path.join(out, picture)) == has_plot


def test_refine_flags_of_the_ablations():
    """The own view replaces the swap and nothing else; the control refines the random encoder, all of it."""
    cfg = demo.Settings(mae_ct_args="--epochs 2")
    assert demo.refine_flags(cfg, "mae-ct") == ["--method", "mae-ct", "--epochs", "2"]
    assert demo.refine_flags(cfg, "mae-ct, own view") == ["--method", "mae-ct", "--epochs", "2", "--neighbours", "none"]
    assert demo.refine_flags(cfg, "random+mim-refiner") == ["--method", "mim-refiner", "--freeze-blocks", "0"]
    cfg = demo.Settings(scratch_epochs=20)  # from scratch: own view, all of it trains, longer, one seed
    assert demo.refine_flags(cfg, demo.SCRATCH) == ["--method", "mim-refiner", "--neighbours", "none",
                                                    "--freeze-blocks", "0", "--epochs", "20"]
    assert demo.seeds_of(demo.Settings(seeds=3), demo.SCRATCH) == [0]


def test_one_seed_names_methods_or_single_encoders():
    """--one-seed mae-ct covers every MAE-CT encoder; --one-seed random+mae-ct that control alone."""
    cfg = demo.Settings(seeds=3, one_seed="mae-ct")
    assert [demo.seeds_of(cfg, n) for n in ("mae-ct", "mae-ct, own view", "random+mae-ct", "mim-refiner")] == [
        [0], [0], [0], [0, 1, 2]]
    cfg = demo.Settings(seeds=3, one_seed="random+mim-refiner,random+mae-ct")
    assert [demo.seeds_of(cfg, n) for n in ("mae-ct", "random+mae-ct", "random+mim-refiner", "mae")] == [
        [0, 1, 2], [0], [0], [0]]


def test_table_cells_are_mean_and_sample_sd():
    """Two seeds 0.5 and 0.7: mean 60.0, sample SD 14.1 (sqrt(0.02) = 0.1414)."""
    assert demo.cell([0.5, 0.7]) == "60.0 ± 14.1" and demo.cell([0.123]) == "12.3"


def test_demo_errors(tmp_path):
    """A missing or unreadable checkpoint fails at once; a stage's error stops the demo, naming the stage and log."""
    with pytest.raises(UserError, match="does not exist"):
        demo.main(demo.Settings(ckpt=str(tmp_path / "missing.pth"), plot=False))
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {}}, bad)
    with pytest.raises(UserError, match="not a ViT encoder checkpoint"):  # the random encoder, before any stage
        demo.main(demo.Settings(ckpt=bad, out=str(tmp_path / "o"), quick=True, plot=False, jobs=1))
    ckpt, folder = str(tmp_path / "tiny.pth"), make_image_folder(tmp_path / "data", per_class=(8, 2))
    make_checkpoint(ckpt, depth=2)
    few = make_image_folder(tmp_path / "few", per_class=(4, 2))  # 12 train images: every k-NN of k = 20 fails
    with pytest.raises(UserError, match=r"knn\.py .* failed \(exit [1-9]\d*\): .*the 12 train images.*knn\.log"):
        demo.main(demo.Settings(ckpt=ckpt, data=few, out=str(tmp_path / "o1"), quick=True, plot=False, jobs=1))
    with pytest.raises(UserError, match=r"refine\.py .*--no-such-flag failed \(exit [1-9]\d*\): .*refine\.log"):
        demo.main(demo.Settings(ckpt=ckpt, data=folder, out=str(tmp_path / "o2"), quick=True, plot=False, jobs=1,
                                mim_refiner_args="--no-such-flag"))


def committed_run(path: str, ckpt: str) -> dict:
    """A committed summary, checked: its checkpoint, 3 seeds on the report split, one value per seed of each row."""
    with open(path) as f:
        summary = json.load(f)
    assert (summary["split"], summary["ckpt"], summary["seeds"]) == ("jittered-digits:report", ckpt, [0, 1, 2])
    for name, e in summary["encoders"].items():  # the baselines, the MAE, the controls: one value
        n = 1 if name in (*demo.UNSEEDED, *demo.CONTROLS, demo.SCRATCH) else 3
        assert all(len(v) == n for k, v in e.items() if k != "knn_per_block"), name
        assert all(len(v) == n for v in e.get("knn_per_block", {}).values()), name
    return summary


def test_readme_demo_table_is_the_committed_run():
    """The README's demo table is demo.table() of docs/demo_summary.json, the run of what `make demo` refines."""
    summary = committed_run(demo.SUMMARIES[0], "checkpoints/mae_tiny_digits.pth")
    with open(os.path.join(demo.HERE, "README.md")) as f:
        assert demo.table(summary, markdown=True) in f.read()


def test_demo_page_quotes_the_committed_bf16_run():
    """docs/DEMO.md's bf16 section quotes demo.table() of docs/demo_summary_bf16.json and the float32 run beside it.

    The rows without refinement equal the float32 run's."""
    bf16 = committed_run(demo.SUMMARIES[3], "checkpoints/mae_tiny_digits.pth")
    fp32 = committed_run(demo.SUMMARIES[0], "checkpoints/mae_tiny_digits.pth")
    assert (bf16["precision"], fp32["precision"]) == ("bf16", "fp32")
    assert all(bf16["encoders"][n] == fp32["encoders"][n] for n in demo.UNSEEDED)
    with open(os.path.join(demo.HERE, "docs", "DEMO.md")) as f:
        page = f.read()
    assert demo.table(bf16, markdown=True) in page
    text = " ".join(page.split())
    c = lambda s, n, m: demo.cell(s["encoders"][n][m])  # noqa: E731
    assert (f"k-NN {c(bf16, 'mim-refiner', 'knn_top1')} against {c(fp32, 'mim-refiner', 'knn_top1')} (MIM-Refiner) "
            f"and {c(bf16, 'mae-ct', 'knn_top1')} against {c(fp32, 'mae-ct', 'knn_top1')} (MAE-CT), k-means ACC "
            f"{c(bf16, 'mim-refiner', 'cluster_acc')} against {c(fp32, 'mim-refiner', 'cluster_acc')} and "
            f"{c(bf16, 'mae-ct', 'cluster_acc')} against {c(fp32, 'mae-ct', 'cluster_acc')}") in text


def test_spread_is_against_the_committed_run_of_the_same_checkpoint_and_split(tmp_path):
    """A one-seed run is compared with the multi-seed run of its own checkpoint only; the MAE row is not refined."""
    ref = {"split": "s", "ckpt": "a.pth", "seeds": [0, 1, 2], "encoders": {
        "mae": {"knn_top1": [0.4], "cluster_acc": [0.1]},
        "mim-refiner": {"knn_top1": [0.6, 0.7, 0.8], "cluster_acc": [0.3, 0.3, 0.3]}}}
    paths = (str(tmp_path / "other.json"), str(tmp_path / "ref.json"), str(tmp_path / "missing.json"))
    common.write_json(paths[0], dict(ref, ckpt="b.pth", encoders={"mim-refiner": {"knn_top1": [0.1] * 3}}))
    common.write_json(paths[1], ref)
    run = {"split": "s", "ckpt": "a.pth", "seeds": [0], "encoders": {
        "mae": {"knn_top1": [0.4], "cluster_acc": [0.1]}, "mim-refiner": {"knn_top1": [0.65], "cluster_acc": [0.32]}}}
    assert demo.spread(run, paths).splitlines()[1:] == [
        "  mim-refiner: k-NN 65.0 (committed 70.0 ± 10.0), k-means ACC 32.0 (committed 30.0 ± 0.0)"]
    for other in (dict(run, ckpt="c.pth"), dict(run, split="t")):
        assert demo.spread(other, paths).startswith("(no committed multi-seed run of ")
    cfg = demo.Settings(ckpt=str(tmp_path / "e.pth"), out=str(tmp_path / "o"))
    assert demo.collect(cfg, [])["ckpt"] == os.path.relpath(str(tmp_path / "e.pth"), demo.HERE)
    # of two runs of the checkpoint, the one refined in this run's precision (unrecorded: fp32)
    common.write_json(paths[0], dict(ref, precision="bf16", encoders={"mim-refiner": {
        "knn_top1": [0.5] * 3, "cluster_acc": [0.2] * 3}}))
    assert "committed 70.0 ± 10.0" in demo.spread(run, paths) and "refined in fp32; this run: fp32" in demo.spread(
        run, paths)
    bf16 = demo.spread(dict(run, precision="bf16"), paths)
    assert "committed 50.0 ± 0.0" in bf16 and "other.json, refined in bf16; this run: bf16" in bf16


def synthetic_summary() -> dict:
    """A summary whose goals are worked out by hand in test_demo_goals_known_answers."""
    one = lambda v: {"knn_top1": [v], "knn_plain_top1": [v + 0.05]}  # noqa: E731
    return {"split": "s", "seeds": [0, 1, 2], "encoders": {
        "pixels": one(0.50), "pixels, per-image": one(0.60),
        "mae": {"knn_per_block": {"1": [0.40], "2": [0.50], "3": [0.46]}, "probe_top1": [0.70],
                "cluster_acc": [0.15]},
        "mim-refiner": {"knn_top1": [0.70, 0.72, 0.74], "cluster_acc": [0.40, 0.40, 0.40],
                        "knn_per_block": {"1": [0.4] * 3, "2": [0.5] * 3, "3": [0.70, 0.72, 0.74]}},
        "mae-ct": {"knn_top1": [0.60, 0.61, 0.62], "cluster_acc": [0.30, 0.30, 0.30]},
        "mae-ct, own view": {"knn_top1": [0.64, 0.65, 0.66], "cluster_acc": [0.20, 0.21, 0.22]}}}


def test_demo_goals_known_answers():
    """Each goal by hand: MAE best 50.0 (block 2), last 46.0; MIM-Refiner 72.0 ± 2.0, MAE-CT 61.0 ± 1.0, ..."""
    from tools import demo_goals
    got = {g: (m, ok) for g, m, ok in demo_goals.goals(synthetic_summary())}
    assert got["MAE k-NN: best block at least 3 points above the last"] == ("block 2 50.0, last 46.0", True)
    assert got["MIM-Refiner k-NN above MAE-CT's by more than 2 SD"] == ("+11.0 (2 SD = 4.0)", True)
    # the best pixel k-NN is the per-image one under plain cosine: 60 + 5
    assert got["mim-refiner: k-NN above every pixel k-NN"] == ("72.0 vs 65.0 (pixels, per-image, plain cosine)", True)
    assert got["mae-ct: k-NN above every pixel k-NN"][1] is False
    assert got["MAE best block at least the standardised pixels' k-NN"] == ("50.0 vs 50.0", True)
    # own view k-NN 65.0 ± 1.0 beats the swap's 61.0; k-means 30.0 ± 0.0 vs 21.0 ± 1.0: +9.0 > 2.0
    assert got["mae-ct: swap above own view on k-NN by more than 2 SD"] == ("-4.0 (2 SD = 2.0)", False)
    assert got["mae-ct: swap above own view on k-means ACC by more than 2 SD"] == ("+9.0 (2 SD = 2.0)", True)
    assert "mim-refiner: swap above own view on k-NN by more than 2 SD" not in got  # no such row in the run
    assert got["MIM-Refiner k-means ACC at least 20 points above the MAE's"] == ("+25.0", True)
    assert got["MAE linear probe at least 50"] == ("70.0", True)
    table = demo_goals.per_block(synthetic_summary()).splitlines()
    assert table[0] == "| block | mae | mim-refiner |" and table[-1] == "| 3 | 46.0 | 72.0 ± 2.0 |"


@pytest.mark.parametrize("path, marker", list(zip(demo.SUMMARIES, ["demo_goals", "demo_goals d12",
                                                                   "demo_goals d12 long"])))
def test_demo_page_quotes_the_goals_of_the_committed_runs(path, marker):
    """docs/DEMO.md holds tools/demo_goals.py's report of each committed run, between its markers."""
    from tools import demo_goals
    with open(path) as f:
        report = demo_goals.report(json.load(f))
    with open(os.path.join(demo.HERE, "docs", "DEMO.md")) as f:
        page = f.read()
    assert f"<!-- {marker} -->\n{report}\n<!-- /{marker} -->" in page


def test_readme_quotes_the_committed_12_block_run():
    """The 12-block MAE's 3-seed run (make demo-deep's second half): its checkpoint, seeds, the README's k-NN."""
    e = committed_run(demo.SUMMARIES[1], "checkpoints/mae_d12_digits.pth")["encoders"]
    knn_ = {n: demo.cell(v["knn_top1"]) for n, v in e.items()}
    with open(os.path.join(demo.HERE, "README.md")) as f:
        text = " ".join(f.read().split())  # one line, whatever the wrapping
    assert f"MAE {knn_['mae']} -> MIM-Refiner {knn_['mim-refiner']}, MAE-CT {knn_['mae-ct']}" in text
    assert (f"k-NN: {knn_['mim-refiner, own view']}, {knn_['mae-ct, own view']} against the swap's "
            f"{knn_['mim-refiner']}, {knn_['mae-ct']}") in text


def test_readme_quotes_the_committed_long_12_block_run():
    """The long 12-block MAE's 3-seed run (make demo-long): the README's MAE k-NN, the swap's gains on the own view."""
    e = committed_run(demo.SUMMARIES[2], "checkpoints/mae_d12_long_digits.pth")["encoders"]

    def gain(method, metric):
        return f"{100 * (statistics.mean(e[method][metric]) - statistics.mean(e[method + ', own view'][metric])):+.1f}"
    with open(os.path.join(demo.HERE, "README.md")) as f:
        text = " ".join(f.read().split())
    assert f"(`make demo-long`, k-NN {demo.cell(e['mae']['knn_top1'])})" in text
    assert (f"1-shot gains {gain('mim-refiner', 'shot1_top1')}, {gain('mae-ct', 'shot1_top1')} points and k-means ACC "
            f"{gain('mim-refiner', 'cluster_acc')}, {gain('mae-ct', 'cluster_acc')} from the swap") in text


def test_make_demo_long_refines_on_cuda_and_evaluates_on_the_cpu(tmp_path, monkeypatch):
    """make demo-long's demo.py flags give refine.py --device cuda last and bf16 on any host; stages stay on the CPU."""
    import shlex

    import refine
    from util.common import parse_settings
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = f.read().split("\ndemo-long:")[1].split("\n\n")[0].replace("\\\n", " ")
    line = next(ln for ln in recipe.splitlines() if "demo.py" in ln)
    args = shlex.split(line.split("demo.py", 1)[1].replace("$(PY)", ""))
    cmds = []
    monkeypatch.setattr(demo, "run", lambda cmd, log, cfg: cmds.append(cmd))
    monkeypatch.setattr(demo, "precision", lambda cfg, cpuinfo="": cfg.precision.replace("auto", "fp32"))  # no units
    cfg = parse_settings(demo.Settings, args + ["--ckpt", os.path.join(ROOT, "checkpoints", "mae_tiny_digits.pth"),
                                                "--out", str(tmp_path), "--no-plot"])
    for name in ("mim-refiner", "mae-ct, own view"):
        demo.chain(name, 1, cfg, demo.stage_flags(cfg))
    refines = [c for c in cmds if c[0] == "refine.py"]
    assert len(refines) == 2 and len(cmds) == 12  # per chain: refine, k-NN, plain k-NN, probe, shots, k-means
    got = [parse_settings(refine.Settings, c[1:]) for c in refines]
    assert [(r.device, r.method, r.neighbours, r.seed, r.precision) for r in got] == [
        ("cuda", "mim-refiner", refine.Settings.neighbours, 1, "bf16"), ("cuda", "mae-ct", "none", 1, "bf16")]
    assert all(c[c.index("--device") + 1] == "cpu" for c in cmds if c[0] != "refine.py")


def test_precision_auto_is_bf16_only_where_the_cpu_lists_bf16_units(tmp_path, monkeypatch):
    """auto reads the CPU's flags (none readable: fp32); bf16 and fp32 pass through; the chain hands it to refine.py."""
    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu avx2 avx512f", "fp32"), ("fpu avx512f avx512_bf16", "bf16"), ("amx_bf16 sse", "bf16")):
        info.write_text(f"processor : 0\nflags : {flags}\n")
        assert demo.precision(demo.Settings(), str(info)) == want
    assert demo.precision(demo.Settings(), str(tmp_path / "none")) == "fp32"
    assert demo.precision(demo.Settings(precision="fp32"), str(info)) == "fp32"
    monkeypatch.setattr(demo, "precision", lambda cfg: "bf16")
    cmds = []
    monkeypatch.setattr(demo, "run", lambda cmd, log, cfg: cmds.append(cmd))
    demo.chain("mae-ct", 0, demo.Settings(out=str(tmp_path)), demo.stage_flags(demo.Settings()))
    assert cmds[0][0] == "refine.py" and cmds[0][cmds[0].index("--precision") + 1] == "bf16"


def test_neighbour_share_counts_same_label_neighbours_in_the_queue():
    """Hand-computed on the unit circle: label 0 at 0, 12, 20 degrees, label 1 at 30, 90, 102, 110 degrees."""
    from tools.pilot_eval import neighbour_share
    deg = torch.tensor([0.0, 12, 20, 30, 90, 102, 110]) * torch.pi / 180
    x, y = torch.stack([deg.cos(), deg.sin()], 1), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # the whole set as the queue; k = 1: every nearest shares the label but 30's (20, label 0)
    assert neighbour_share(x, y, queue=7, k=1) == pytest.approx(6 / 7)
    # k = 2: 20 reaches 12 and 30 (one of two), 30 reaches 20 and 12 (none), every other row its own label twice
    assert neighbour_share(x, y, queue=7, k=2) == pytest.approx(5.5 / 7)


def test_committed_encoders_load_with_their_stored_architecture():
    """The demo's MAE and the 12-block MAEs of BENCHMARKS.md load strictly, with the shapes their commands made."""
    tiny, deep, long = (model.load_encoder(os.path.join(ROOT, "checkpoints", f"mae_{f}_digits.pth"))
                        for f in ("tiny", "d12", "d12_long"))
    assert (tiny.dim, tiny.depth, tiny.heads, tiny.patch, tiny.img_size) == (128, 6, 2, 4, 32)
    for vit in (deep, long):
        assert (vit.dim, vit.depth, vit.heads, vit.patch, vit.img_size) == (128, 12, 4, 4, 32)
    # a file written on a GPU holds host tensors: a plain torch.load works on a machine without one
    ck = torch.load(os.path.join(ROOT, "checkpoints", "mae_d12_long_digits.pth"), weights_only=True)
    assert ck["settings"]["device"] == "cuda" and all(v.device.type == "cpu" for v in ck["model"].values())


def test_pilot_eval_summary_is_the_mean_and_sample_sd_per_block():
    """Two seeds' scores by hand: k-NN 50 and 70 -> 60.0 ± 14.1 (sample SD, 20 / sqrt 2); one seed prints bare."""
    from tools.pilot_eval import summary
    one, two = {1: (0.5, 0.8), 2: (0.25, 0.5)}, {1: (0.7, 0.8), 2: (0.25, 0.75)}
    assert summary([one]) == "b1: 50.0 / 80.0  b2: 25.0 / 50.0"
    assert summary([one, two]) == "b1: 60.0 ± 14.1 / 80.0 ± 0.0  b2: 25.0 ± 0.0 / 62.5 ± 17.7"


def test_pilot_eval_refuses_encoders_of_different_depth_before_scoring(monkeypatch):
    """A mean over blocks of different encoders would be meaningless: one line, before any feature is extracted."""
    from tools import pilot_eval
    monkeypatch.setattr(sys, "argv", ["pilot_eval.py", *(os.path.join(ROOT, "checkpoints", f"mae_{f}_digits.pth")
                                                           for f in ("tiny", "d12"))])
    monkeypatch.setattr(pilot_eval, "extract_features", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(SystemExit, match="differ in depth"):
        pilot_eval.main()
