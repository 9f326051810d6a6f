"""The files of a training run in its --out folder (docs/RUNNING.md, "Resuming and failures").

- `Run`: the folder of one run: created, locked by rank 0 (run.lock), signals caught; `resume` and `save` keep a
  good checkpoint there: last.pt, the one before as last.prev.pt (an unusable one as last.bad.pt).
- `write_encoder`: encoder.pth and encoder.safetensors, the same keys, the architecture stored in both.
- atomic writes, the log trimmed to the checkpoint, every random generator's state.
Importing it has no side effects."""
import json
import os
import random
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import model
from model import UserError
from util.common import save_atomic, write_tmp

PREEMPTED = 3  # the exit code of a run stopped by a signal after writing its checkpoint: rerun to resume
LOCK = "run.lock"
PAUSE = "REFINE_TEST_PAUSE"  # test-only, N:PATH: see Run._pause (tests signal a run at a known step)


def warn(message: str):
    """One line on stderr, from rank 0 only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _process(pid: int):
    """(state, start time) of a process, from /proc; None if there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]  # fields 3 and 22 of proc(5)
    except (OSError, IndexError):
        return None


def _job() -> tuple:
    """(SLURM job or torchrun run, [requeues, restarts]): a later start knows the earlier ended, on whichever host."""
    env = os.environ.get
    return (env("SLURM_JOB_ID") or env("TORCHELASTIC_RUN_ID"),
            [int(env("SLURM_RESTART_COUNT", 0)), int(env("TORCHELASTIC_RESTART_COUNT", 0))])


def _ended(holder: dict) -> str:
    """Why the holder of a lock has surely ended ('' if it may be alive)."""
    job, restart = _job()
    if job and holder.get("job") == job and list(holder.get("restart") or [0, 0]) < restart:
        return f"an earlier start of job {job}, since requeued or restarted"
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return ""  # another machine: no way to tell
    proc = _process(pid)
    if proc is None:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "which has ended"
        except OSError:  # alive, another user's
            pass
        return ""
    return "which has ended" if proc[0] in "ZX" or (holder.get("start") and proc[1] != holder["start"]) else ""


def read_lock(path: str):
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def take_lock(out: str) -> str:
    """Create OUT/run.lock naming this process: '' when taken, else the one-line refusal."""
    path = os.path.join(out, LOCK)
    me = dict(host=socket.gethostname(), pid=os.getpid(), start=(_process(os.getpid()) or ("", ""))[1],
              since=time.strftime("%Y-%m-%d %H:%M:%S"), job=_job()[0], restart=_job()[1])
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            ours = holder and (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"])  # an earlier main()
            why = "" if ours or not holder else _ended(holder)
            if not (ours or why):
                who = (f"process {holder['pid']} on {holder['host']} (since {holder.get('since')})" if holder
                       else "a process that is writing the lock")
                return (f"{out} is in use by {who}: one run per --out; wait for it to end or give another --out "
                        f"(if that run is gone, delete {path})")
            if read_lock(path) == holder:  # unchanged since read: no one else has taken it over meanwhile
                os.remove(path)
                if why:
                    warn(f"{path} was left by process {holder['pid']} on {holder['host']}, {why}; taking it over")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return ""
    return f"cannot take {path}: other runs keep taking it; one run per --out"


def release_lock(out: str):
    path = os.path.join(out, LOCK)
    if (read_lock(path) or {}).get("pid") == os.getpid():
        os.remove(path)


class Signals:
    """SIGTERM, SIGUSR1 and SIGINT set `.signal` (the first one's name) until `restore()`.

    A second Ctrl-C a second later interrupts at once (torchrun's forwarded copies of one signal arrive together)."""

    def __init__(self, loud: bool):
        self.signal, self.since, self.loud, self.old = None, 0.0, loud, {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._on) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def _on(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.since = name, time.monotonic()
            if self.loud:  # os.write: a print here could re-enter a write to stderr
                os.write(2, f"\n{name}: stopping after this step, once the checkpoint is written\n".encode())
        elif name == "SIGINT" and time.monotonic() - self.since > 1:
            raise KeyboardInterrupt

    def restore(self):
        for s, old in self.old.items():
            signal.signal(s, old)


def write_encoder(sd: dict, out: str) -> str:
    """OUT/encoder.pth and OUT/encoder.safetensors: the same tensors, the architecture stored in both.

    encoder.pth: model.export_encoder's (timm loads it strictly; the architecture in `_metadata`); .safetensors:
    JSON."""
    from safetensors.torch import save_file
    path, arch = os.path.join(out, "encoder.pth"), getattr(sd, "_metadata", {}).get("", {}).get("arch")
    save_atomic(sd, path)
    save_atomic({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "encoder.safetensors"),
                lambda obj, tmp: save_file(obj, tmp, metadata={"format": "pt", "arch": json.dumps(arch)}))
    return path


def trim_log(path: str, step: int):
    """Keep the log lines up to `step` (step 0: none); a killed run may have logged past its checkpoint."""
    def before(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError):  # a line torn by the kill
            return False
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if before(line)]
        with open(path, "w") as f:
            f.writelines(keep)


def rng_state() -> dict:
    """Every random generator a run draws from, as tensors and plain values (weights_only-safe)."""
    _, keys, pos, gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    keys, pos, gauss, cached = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, gauss, cached))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(world: int) -> list:
    """Every rank's generator states, in rank order (a collective: every rank takes part)."""
    states = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, states[0])  # fills the list in rank order
    return states


