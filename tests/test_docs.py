"""What the README, docs/PROTOCOLS.md and the stage docstrings quote, and the links between the documents.

Each paper's number next to the checkpoint it starts from and the protocol it was measured with; the official
pairing in every MIM-Refiner paper command; METHOD.md's table of the official recipes against recipe.py."""
import importlib
import os
import re
import shlex
from types import SimpleNamespace

import pytest
from conftest import ROOT

import knn
import model
import recipe
import refine
from util import common


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def readme() -> str:
    return read("README.md")


def test_knn_standardisation_is_mim_refiners_and_mae_cts_not_dinos():
    """MAE-CT's k-NN standardises its features too; only DINO's does not."""
    help_text = knn.Settings.__dataclass_fields__["standardize"].metadata["help"]
    assert "MAE-CT" in help_text.split("--no-standardize")[0] and "DINO" in help_text.split("--no-standardize")[1]
    for text in (knn.__doc__, readme(), read("docs/PROTOCOLS.md")):
        sentences = " ".join(text.split()).split(". ")
        unstandardised = [s for s in sentences if "--no-standardize" in s]
        assert unstandardised and not any("MAE-CT" in s.split("--no-standardize")[1][:40] for s in unstandardised)
        assert not any("DINO / MAE-CT" in s or "DINO and MAE-CT do not" in s for s in sentences)


def test_mae_ct_results_are_quoted_with_the_checkpoint_they_start_from():
    """MAE-CT's ViT-L/16 and ViT-H/16 start from its own re-trained MAEs; only ViT-H/14 starts from the public MAE.

    The public one: k-NN 58.9 -> 79.1, probe 77.2 -> 81.3."""
    rows = [r for r in readme().splitlines() if r.startswith("| ") and "+ MAE-CT" in r]
    public = [r for r in rows if "public" in r]
    assert len(public) == 1 and "ViT-H/14" in public[0] and "58.9 -> 79.1" in public[0] and "77.2 -> 81.3" in public[0]
    assert all("re-trained" in r for r in rows if "60.6 -> 78.0" in r or "61.1 -> 79.4" in r)
    assert len(rows) == 3 and "78.0" not in refine.__doc__ and "MAE-CT ViT-H/14 58.9 -> 79.1" in refine.__doc__


def test_protocols_section_gives_a_valid_command_for_every_quoted_number():
    """docs/PROTOCOLS.md's protocol section: every number of the README's results table appears there.

    Each next to a command whose flags the stage accepts."""
    text = read("docs/PROTOCOLS.md")
    section = text[text.index("## Protocols: which command reproduces which number"):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    text = readme()
    results = text[text.index("| model | k-NN | linear probe | 1-shot | clustering |"):]
    results = results[:results.index("\n\n")]
    numbers = set(re.findall(r"\d+\.\d -> \d+\.\d|(?:ACC|NMI|ARI) \d+\.\d", results))
    assert len(numbers) >= 20 and all(n in section for n in numbers), numbers - {n for n in numbers if n in section}
    commands = re.findall(r"`([a-z]+\.py [^`]*)`", section)
    assert {c.split()[0] for c in commands} == {"knn.py", "probe.py", "finetune.py", "cluster.py", "refine.py"}
    for command in commands:
        script, *args = shlex.split(command)
        common.parse_settings(importlib.import_module(script[:-3]).Settings, args)  # exits on an unknown flag
    probe_rows = [r for r in section.splitlines() if r.startswith("| linear probe")]
    assert len(probe_rows) == 2 and all("--augment" in r for r in probe_rows)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_documents_resolve():
    """Every relative link of README.md, BENCHMARKS.md and docs/*.md resolves.

    It names a file that exists and, after a '#', a heading of that file (sections moved between the documents keep
    their links)."""
    docs = ["README.md", "BENCHMARKS.md"] + ["docs/" + f for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                               if f.endswith(".md")]
    checked = 0
    for doc in docs:
        text = re.sub(r"```.*?```", "", read(doc), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            assert os.path.exists(os.path.join(ROOT, path)), f"{doc}: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", read(path), flags=re.S), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc}: {target}"
            checked += 1
    assert checked >= 10


def test_readme_is_a_landing_page():
    """README.md: at most 250 lines, `make demo` and `make test` first, the moved sections linked."""
    text = readme()
    assert len(text.splitlines()) <= 250
    assert text.index("make demo") < text.index("make test") < text.index("\n## ")
    for moved in ("docs/RUNNING.md", "docs/PROTOCOLS.md", "docs/METHOD.md"):
        assert f"]({moved}" in text, moved


