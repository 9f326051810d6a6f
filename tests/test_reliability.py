"""Kill -9, SIGTERM and restart equal an uninterrupted run; one run per --out; failures cost no good checkpoint.

A second run on the same --out is refused while the first finishes unchanged; bad output paths and non-finite losses
never cost a good checkpoint (docs/RUNNING.md, "Resuming and failures")."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_checkpoint, make_image_folder, read_log

from util.resume import PAUSE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 48-image ImageFolder of 16 px images: start-up costs nothing next to jittered-digits."""
    return Path(make_image_folder(tmp_path_factory.mktemp("imgs"), classes=("a", "b"), per_class=(24, 4), size=16))


def pretrain_cmd(folder, out, *extra):
    return [sys.executable, "pretrain.py", "--data", str(folder), "--out", str(out), "--img-size", "16",
            "--patch", "4", "--dim", "32", "--depth", "2", "--dec-dim", "32", "--dec-depth", "1",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--save-every", "2",
            "--log-every", "1", "--device", "cpu", *extra]


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def paused(cmd, out: Path, step: int, **popen):
    """Start cmd with util/resume.py's test pause in its `step`-th step; returns once it waits there.

    Returns the process (its stderr in the file p.err, which no reader has to drain) and the file whose removal lets it
    run on."""
    ready, err = out.with_name(out.name + ".ready"), out.with_name(out.name + ".err")
    with open(err, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, PAUSE: f"{step}:{ready}"}, stdout=subprocess.DEVNULL,
                             stderr=f, **popen)
    p.err, deadline = err, time.monotonic() + 300  # how long it takes to get there does not matter
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        p.kill()
        pytest.fail(f"the run did not reach step {step} (exit code {p.wait()}):\n{err.read_text()}")
    return p, ready


def signal_at_step(cmd, out: Path, step: int, worker=False, sig=signal.SIGKILL, group=False):
    """Start cmd, send it `sig` while it waits in its `step`-th step; returns cmd's exit code and stderr, after it ends.

    With worker=True the signal goes to its child (the rank under torchrun); with group=True to every process of it, as
    SLURM does. A signal stops it after that step."""
    p, _ = paused(cmd, out, step, start_new_session=group)
    pids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split() if worker else [p.pid]
    for pid in pids:
        os.killpg(int(pid), sig) if group else os.kill(int(pid), sig)
    return p.wait(timeout=300), p.err.read_text()


@pytest.fixture(scope="module")
def whole_pretrain(folder, tmp_path_factory):
    """The uninterrupted pretrain.py run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("whole")
    done = run(pretrain_cmd(folder, out))
    assert done.returncode == 0, done.stderr
    return torch.load(out / "last.pt", weights_only=True)


def assert_same_as_whole(whole, out: Path, steps=12):
    ck = torch.load(out / "last.pt", weights_only=True)
    assert whole["step"] == ck["step"] == steps
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], ck["model"][k]), k
    logged = [r["step"] for r in read_log(out)]
    assert logged == list(range(1, steps + 1))  # the log has every step once


def test_pretrain_killed_and_restarted_equals_uninterrupted(folder, whole_pretrain, tmp_path):
    assert signal_at_step(pretrain_cmd(folder, tmp_path / "killed"), tmp_path / "killed", step=4)[0] != 0
    assert (tmp_path / "killed" / "last.pt").exists()  # the kill came after a save, mid-training
    assert len(read_log(tmp_path / "killed")) == 3  # and after a step logged past that save (step 2)
    again = run(pretrain_cmd(folder, tmp_path / "killed"))
    assert again.returncode == 0, again.stderr
    assert "has ended; taking it over" in again.stderr  # the lock the killed run left
    assert_same_as_whole(whole_pretrain, tmp_path / "killed")


def test_pretrain_sigterm_mid_run_then_resume_equals_uninterrupted(folder, whole_pretrain, tmp_path):
    """SIGTERM (SLURM before a preemption): the step finishes, last.pt is written, exit code 3 with a message.

    --save-every is far; the same command then ends bit-identical to an uninterrupted run."""
    out, cmd = tmp_path / "run", pretrain_cmd(folder, tmp_path / "run", "--save-every", "100")
    code, err = signal_at_step(cmd, out, step=3, sig=signal.SIGTERM)
    stopped = torch.load(out / "last.pt", weights_only=True)["step"]
    assert code == 3 and f"stopped after step {stopped} by SIGTERM" in err and stopped == 3, err
    assert not (out / "run.lock").exists()
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert_same_as_whole(whole_pretrain, out)


def test_second_writer_refused_while_the_first_finishes_unchanged(folder, whole_pretrain, tmp_path, monkeypatch,
                                                                    capsys):
    import pretrain
    from util import common
    out = tmp_path / "run"
    first, ready = paused(pretrain_cmd(folder, out), out, step=3)  # holding the lock until `ready` is removed
    monkeypatch.setattr(sys, "argv", pretrain_cmd(folder, out)[1:])
    with pytest.raises(SystemExit) as e:
        common.cli(pretrain.main, pretrain.Settings)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {out} is in use by process {first.pid} on {socket.gethostname()}")
    os.remove(ready)
    assert first.wait(timeout=300) == 0, first.err.read_text()
    assert_same_as_whole(whole_pretrain, out)
    assert not (out / "run.lock").exists()


def test_pretrain_non_finite_weights_never_overwrite_a_good_checkpoint(folder, tmp_path):
    import model
    import pretrain
    from util import common
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


@pytest.fixture(scope="module")
def whole_refine(folder, tmp_path_factory):
    """(a tiny encoder's path, last.pt of the uninterrupted refine.py run from it the interrupted ones must equal)."""
    d = tmp_path_factory.mktemp("refine")
    make_checkpoint(d / "mae.pth", depth=2, img_size=16)
    done = run(refine_cmd(d / "mae.pth", folder, d / "whole"))
    assert done.returncode == 0, done.stderr
    return d / "mae.pth", torch.load(d / "whole" / "last.pt", weights_only=True)


def test_refine_rank_killed_and_restarted_by_torchrun_equals_uninterrupted(folder, whole_refine, tmp_path):
    """SIGKILL the rank of `torchrun --max-restarts 1`: torchrun starts it again, it resumes from last.pt.

    The end is bit-identical to an uninterrupted plain run."""
    ckpt, a = whole_refine
    killed = tmp_path / "killed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "--max-restarts=1"] + refine_cmd(ckpt, folder, killed)[1:]
    assert signal_at_step(torchrun, killed, step=10, worker=True)[0] == 0  # last.pt: step 8; logged: 9
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12  # 6 steps of heads only, then 6 of everything: killed in phase 2
    for part in ("encoder", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    steps = [r["step"] for r in read_log(killed)]
    assert steps == list(range(1, 13))  # lines logged after the last save are dropped on restart


def test_refine_sigterm_to_every_process_with_loader_workers(folder, whole_refine, tmp_path):
    """SIGTERM to every process of the run, loader workers too (as SLURM signals a job): nothing is lost.

    The workers live on, the step finishes, last.pt is written, exit code 3; the rerun equals an uninterrupted run."""
    ckpt, a = whole_refine
    out = tmp_path / "run"
    cmd = refine_cmd(ckpt, folder, out) + ["--workers", "2", "--save-every", "100"]
    code, err = signal_at_step(cmd, out, step=3, sig=signal.SIGTERM, group=True)
    assert code == 3 and "stopped after step 3 by SIGTERM" in err and "Traceback" not in err, err
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for part in ("encoder", "ema", "heads"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