def data_of(ck: dict, new: str, n_new: int):
    """The --data of a checkpoint's settings, as a resumed run compares it: `new` when that names the same data.

    Also as the same folder written another way (./x/, x) or as a moved folder (as many images: with a warning)."""
    old, n_old = ck["settings"].get("data"), ck.get("n_train")
    if old == new or old is None or any(s.startswith("jittered-digits") for s in (old, new)):
        return old
    if os.path.realpath(old) != os.path.realpath(new):
        if n_old not in (None, n_new):
            return old
        warn(f"--data {new} is not {old}, the checkpoint's: taken as the same folder, moved ({n_new} images)")
    return new


class Run:
    """The --out folder of a training run: `with Run(out, d) as run:`, on every rank after setup_distributed.

    Rank 0 creates it and takes its lock, every rank catches SIGTERM/SIGUSR1/SIGINT until the run is closed."""

    def __init__(self, out: str, d):
        self.out, self.d, self.created, self.last_bad, self.steps = out, d, None, False, 0
        self.last, self.prev, self.bad = (os.path.join(out, f) for f in ("last.pt", "last.prev.pt", "last.bad.pt"))
        error = self._open() if d.main else ""
        if d.world > 1:  # every rank stops with rank 0's error
            box = [error]
            dist.broadcast_object_list(box, 0)
            error = box[0]
        if error:
            raise UserError(error)
        self.signals = Signals(loud=d.main)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """However the run ends: signal handlers restored, lock released, a folder it made and left empty removed."""
        self.close(failed=kind is not None)

    def _open(self) -> str:
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            return f"--out {self.out!r} is a file; give a folder for last.pt, encoder.pth and log.jsonl"
        top = os.path.abspath(self.out)
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        self.created = None if os.path.exists(top) else top  # the highest folder this run makes
        os.makedirs(self.out, exist_ok=True)
        return take_lock(self.out)

    def gather_loss(self, loss: torch.Tensor) -> tuple:
        """The step's loss averaged over the ranks, and whether any rank has had a signal.

        One collective, one host sync, once per step on every rank, so that all ranks stop after the same step."""
        self.steps += 1
        self._pause()
        x = torch.stack([loss.detach().float(), loss.new_tensor(float(self.signals.signal is not None))])
        if self.d.world > 1:
            parts = [torch.empty_like(x) for _ in range(self.d.world)]
            dist.all_gather(parts, x)
            x = torch.stack(parts)  # (W, 2)
        losses, stop = x.reshape(-1, 2).unbind(1)
        return losses.mean().item(), bool(stop.max().item())

    def _pause(self):
        """Test-only (PAUSE=N:PATH): rank 0's Nth step in this process writes PATH (unless it exists) and waits.

        A restarted rank finds PATH and runs on. Waits 120 s at most for a signal (stop after it) or PATH's removal."""
        n, _, path = os.environ.get(PAUSE, "").partition(":")
        if not (self.d.main and n == str(self.steps) and path) or os.path.exists(path):
            return
        open(path, "w").close()
        deadline = time.monotonic() + 120  # a broken test fails rather than hangs
        while self.signals.signal is None and os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{PAUSE}: no signal and {path} still there after 120 s")
            time.sleep(0.01)

    def stop_if(self, stopping: bool, step: int):
        """After the checkpoint of a step with a signal: every rank exits with PREEMPTED."""
        if not stopping:
            return
        if self.d.world > 1:
            dist.barrier()  # rank 0 has written last.pt
        if self.d.main:
            print(f"stopped after step {step} by {self.signals.signal or 'a signal to another rank'}: {self.last} "
                  f"is written; rerun the same command to resume (exit code {PREEMPTED})", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED)

    def resume(self, check):
        """The checkpoint to resume from: last.pt, else last.prev.pt (with a warning); None for a fresh run.

        check(ck, path) raises UserError if this run cannot resume from ck (another model, other settings)."""
        reasons, refusals = [], []
        for path in (self.last, self.prev):
            if not os.path.isfile(path):
                continue
            try:
                ck = model.read_checkpoint(path, "run checkpoint", "it was cut short or damaged")
            except UserError as e:
                reasons.append(str(e))
                continue
            try:
                check(ck, path)
            except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:  # read, but not resumable
                refusals.append(e if isinstance(e, UserError) else
                                UserError(f"{path} is no run checkpoint of this script ({type(e).__name__}: {e})"))
                reasons.append(str(refusals[-1]))
                continue
            self.last_bad = path != self.last and os.path.isfile(self.last)
            if path != self.last:
                warn(f"{'; '.join(reasons) or f'{self.last} is missing'}; resuming from {path} (step {ck.get('step')})"
                     + (f"; {self.last} will be kept as {self.bad}" if self.last_bad else ""))
            return ck
        if refusals and len(refusals) == len(reasons):
            raise refusals[0]  # e.g. other settings: its message names them and the fix
        if reasons:
            raise UserError(f"no usable checkpoint in {self.out}: {'; '.join(reasons)}; move the files away to "
                            f"start afresh, or give another --out")
        return None

    def save(self, obj):
        """Rank 0: write last.pt atomically; the file it replaces is kept as last.prev.pt (last.bad.pt if unusable)."""
        tmp = write_tmp(obj, self.last)
        if os.path.exists(self.last):
            os.replace(self.last, self.bad if self.last_bad else self.prev)
        os.replace(tmp, self.last)
        self.last_bad = False

    def close(self, failed: bool):
        self.signals.restore()
        if self.d.main:
            release_lock(self.out)
        folder = os.path.abspath(self.out)
        while failed and self.created and not os.listdir(folder):  # a failed run leaves no empty folder
            os.rmdir(folder)
            if folder == self.created:
                break
            folder = os.path.dirname(folder)
