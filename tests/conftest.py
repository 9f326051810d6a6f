"""What several test files build alike: image folders, a tiny checkpoint, a CPU test's settings, ranks, logs.

The ranks: two processes set up as torchrun's; the logs: a run's. Fixtures where a test only needs the thing; plain
functions (`from conftest import ...`) where it chooses the sizes."""
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # the repository: the stage scripts run from here
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tools"))  # the harnesses: bench.py
torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: threads only add overhead


# --- Images ------------------------------------------------------------------------------------

def make_images(folder, n, size=32, colour=(0, 0, 0), rng=None, prefix="", ext="png"):
    """`n` images folder/{prefix}{i}.{ext} of size x size px, drawn from `rng` (default: seed 0).

    Each is 0.6 * colour plus noise in [0, 100) per pixel and channel. The folder is made, even for n = 0."""
    rng = np.random.default_rng(0) if rng is None else rng
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = 0.6 * np.asarray(colour) + rng.integers(0, 100, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{prefix}{i}.{ext}"))
    return str(folder)


def make_image_folder(root, classes=("a", "b", "c"), per_class=(3, 2), size=32, seed=0):
    """root/train and root/val (an ImageFolder) with per_class = (train, val) PNGs per class, named {class}_{i}.png.

    Each class has its own colour under the noise, so even a random encoder separates them."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            colour = ((c * 97) % 256, (c * 53 + 80) % 256, (c * 191 + 40) % 256)
            make_images(os.path.join(root, split, name), n, size, colour, rng, prefix=f"{name}_")
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """make_image_folder's defaults, built once: 3 classes of 3 train and 2 val 32 px PNGs; tests only read it."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


# --- A tiny encoder ----------------------------------------------------------------------------

def make_checkpoint(path, seed=0, depth=4, img_size=32):
    """A random tiny encoder (32 wide, patch 4) saved in MAE's layout; returns the ViT.

    The file holds {'model': export_encoder(vit)}."""
    import model  # after the sys.path line above
    torch.manual_seed(seed)
    vit = model.ViT(dim=32, depth=depth, patch=4, img_size=img_size)
    torch.save({"model": model.export_encoder(vit)}, path)
    return vit


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The path of make_checkpoint's default encoder (4 blocks, 32 px, seed 0), written once; tests only read it."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    make_checkpoint(path)
    return path


# --- Settings and runs -------------------------------------------------------------------------

def cpu_settings(cls, **kw):
    """A stage's settings for a CPU test: device cpu, no loader processes, batch 4; then kw."""
    return cls(**{"workers": 0, "device": "cpu", "batch_size": 4, **kw})


def read_log(out):
    """The records of OUT/log.jsonl, one dict a line, in order."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def free_port() -> int:
    """A TCP port nobody listens on now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, port, fn, args):
    """Rank `rank` of two with the environment torchrun would give it: fn(*args), then the group ends."""
    from util import common
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        common.teardown_distributed()


@pytest.fixture
def two_ranks():
    """two_ranks(fn, *args): fn(*args) in two processes forked as torchrun's ranks 0 and 1 (gloo), joined."""
    def run(fn, *args):
        # fork: the children inherit the imported modules (spawn would re-import torch in each); a rank's
        # failure or exit code comes back as torch.multiprocessing's ProcessRaisedException / ProcessExitedException
        mp.start_processes(_as_rank, (free_port(), fn, args), nprocs=2, start_method="fork")
    return run


# --- The course assignment's tasks (tests/test_tasks.py, docs/TEACHING.md) ------------------------

MAX_TASKS = 40  # markers task1..task40 are registered; tools/make_assignment.py numbers the tasks


def pytest_configure(config):
    config.addinivalue_line("markers", "task(n): a graded task of the course assignment; `-m taskN` selects it")
    for n in range(1, MAX_TASKS + 1):
        config.addinivalue_line("markers", f"task{n}: the tests of task {n} (added from task({n}))")


def pytest_collection_modifyitems(items):
    """`@pytest.mark.task(3)` also marks the test `task3`, so that `pytest -m task3` selects exactly task 3."""
    for item in items:
        if (mark := item.get_closest_marker("task")) is not None:
            item.add_marker(f"task{mark.args[0]}")