def refine_commands(text: str) -> list:
    """Every refine.py command of a document, from its first word to its end.

    Lines of its code blocks (backslash continuations joined) and inline `...` spans."""
    text = text.replace("\\\n", " ")
    found = [line for line in text.splitlines() if re.search(r"(^|\s)refine\.py\s", line)]
    found += [span for span in re.findall(r"`([^`\n]+)`", text) if re.search(r"(^|\s)refine\.py\s", span)]
    return [" ".join(c.split()) for c in found]


def test_every_mim_refiner_paper_command_trains_the_official_pairing():
    """Every paper-scale MIM-Refiner command carries --pairing official: that pairing made the papers' numbers.

    Paper scale: under torchrun on several GPUs, or on /imagenet, in the README, docs/*.md and refine.py's docstring.
    MAE-CT's commands (no pairing) and the CPU demos need not."""
    docs = ["README.md"] + ["docs/" + f for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    commands = [c for doc in docs for c in refine_commands(read(doc))] + refine_commands(refine.__doc__)
    paper = [c for c in commands if ("--data /imagenet" in c or re.search(r"torchrun .*--nproc_per_node=8", c))
             and "--method mae-ct" not in c]
    assert len(paper) >= 5, paper  # README: L/16, H/14; RUNNING.md: SLURM; PROTOCOLS.md; refine.py
    assert all("--pairing official" in c for c in paper), [c for c in paper if "--pairing official" not in c]


def test_official_recipe_table_equals_what_recipe_resolves():
    """docs/METHOD.md §8's table of the official recipes agrees with recipe.py, cell by cell.

    Every cell of every row equals what recipe.resolve (and refine.make_phases, for the top-k) gives for that
    encoder on ImageNet-1K, 8 GPUs."""
    text = read("docs/METHOD.md")
    table = text[text.index("| encoder | method | lr 1 / 2 |"):]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in table[:table.index("\n\n")].splitlines()[2:]]
    size = {"B": "base", "L": "large", "H": "huge", "2B": "2b"}
    seen = set()
    for enc, method, lr, batch, epochs, warm, ld, frozen, heads, queue, topk, tau, ema, crops, files in rows:
        letter, patch = re.search(r"ViT-(2B|B|L|H)/(\d+)", enc).groups()
        dim, depth = model.SIZES[size[letter]][:2]
        vit = SimpleNamespace(dim=dim, depth=depth, patch=int(patch), img_size=224, post_norm="data2vec" in enc)
        r = recipe.resolve(refine.Settings(method=method.lower(), device="cpu"), vit, 8, 1_281_167)
        pair = lambda cell: [float(v) for v in re.findall(r"\d[\d.]*(?:e-?\d+)?", cell)]  # noqa: E731
        assert pair(lr) == [r.head_lr, r.lr] and int(batch) == r.batch_size * 8, enc
        assert pair(epochs) == [r.head_epochs, r.epochs], enc
        phases = [(r.head_epochs, r.head_warmup_epochs), (r.epochs, r.warmup_epochs)]
        want = [w if "epochs" in warm else 100 * w / e for e, w in phases]
        assert pair(warm.replace("%", "")) == pytest.approx(want), enc
        assert float(ld) == r.layer_decay and int(frozen) == r.freeze_blocks and int(queue) == r.queue_size, enc
        assert common.parse_blocks(heads, depth) == common.parse_blocks(r.heads, depth), enc
        assert pair(topk) == [p.topk for p in refine.make_phases(r, 1, 256)], enc
        assert pair(tau) == [r.head_temperature, r.temperature], enc
        assert pair(ema) == [r.ema_momentum] + ([r.target_momentum] if method == "MAE-CT" else [])
        (n, g, lo), *local = re.findall(r"(\d+) x (\d+) \(([\d.]+)-[\d.]+\)", crops)
        assert (int(n), int(g), float(lo)) == (2, r.global_size, r.global_crop_min), enc
        assert r.views == ("multicrop" if local else "crop-flip"), enc
        assert [(int(k), int(s), float(m)) for k, s, m in local] == (
            [(r.local_crops, r.local_size, r.local_crop_min)] if local else []), enc
        assert files.count(".yaml") == 2, enc
        seen.add((enc, method))
    assert len(seen) == len(rows) == 9
