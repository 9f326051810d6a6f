"""Kill -9 and restart equals an uninterrupted run; bad output paths and non-finite losses never
cost a good checkpoint (README, "Resuming and failures")."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 48-image ImageFolder of 16 px images: start-up costs nothing next to jittered-digits."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (d / split / c).mkdir(parents=True)
            for i in range(24 if split == "train" else 4):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / split / c / f"{i}.png")
    return d


def pretrain_cmd(folder, out, *extra):
    return [sys.executable, "pretrain.py", "--data", str(folder), "--out", str(out), "--img-size", "16",
            "--patch", "4", "--dim", "32", "--depth", "2", "--dec-dim", "32", "--dec-depth", "1",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--save-every", "2",
            "--log-every", "1", "--device", "cpu", *extra]


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def kill_once_running(cmd, out: Path, after_step: int, worker=False):
    """Start cmd, SIGKILL it (or, worker=True, its child: the rank under torchrun) as soon as its
    log shows `after_step`; returns cmd's exit code, after it ends."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, killed = out / "log.jsonl", False
    while p.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if not killed and any(json.loads(line)["step"] >= after_step for line in lines[:-1]):
            pids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split() if worker else [p.pid]
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    assert killed, "the run ended before it could be killed"
    return p.returncode


def test_pretrain_killed_and_restarted_equals_uninterrupted(folder, tmp_path):
    whole = run(pretrain_cmd(folder, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert kill_once_running(pretrain_cmd(folder, tmp_path / "killed"), tmp_path / "killed", after_step=3) != 0
    assert (tmp_path / "killed" / "last.pt").exists()  # the kill came after a save, mid-training
    again = run(pretrain_cmd(folder, tmp_path / "killed"))
    assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the log has every step once


def test_pretrain_non_finite_weights_never_overwrite_a_good_checkpoint(folder, tmp_path):
    import common
    import model
    import pretrain
    run_in_process = lambda *extra: pretrain.main(common.parse_settings(  # noqa: E731
        pretrain.Settings, pretrain_cmd(folder, tmp_path / "run", *extra)[2:]))
    run_in_process("--max-steps", "2")
    with pytest.raises(model.UserError, match="not finite at step"):
        run_in_process("--base-lr", "1e30", "--max-steps", "6")  # resumes at step 2, then diverges
    kept = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert kept["step"] >= 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def refine_cmd(ckpt, folder, out):
    return [sys.executable, "refine.py", "--ckpt", str(ckpt), "--data", str(folder), "--out", str(out),
            "--batch-size", "8", "--head-epochs", "1", "--epochs", "1", "--save-every", "2",
            "--log-every", "1", "--device", "cpu"]


def test_refine_rank_killed_and_restarted_by_torchrun_equals_uninterrupted(folder, tmp_path):
    """SIGKILL the rank of `torchrun --max-restarts 1`: torchrun starts it again, it resumes from
    last.pt, and the end is bit-identical to an uninterrupted plain run."""
    import model
    torch.manual_seed(0)
    vit = model.ViT(dim=32, depth=2, patch=4, img_size=16)
    torch.save({"model": model.export_encoder(vit)}, tmp_path / "mae.pth")
    whole = run(refine_cmd(tmp_path / "mae.pth", folder, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "--max-restarts=1"] + refine_cmd(tmp_path / "mae.pth", folder, killed)[1:]
    assert kill_once_running(torchrun, killed, after_step=7, worker=True) == 0
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12  # 6 steps of heads only, then 6 of everything: killed in phase 2
    for part in ("encoder", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # lines logged after the last save are dropped on restart
