"""util/resume.py: one writer per --out, signals caught until the step ends, a good checkpoint always kept.

last.pt kept beside the previous good checkpoint and the fall back to it, no empty folder left by a failed run
(docs/RUNNING.md, "Resuming and failures")."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from model import UserError
from util import common, resume

ONE = common.Dist(0, 1, torch.device("cpu"))


def write_lock(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "since": "earlier", **holder}))


def holder(out):
    return json.loads((out / "run.lock").read_text())


def test_live_holder_refused_dead_one_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)  # lives on
    try:
        write_lock(out, pid=live.pid, start=resume._process(live.pid)[1])
        refusal = resume.take_lock(str(out))
        assert f"in use by process {live.pid} on {socket.gethostname()}" in refusal and "\n" not in refusal
        assert holder(out)["pid"] == live.pid  # untouched
    finally:
        live.kill()
        live.wait()
    assert resume.take_lock(str(out)) == ""  # the holder has ended: taken over, with a message
    assert f"left by process {live.pid}" in capsys.readouterr().err
    assert holder(out)["pid"] == os.getpid()
    write_lock(out, pid=os.getppid(), start="1")  # a live pid, but another process's start time: reused
    assert resume.take_lock(str(out)) == "" and holder(out)["pid"] == os.getpid()
    resume.release_lock(str(out))
    assert not (out / "run.lock").exists()


def test_other_host_refused_requeued_or_restarted_job_takes_its_own(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    write_lock(out, host="elsewhere", pid=123, job="77", restart=[0, 0])
    assert "in use by process 123 on elsewhere" in resume.take_lock(str(out))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert "in use" in resume.take_lock(str(out))  # the same start of the job: maybe a second run in it
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued: its earlier start is over
    assert resume.take_lock(str(out)) == "" and holder(out)["restart"] == [1, 0]
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    write_lock(out, host="elsewhere", pid=123, job="rdzv", restart=[0, 0])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted its workers, rank 0 elsewhere
    assert resume.take_lock(str(out)) == "" and holder(out)["job"] == "rdzv"


def opened(out, fail=False, then=None):
    with resume.Run(str(out), ONE) as run:
        if then:
            then(run)
        if fail:
            raise UserError("something later went wrong")
    return run


def test_run_lifecycle_lock_signals_and_no_empty_folder(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(UserError):
        opened(out, fail=True)
    assert not (tmp_path / "a").exists()  # a failed run leaves none of the folders it made
    before = signal.getsignal(signal.SIGINT)
    seen = []
    opened(out, then=lambda run: seen.append((holder(out)["pid"], signal.getsignal(signal.SIGTERM))))
    assert seen[0][0] == os.getpid() and seen[0][1] != signal.SIG_DFL
    assert os.listdir(out) == [] and signal.getsignal(signal.SIGINT) is before  # lock gone, handlers back
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        opened(tmp_path / "file")


def test_signal_is_gathered_and_stops_after_the_checkpoint(tmp_path):
    def body(run):
        assert run.gather_loss(torch.tensor(2.5)) == (2.5, False)
        signal.raise_signal(signal.SIGUSR1)
        assert run.gather_loss(torch.tensor(1.5)) == (1.5, True)
        run.stop_if(False, 1)  # nothing
        run.save({"step": 2})
        run.stop_if(True, 2)
    with pytest.raises(SystemExit) as e:
        opened(tmp_path / "run", then=body)
    assert e.value.code == resume.PREEMPTED == 3
    assert torch.load(tmp_path / "run" / "last.pt")["step"] == 2 and not (tmp_path / "run" / "run.lock").exists()


def test_test_pause_waits_for_a_signal_or_its_files_removal(tmp_path, monkeypatch):
    """The tests' pause (resume.PAUSE): the Nth step writes the file and waits.

    A signal then stops the run after that step, the file's removal lets it run on; a pause whose file exists (a
    restarted rank's) is skipped."""
    def once_ready(ready, act):  # another thread: the main one is waiting in the pause
        def go():
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            act()
        threading.Thread(target=go, daemon=True).start()

    def steps(run, ready, act, expected):
        monkeypatch.setenv(resume.PAUSE, f"2:{ready}")
        if act:
            once_ready(ready, act)
        assert run.gather_loss(torch.tensor(1.0)) == (1.0, False)  # step 1: no pause
        assert run.gather_loss(torch.tensor(2.0)) == (2.0, expected)
    opened(tmp_path / "a", then=lambda run: steps(run, tmp_path / "a.ready",
                                                  lambda: os.kill(os.getpid(), signal.SIGUSR1), True))
    opened(tmp_path / "b", then=lambda run: steps(run, tmp_path / "a.ready", None, False))  # exists: no pause
    opened(tmp_path / "c", then=lambda run: steps(run, tmp_path / "c.ready", (tmp_path / "c.ready").unlink, False))
    assert not (tmp_path / "c.ready").exists()


def test_previous_checkpoint_kept_and_used_when_last_is_bad(tmp_path, capsys):
    out, ok = tmp_path / "run", lambda ck, path: None
    runs = []
    opened(out, then=lambda run: [run.save({"step": s}) for s in (1, 2)])
    assert torch.load(out / "last.pt")["step"] == 2 and torch.load(out / "last.prev.pt")["step"] == 1
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:100])  # cut short
    opened(out, then=lambda run: runs.append(run.resume(ok)) or run.save({"step": 3}))
    assert runs[0]["step"] == 1
    err = capsys.readouterr().err
    assert "last.pt' is not a readable weights-only run checkpoint" in err and "resuming from" in err
    assert err.count("\n") == 1
    assert len((out / "last.bad.pt").read_bytes()) == 100  # kept for a look, not deleted
    assert [torch.load(out / f)["step"] for f in ("last.pt", "last.prev.pt")] == [3, 1]
    os.remove(out / "last.pt")  # a save cut between its two renames
    opened(out, then=lambda run: runs.append(run.resume(ok)))
    assert runs[1]["step"] == 1 and "last.pt is missing" in capsys.readouterr().err

    def other(ck, path):
        raise UserError(f"{path} was written with other settings")
    with pytest.raises(UserError, match="last.prev.pt was written with other settings"):
        opened(out, then=lambda run: run.resume(other))  # settings, not damage: that message
    (out / "last.prev.pt").write_bytes(b"garbage")
    (out / "last.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable checkpoint in .*last.pt.*last.prev.pt.*move the files away"):
        opened(out, then=lambda run: run.resume(ok))
    assert (out / "last.pt").read_bytes() == b"garbage"  # nothing deleted


def test_same_data_written_another_way_or_moved(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    ck = {"settings": {"data": str(tmp_path / "x") + "/"}, "n_train": 40}
    assert resume.data_of(ck, str(tmp_path / "x"), 40) == str(tmp_path / "x")  # ./x/ is x
    assert capsys.readouterr().err == ""
    assert resume.data_of(ck, str(tmp_path / "y"), 40) == str(tmp_path / "y")  # moved: a warning
    assert "taken as the same folder, moved" in capsys.readouterr().err
    assert resume.data_of(ck, str(tmp_path / "y"), 39) == ck["settings"]["data"]  # other data: a difference
    assert resume.data_of({"settings": {"data": "jittered-digits"}}, "x", 40) == "jittered-digits"


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    common.save_atomic({"step": 1}, str(tmp_path / "last.pt"))

    def full_disk(obj, f):
        open(f, "wb").write(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write .*last.pt \(PytorchStreamWriter.*free some disk space"):
        common.save_atomic({"step": 2}, str(tmp_path / "last.pt"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"] and torch.load(tmp_path / "last.pt") == {"step": 1}
