"""One writer per output folder, and a clean stop on a signal (README, "Resuming and failures").

- `take_lock`: rank 0 of a run holds OUT/run.lock (host, process id, since when); a live holder is refused
  with one line, a dead one on this host (or an earlier start of the same SLURM job or torchrun run, since
  requeued or restarted, on any host) is taken over.
- `Signals`: SIGTERM and SIGUSR1 (SLURM's warnings before a preemption or the time limit) and SIGINT (Ctrl-C)
  only set `.signal`; the trainer finishes its step on every rank, writes last.pt and exits with PREEMPTED.
- `quiet_worker`: data-loader workers leave those signals to the main process.
Importing it has no side effects."""
import json
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

PREEMPTED = 3  # the exit code of a run stopped by a signal after writing its checkpoint: rerun to resume
LOCK = "run.lock"


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
    """(the SLURM job or torchrun run this process belongs to, [its requeues, its restarts]): a later start
    of the same job knows that the earlier one has ended, on whichever host it ran."""
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
    """SIGTERM, SIGUSR1 and SIGINT set `.signal` (the first one's name) until `restore()`; a second Ctrl-C a
    second later interrupts at once (copies of one signal, as torchrun forwards them, arrive together)."""

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


def quiet_worker(_):
    """DataLoader worker_init_fn. SIGINT and SIGUSR1 are for the main process (a terminal and SLURM send them
    to every process); SIGTERM ends a worker only when its parent sends it: from anyone else (SLURM signals
    every process of a job) it would kill the worker before the main process has written its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        def wait():
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
                pass
            os._exit(0)  # what torch's own handler does on its parent's SIGTERM
        threading.Thread(target=wait, daemon=True).start()
