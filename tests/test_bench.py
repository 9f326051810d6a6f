"""bench.py on microscopic sizes: the JSON layout, the agreement checks and what the refinement benchmark runs.

Never the speed."""
import json
import math

import bench  # tools/bench.py: conftest puts tools/ on the path
import pytest

import model
import refine


def test_tiny_harness_writes_ratios_and_agrees(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(bench.Settings(tiny=True, device="cpu", out=str(out), only="vit,knn,kmeans"))
    saved = json.loads(out.read_text())
    assert set(saved) == {"ratios", "details"} and saved["ratios"] == res["ratios"]
    assert set(saved["ratios"]) == {"vit_vs_timm", "knn_vs_sklearn", "kmeans_vs_sklearn"}
    assert all(r > 0 for r in saved["ratios"].values())
    d = saved["details"]
    assert {"machine", "wall_s", "vit_vs_timm", "knn_vs_sklearn", "kmeans_vs_sklearn"} == set(d)
    for r in [*d["vit_vs_timm"], d["knn_vs_sklearn"], d["kmeans_vs_sklearn"]]:
        assert r["ours_s"] > 0 and r["theirs_s"] > 0 and r["rounds"] >= 2 and r["setting"]
    assert d["vit_vs_timm"][0]["max_abs_diff_fp32"] < 1e-4  # same weights, same function as timm
    assert d["knn_vs_sklearn"]["prediction_agreement"] == 1.0  # same vote weights as scikit-learn
    assert d["knn_vs_sklearn"]["neighbour_set_overlap"] == 1.0
    assert d["kmeans_vs_sklearn"]["inertia_same_start_rel_diff"] <= 1e-4  # same start: same Lloyd steps


def test_refine_benchmark_times_refine_py_s_own_step(monkeypatch):
    calls = []

    def counted(net, optim, parts, views, idx, phase, *args, **kwargs):
        calls.append((phase.name, [tuple(v.shape) for v in views]))
        return step(net, optim, parts, views, idx, phase, *args, **kwargs)

    step = refine.refine_step
    monkeypatch.setattr(refine, "refine_step", counted)
    runs = bench.main(bench.Settings(tiny=True, device="cpu", only="refine"))["details"]["refine_step"]["runs"]
    assert [r["grad_checkpointing"] for r in runs] == [True, False]
    assert len(calls) == 2 * (1 + 2)  # per run one warm-up step and two timed ones
    # phase 2 (encoder and heads), 2 global views of 16 px and 10 local of 8 px (the recipe's 96/224, patch 8)
    assert calls[0] == ("refine", [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 10)
    for r in runs:
        assert r["step"].startswith("refine.refine_step") and r["views"] == "2x16 + 10x8"
        assert r["img_s"] > 0 and r["step_s"] > 0 and math.isfinite(r["loss"]) and r["peak_rss_gib_process"] > 0
        assert r["tokens_per_image"] == 2 * (1 + 4) + 10 * (1 + 1)  # patch 8


@pytest.mark.parametrize("bad", [dict(only="nope"), dict(only="refine", presets="huge"),
                                 dict(only="refine", refine_ckpt="maybe"), dict(only="refine", compile="all")])
def test_bad_flags_are_user_errors(bad):
    with pytest.raises(model.UserError):
        bench.main(bench.Settings(tiny=True, device="cpu", **bad))


def test_loader_benchmark_reports_both_sides_and_the_device_share():
    r = bench.main(bench.Settings(tiny=True, device="cpu", only="loader"))["details"]["refine_loader"]
    assert r["before_img_s_per_worker"] > 0 and r["after_img_s_per_worker"] > 0
    assert r["ratio"] == r["after_img_s_per_worker"] / r["before_img_s_per_worker"]
    assert r["device_augment_ms_per_batch"] > 0 and r["views"] == "2x224 + 10x96 (BYOL)"
