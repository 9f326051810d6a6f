"""What the README and the stage docstrings quote: each paper's number next to the checkpoint it
starts from and the protocol it was measured with."""
import importlib
import os
import re
import shlex

from conftest import ROOT

import knn
import refine
from util import common


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_knn_standardisation_is_mim_refiners_and_mae_cts_not_dinos():
    """MAE-CT's k-NN standardises its features too; only DINO's does not."""
    help_text = knn.Settings.__dataclass_fields__["standardize"].metadata["help"]
    assert "MAE-CT" in help_text.split("--no-standardize")[0] and "DINO" in help_text.split("--no-standardize")[1]
    for text in (knn.__doc__, readme()):
        sentences = " ".join(text.split()).split(". ")
        unstandardised = [s for s in sentences if "--no-standardize" in s]
        assert unstandardised and not any("MAE-CT" in s.split("--no-standardize")[1][:40] for s in unstandardised)
        assert not any("DINO / MAE-CT" in s or "DINO and MAE-CT do not" in s for s in sentences)


def test_mae_ct_results_are_quoted_with_the_checkpoint_they_start_from():
    """MAE-CT's ViT-L/16 and ViT-H/16 start from its own re-trained MAEs; only ViT-H/14 starts from the
    public MAE (k-NN 58.9 -> 79.1, probe 77.2 -> 81.3)."""
    rows = [r for r in readme().splitlines() if r.startswith("| ") and "+ MAE-CT" in r]
    public = [r for r in rows if "public" in r]
    assert len(public) == 1 and "ViT-H/14" in public[0] and "58.9 -> 79.1" in public[0] and "77.2 -> 81.3" in public[0]
    assert all("re-trained" in r for r in rows if "60.6 -> 78.0" in r or "61.1 -> 79.4" in r)
    assert len(rows) == 3 and "78.0" not in refine.__doc__ and "MAE-CT ViT-H/14 58.9 -> 79.1" in refine.__doc__


def test_protocols_section_gives_a_valid_command_for_every_quoted_number():
    """The README's protocol section: every number of the results table appears there, next to a
    command whose flags the stage accepts."""
    text = readme()
    section = text[text.index("## Protocols: which command reproduces which number"):]
    section = section[:section.index("\n## ")]
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
