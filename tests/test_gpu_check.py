"""tools/gpu_check.py: the whole check at its smallest size on the CPU.

Its JSON's parts and figures, a part that fails, and bad flags."""
import json
import math
import subprocess
import sys

import gpu_check  # tools/gpu_check.py: conftest puts tools/ on the path
import pytest
import torch
from conftest import ROOT


def test_cpu_run_writes_every_part_with_its_figures(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert set(res) == {"device", "machine", "tests", "bench", "refine", "ok"} and res["ok"] is True
    assert res["device"] == "cpu" and res["machine"]["cpu_count"] >= 1 and "gpu" not in res["machine"]
    assert all(res[p]["returncode"] == 0 and res[p]["seconds"] > 0 for p in ("tests", "bench", "refine"))
    assert "--tiny" in res["bench"]["command"]  # every part at its smallest size
    t = res["tests"]
    assert t["passed"] >= 20 and t["failed"] == t["errors"] == 0 and "test_photometric.py" in t["command"]
    assert t["skipped"] == (0 if torch.cuda.is_available() else 1)  # the host-sync check needs CUDA
    d = res["bench"]["details"]
    assert {"machine", "refine_loader", "refine_step"} <= set(d) and "--only loader,refine" in res["bench"]["command"]
    assert d["refine_loader"]["after_img_s_per_worker"] > 0
    assert all(r["img_s"] > 0 and math.isfinite(r["loss"]) for r in d["refine_step"]["runs"])
    r = res["refine"]
    assert (r["steps"], r["phases"], r["precision"], r["losses_finite"]) == (4, ["heads"], "float32", True)
    assert r["images_per_s"] > 0 and math.isfinite(r["first_loss"]) and r["last_loss"] != r["first_loss"]
    log = [json.loads(line) for line in open(out / "refine" / "log.jsonl")]
    assert [x["step"] for x in log] == [1, 2, 3, 4] and log[-1]["loss"] == r["last_loss"]


def test_a_failed_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    ran = []

    def fake(name, cmd, timeout):
        ran.append(name)
        return dict(command=" ".join(cmd), returncode=1 if name == "bench" else 0, seconds=0.1)

    monkeypatch.setattr(gpu_check, "run_part", fake)
    res = gpu_check.main(gpu_check.Settings(device="cpu", out=str(tmp_path)))
    assert ran == ["tests", "bench", "refine"] and res["ok"] is False
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is False
    assert (res["tests"]["passed"], res["refine"]["steps"]) == (0, 0)  # no XML, no log: nothing counted


@pytest.mark.parametrize("flags, message", [(["--device", "tpu"], "unknown --device 'tpu'"),
                                            (["--device", "cpu", "--refine-steps", "0"], "--refine-steps 0")])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), *flags], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "gpu_check.json").exists()
