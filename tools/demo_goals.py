"""The demo's goals checked on a summary.json of demo.py, and its per-block k-NN as a table.

docs/DEMO.md quotes what this prints for the committed 3-seed runs (a test holds them equal):
    python tools/demo_goals.py docs/demo_summary.json      # the demo's 6-block MAE
    python tools/demo_goals.py docs/demo_summary_d12.json  # the 12-block MAE (make demo-deep)
A goal on a difference between refined encoders asks for more than 2 seed-SDs: the difference of the means
must exceed twice the larger of the two SDs (sample SD over the refinement seeds).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo import cell  # noqa: E402 - the repository root, when run as a script

PIXELS = ("pixels", "pixels, per-image")
REFINED = ("mim-refiner", "mae-ct")


def mean(values: list) -> float:
    return 100 * statistics.mean(values)


def sd(values: list) -> float:
    return 100 * statistics.stdev(values) if len(values) > 1 else 0.0


def beats(e: dict, a: str, b: str, metric: str) -> tuple[str, bool]:
    """Is a's mean above b's by more than 2 seed-SDs? (text of the difference, verdict)."""
    va, vb = e[a][metric], e[b][metric]
    diff, bound = mean(va) - mean(vb), 2 * max(sd(va), sd(vb))
    return f"{diff:+.1f} (2 SD = {bound:.1f})", diff > bound


def goals(summary: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for every goal the summary can answer; rows whose encoders are absent are left out."""
    e, rows = summary["encoders"], []
    curve = {int(b): mean(v) for b, v in e["mae"]["knn_per_block"].items()}
    best, last = max(curve, key=curve.get), curve[max(curve)]
    rows.append(("MAE k-NN: best block at least 3 points above the last",
                 f"block {best} {curve[best]:.1f}, last {last:.1f}", curve[best] - last >= 3))
    rows.append(("MIM-Refiner k-NN above MAE-CT's by more than 2 SD", *beats(e, "mim-refiner", "mae-ct", "knn_top1")))
    top = max((mean(e[p][k]), f"{p}, {how}") for p in PIXELS if p in e
              for k, how in (("knn_top1", "standardised"), ("knn_plain_top1", "plain cosine")))
    for m in REFINED:
        rows.append((f"{m}: k-NN above every pixel k-NN", f"{mean(e[m]['knn_top1']):.1f} vs {top[0]:.1f} ({top[1]})",
                     mean(e[m]["knn_top1"]) > top[0]))
    if "pixels" in e:
        rows.append(("MAE best block at least the standardised pixels' k-NN",
                     f"{curve[best]:.1f} vs {mean(e['pixels']['knn_top1']):.1f}",
                     curve[best] >= mean(e["pixels"]["knn_top1"])))
    for m in REFINED:
        if f"{m}, own view" in e:
            for metric, what in (("knn_top1", "k-NN"), ("cluster_acc", "k-means ACC")):
                rows.append((f"{m}: swap above own view on {what} by more than 2 SD",
                             *beats(e, m, f"{m}, own view", metric)))
    gain = mean(e["mim-refiner"]["cluster_acc"]) - mean(e["mae"]["cluster_acc"])
    rows.append(("MIM-Refiner k-means ACC at least 20 points above the MAE's", f"{gain:+.1f}", gain >= 20))
    rows.append(("MAE linear probe at least 50", f"{mean(e['mae']['probe_top1']):.1f}",
                 mean(e["mae"]["probe_top1"]) >= 50))
    return rows


def per_block(summary: dict) -> str:
    """Markdown: k-NN top-1 per block (rows) of every encoder that has blocks (columns), mean ± SD over seeds."""
    names = [n for n, e in summary["encoders"].items() if "knn_per_block" in e]
    blocks = sorted({int(b) for n in names for b in summary["encoders"][n]["knn_per_block"]})
    rows = [["block", *names], ["---"] * (1 + len(names))]
    curves = [summary["encoders"][n]["knn_per_block"] for n in names]
    rows += [[str(b), *(cell(c[str(b)]) if str(b) in c else "-" for c in curves)] for b in blocks]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def report(summary: dict) -> str:
    """The goals table, then the per-block table, as markdown."""
    rows = [["goal", "measured", "met"], ["---"] * 3]
    rows += [[g, m, "yes" if ok else "**no**"] for g, m, ok in goals(summary)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n\n" + per_block(summary)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        sys.exit("usage: python tools/demo_goals.py SUMMARY_JSON (e.g. docs/demo_summary.json)")
    with open(sys.argv[1]) as f:
        print(report(json.load(f)))
