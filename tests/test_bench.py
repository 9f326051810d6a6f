"""bench.py on microscopic sizes: the JSON layout and the agreement checks (never the speed)."""
import json

import bench


def test_quick_harness_writes_ratios_and_agrees(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(bench.Settings(tiny=True, device="cpu", out=str(out), only="vit,knn,kmeans,refine"))
    saved = json.loads(out.read_text())
    assert set(saved) == {"ratios", "details"} and saved["ratios"] == res["ratios"]
    assert set(saved["ratios"]) == {"vit_vs_timm", "knn_vs_sklearn", "kmeans_vs_sklearn"}
    d = saved["details"]
    assert d["vit_vs_timm"][0]["max_abs_diff_fp32"] < 1e-4  # same weights, same function as timm
    assert d["knn_vs_sklearn"]["prediction_agreement"] == 1.0  # same vote weights as scikit-learn
    assert d["knn_vs_sklearn"]["neighbour_set_overlap"] == 1.0
    assert d["kmeans_vs_sklearn"]["inertia_same_start_rel_diff"] <= 1e-4  # same start: same Lloyd steps
    run = d["refine_step"]["runs"][0]
    assert run["img_s"] > 0 and run["tokens_per_image"] == 2 * (1 + 4) + 10 * (1 + 1)  # 2x16 + 10x8, patch 8


def test_unknown_part_is_a_user_error():
    import pytest

    import model
    with pytest.raises(model.UserError):
        bench.main(bench.Settings(tiny=True, device="cpu", only="nope"))
