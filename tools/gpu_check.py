"""One command for a lent GPU: the figures the README promises, measured in minutes, in one JSON.

Three parts, each its own process (one that fails leaves the others' figures), in this order:
- tests: the device tests, `pytest tests/test_photometric.py` (the batched colour pipeline against
  torchvision's, and on CUDA the check that it never waits for the host); passed / failed / skipped.
- bench: `tools/bench.py --only loader,refine` (refine.py's step: images/s, peak memory, MFU and the
  largest ViT-L batch; the loader against the step); its whole JSON.
- refine: a short `refine.py` run of the committed MAE on 2048 embedded digits, the heads' warm-up and
  into phase 2 (bf16 autocast, which refine.py turns on by itself on CUDA; float32 on a CPU): steps,
  phases, wall time, images/s, first and last loss, all finite or not.
OUT/gpu_check.json holds all three, with the machine, the commands and each part's exit code and
seconds; the exit code is 0 when every part succeeded, else 1. `--device cpu` runs every part at its
smallest size (bench --tiny, a 4-step refine.py on 64 images): the test suite runs it that way.

    python tools/gpu_check.py --device cuda --out runs/gpu_check      # a few minutes on one GPU
    python tools/gpu_check.py --device cpu --out /tmp/gpu_check       # about 20 s, the plumbing only
"""
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository
from model import UserError  # noqa: E402
from util.common import cli, opt, write_json  # noqa: E402

TESTS = ["tests/test_photometric.py"]  # the device's share of the suite: its CUDA test runs only there


@dataclass
class Settings:
    device: str = opt("cuda", "cuda (the lent GPU) or cpu (every part at its smallest size)")
    out: str = opt("runs/gpu_check", "folder for gpu_check.json and the parts' own files")
    refine_steps: int = opt(60, "refine.py steps on CUDA (the heads' warm-up and into phase 2); 4 on a CPU")
    timeout: int = opt(1200, "seconds each part may take before it is stopped and reported as failed")


def run_part(name: str, cmd: list, timeout: int) -> dict:
    """Run one part in the repository; its command, exit code (124 when stopped at the timeout) and seconds."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return dict(command=" ".join(cmd), returncode=rc, seconds=round(time.perf_counter() - t0, 1))


def test_counts(xml_path: str) -> dict:
    """passed / failed / errors / skipped from pytest's JUnit XML (absent: all zero)."""
    if not os.path.exists(xml_path):
        return dict(passed=0, failed=0, errors=0, skipped=0)
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                errors=n["errors"], skipped=n["skipped"])


def refine_figures(log_path: str) -> dict:
    """Steps, images/s (the run's average at its last step) and losses from refine.py's log.jsonl."""
    if not os.path.exists(log_path):
        return dict(steps=0)
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    losses = [r["loss"] for r in log]
    return dict(steps=log[-1]["step"], images_per_s=log[-1]["images_per_s"], first_loss=losses[0],
                last_loss=losses[-1], losses_finite=all(map(math.isfinite, losses)),
                phases=sorted({r["phase"] for r in log}))


def main(cfg: Settings) -> dict:
    if cfg.device not in ("cuda", "cpu"):
        raise UserError(f"unknown --device {cfg.device!r}; use cuda or cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu to check the plumbing")
    if cfg.refine_steps < 1:
        raise UserError(f"--refine-steps {cfg.refine_steps}: give 1 or more")
    out, gpu, py = os.path.abspath(cfg.out), cfg.device == "cuda", sys.executable
    os.makedirs(out, exist_ok=True)
    res = {"device": cfg.device, "machine": dict(python=platform.python_version(), torch=torch.__version__,
                                                 cpu_count=os.cpu_count())}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        res["machine"].update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2 ** 30, 1),
                              cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    xml = os.path.join(out, "tests.xml")
    res["tests"] = run_part("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                                      *TESTS], cfg.timeout)
    res["tests"].update(test_counts(xml))
    bench_json = os.path.join(out, "bench.json")
    res["bench"] = run_part("bench", [py, "tools/bench.py", "--device", cfg.device, "--only", "loader,refine",
                                      "--out", bench_json, *([] if gpu else ["--tiny"])], cfg.timeout)
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            res["bench"].update(json.load(f))
    run_dir = os.path.join(out, "refine")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not one resumed from an earlier check's last.pt
    # CUDA: 2048 images, 16 steps an epoch at the recipe's batch 128, so the run reaches phase 2
    small = ["--limit-train", "2048"] if gpu else ["--limit-train", "64", "--batch-size", "16", "--local-crops",
                                                   "1", "--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden",
                                                   "32", "--workers", "0"]
    steps = cfg.refine_steps if gpu else 4
    res["refine"] = run_part("refine", [py, "refine.py", "--device", cfg.device, "--out", run_dir, "--max-steps",
                                        str(steps), "--log-every", "1", *small], cfg.timeout)
    res["refine"].update(precision="bf16 autocast" if gpu else "float32",
                         **refine_figures(os.path.join(run_dir, "log.jsonl")))
    res["ok"] = all(res[k]["returncode"] == 0 for k in ("tests", "bench", "refine"))
    write_json(os.path.join(out, "gpu_check.json"), res)
    print(f"{'all parts passed' if res['ok'] else 'a part FAILED'}: {os.path.join(out, 'gpu_check.json')}")
    return res


if __name__ == "__main__":
    cli(lambda cfg: main(cfg)["ok"] or sys.exit(1), Settings)
