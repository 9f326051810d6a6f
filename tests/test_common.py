"""The shared helpers: settings to flags, the embedded data set (docs/RUNNING.md, "The embedded data set"), files."""
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import make_images

import knn
import model
import pretrain
import refine
from util import common, data, resume
from util.data import EpochKeys, build_dataset, loader_kwargs


@dataclass
class Demo:
    batch_size: int = common.opt(64, "images per process")
    lr: float = common.opt(1e-3, "learning rate")
    compile: bool = common.opt(False, "torch.compile the model")
    ema: bool = common.opt(True, "keep an EMA copy")
    out: Optional[str] = common.opt(None, "output folder")


def test_settings_become_flags_with_help(capsys):
    cfg = common.parse_settings(Demo, ["--batch-size", "8", "--compile", "--no-ema", "--out", "d"])
    assert cfg == Demo(batch_size=8, lr=1e-3, compile=True, ema=False, out="d")
    assert common.parse_settings(Demo, []) == Demo()
    with pytest.raises(SystemExit):
        common.parse_settings(Demo, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--batch-size", "--lr", "--compile, --no-compile", "--no-ema", "--out"):
        assert flag in text
    assert "images per process (default: 64)" in text


def test_cli_turns_user_errors_into_one_line(capsys, monkeypatch):
    def main(cfg):
        raise model.UserError("the batch is larger than the data set; lower --batch-size")
    monkeypatch.setattr("sys.argv", ["x"])
    with pytest.raises(SystemExit) as e:
        common.cli(main, Demo)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: the batch is larger than the data set; lower --batch-size\n"


def test_parse_blocks():
    assert common.parse_blocks("last", 24) == [24]
    assert common.parse_blocks("all", 3) == [1, 2, 3]
    assert common.parse_blocks("18,20,24", 24) == [18, 20, 24]
    assert common.parse_blocks("17-19,2", 24) == [2, 17, 18, 19]
    with pytest.raises(model.UserError, match="block 25 does not exist"):
        common.parse_blocks("24-25", 24)
    with pytest.raises(model.UserError, match="cannot read --blocks"):
        common.parse_blocks("x", 24)
    # 'norm': the pseudo-block of the final norm applied to the top block asked, always last
    assert common.parse_blocks("norm,17-18", 24) == [17, 18, "norm"]
    assert common.parse_blocks("last,norm", 24) == [24, "norm"] and common.parse_blocks("norm", 24) == ["norm"]
    assert common.parse_blocks("all,norm", 2) == [1, 2, "norm"]
    with pytest.raises(model.UserError, match="cannot read --blocks"):
        common.parse_blocks("", 24)


def test_threads_writing_one_file_use_their_own_temporary_files(tmp_path):
    """Two threads saving the same path at once must not rename each other's temporary file away."""
    path = str(tmp_path / "x.pt")
    names = [common.write_tmp({"who": "main"}, path)]
    worker = threading.Thread(target=lambda: names.append(common.write_tmp({"who": "thread"}, path)))
    worker.start()
    worker.join()
    assert names[0] != names[1]
    assert [torch.load(n, weights_only=True)["who"] for n in names] == ["main", "thread"]


def test_save_atomic_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_atomic({"step": 1}, str(path))

    def broken_save(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(model.UserError, match="cannot write .*disk full"):
        common.save_atomic({"step": 2}, str(path))
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # the half-written temporary file is gone


def test_rng_state_round_trip():
    common.seed_everything(3)
    state = resume.rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    common.seed_everything(99)
    resume.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(model.UserError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), "train")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(model.UserError, match="no val/ folder"):
        build_dataset(str(tmp_path), "train")  # both splits checked up front
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(model.UserError, match="at least one image"):
        build_dataset(str(tmp_path), "train")


class KeyEcho(torch.utils.data.Dataset):
    """Returns (worker pid, epoch, index) for a key (epoch, index)."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        return torch.tensor([os.getpid(), *key])


def test_epoch_keys_loader_keeps_its_workers_across_epochs():
    keys = EpochKeys()
    loader = torch.utils.data.DataLoader(KeyEcho(), batch_size=2, sampler=keys, num_workers=1,
                                         persistent_workers=True)
    seen = []
    for epoch in range(2):
        keys.keys = [(epoch, i) for i in (3, 1, 4, 1)]
        seen.append(torch.cat(list(loader)))  # (4, 3)
    assert seen[1][:, 1:].tolist() == [[1, 3], [1, 1], [1, 4], [1, 1]]  # this epoch's keys, in order
    pids = torch.cat(seen)[:, 0]
    assert (pids == pids[0]).all() and int(pids[0]) != os.getpid()  # one worker process, kept


def test_loader_workers_by_the_cores_available(monkeypatch):
    """The evaluation stages' default: at most the cores less one (PyTorch warns above the cores), at most 4."""
    assert knn.Settings().workers == -1
    for cores, want in ((2, 1), (1, 0), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert loader_kwargs(torch.device("cpu"), -1)["num_workers"] == want
    assert loader_kwargs(torch.device("cpu"), 3)["num_workers"] == 3


def test_loader_workers_leave_signals_to_the_main_process():
    """SLURM and a terminal signal every process; a worker ignores SIGINT and SIGUSR1, and most SIGTERMs.

    A worker ignores SIGTERM from anyone but its parent (the main process checkpoints first; the parent's own SIGTERM
    still ends it)."""
    loader = torch.utils.data.DataLoader(KeyEcho(), batch_size=2, sampler=[(0, i) for i in range(4)], num_workers=1,
                                         persistent_workers=True, worker_init_fn=data.quiet_worker)
    pid = int(next(iter(loader))[0, 0])
    for sig in ("TERM", "USR1", "INT"):
        subprocess.run(["kill", f"-{sig}", str(pid)], check=True)  # from another process, not the parent
    time.sleep(0.3)
    assert int(torch.cat(list(loader))[0, 0]) == pid  # alive, the same worker
    os.kill(pid, signal.SIGTERM)  # from the parent
    for _ in range(100):
        if (resume._process(pid) or "Z")[0] == "Z":  # gone (or a zombie not yet reaped)
            break
        time.sleep(0.05)
    assert (resume._process(pid) or "Z")[0] == "Z"


def test_trainers_read_a_folder_of_images_evaluations_need_the_same_classes(tmp_path):
    make_images(tmp_path / "photos", 3, size=8, ext="jpg")
    ds = build_dataset(str(tmp_path / "photos"), "train", labels=False)
    assert len(ds) == 3 and ds.targets == [-1] * 3 and ds[0][0].size == (8, 8)
    with pytest.raises(model.UserError, match="has no train/ folder"):
        build_dataset(str(tmp_path / "photos"), "train")


def test_new_settings_are_in_the_help(capsys):
    for cls in (knn.Settings, refine.Settings, pretrain.Settings):
        with pytest.raises(SystemExit):
            common.parse_settings(cls, ["--help"])
        assert "--num-heads" in capsys.readouterr().out


def test_seeded_draws_from_the_key_alone():
    """Seeded[(e, i)] is transform(image i) under torch.manual_seed(key_seed(seed, e, i)).

    Whatever state the caller's generator is in, and it leaves that state as it was."""
    from PIL import Image

    from util.data import Seeded, key_seed
    images = [(Image.new("RGB", (8, 8), (10 * i, 0, 0)), 0) for i in range(3)]
    draw = lambda img: (img.getpixel((0, 0))[0], float(torch.rand(1)))  # noqa: E731 (the image, one draw)
    data = Seeded(images, draw, seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    (pixel, u), i = data[2, 1]
    assert torch.equal(torch.get_rng_state(), before) and (pixel, i) == (10, 1)
    torch.manual_seed(key_seed(7, 2, 1))
    assert u == float(torch.rand(1)) and key_seed(7, 2, 1) == (7 * 100_000 + 2) * 10**8 + 1
    assert data[3, 1][0][1] != u  # another epoch, other draws
