"""What the README and the stage docstrings quote: each paper's number next to the checkpoint it
starts from and the protocol it was measured with."""
import os

import knn
import refine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
