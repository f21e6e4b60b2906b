"""Mixtures of cross-validated recipes: the mean of their out-of-fold probabilities.

    python -m training.mixture --runs artifacts/evaluate/covid19-xray \\
        --members edge-gap-crop,effnet-probe-224[:flip] [--baseline edge-gap-crop]

`training.evaluate` records every test image's probabilities; runs of one seed share their
folds whatever the recipe, so the mean of two recipes' probabilities per image is exactly what
a one-graph ensemble of their fold models (`training.ensemble`) would have answered on those
folds, without training anything again; `:flip` averages a recipe with its answer on the
mirrored image (flip TTA). Figures are the share of all images right per seed,
mean ± std over the seeds every member ran, and the paired difference to the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.errors import CtEdgeError

from .evaluate import seed_of


class MixtureError(CtEdgeError):
    """Runs that cannot be mixed: missing, without probabilities, or on other images."""


FLIP = ":flip"


def out_of_fold_probabilities(run: dict, flip: bool = False) -> dict[str, tuple[int, np.ndarray]]:
    """Per image (class folder/file name): its true class index and the recipe's probabilities;
    `flip`: their mean with the mirrored image's (flip TTA, as a graph that runs both answers)."""
    rows = [p for fold in run["folds"] for p in fold.get("predictions", ())]
    keys = ["probabilities", "flipped_probabilities"] if flip else ["probabilities"]
    if not rows or any(key not in r for r in rows for key in keys):
        raise MixtureError(f"run has no per-image {' or '.join(k.replace('_', ' ') for k in keys)}"
                           " (made before they were recorded; run training.evaluate again)")
    return {"/".join(Path(r["path"]).parts[-2:]):
            (LABELS.index(r["true"]), np.mean([np.asarray(r[k], np.float64) for k in keys], axis=0))
            for r in rows}


def mixed_accuracy(runs: list[dict], flips: list[bool] | None = None) -> tuple[float, int]:
    """Accuracy over all images of the mean of the runs' probabilities (each flip-averaged where
    `flips` says so), and the error count."""
    tables = [out_of_fold_probabilities(run, flip)
              for run, flip in zip(runs, flips or [False] * len(runs), strict=True)]
    images = set(tables[0])
    if any(set(t) != images for t in tables[1:]):
        raise MixtureError("runs tested different images; mix runs of the same data only")
    errors = sum(int(np.mean([t[image][1] for t in tables], axis=0).argmax()) != tables[0][image][0]
                 for image in images)
    return 1.0 - errors / len(images), errors


def load_runs(folder: Path) -> dict[str, dict[int, dict]]:
    """Every run in a training.evaluate results folder, by recipe label and seed."""
    if not folder.is_dir():
        raise MixtureError(f"{folder}: no such results folder")
    by_name: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*.json")):
        name, seed = seed_of(path.stem)
        by_name.setdefault(name, {})[seed] = json.loads(path.read_text())
    return by_name


def mixture_rows(by_name: dict[str, dict[int, dict]], members: list[str],
                 baseline: str) -> list[dict]:
    """One row per recipe and for the mixture: accuracy per seed on the seeds all of them ran.
    A member or baseline named `recipe:flip` is that recipe's runs with flip TTA."""
    recipes = {m.removesuffix(FLIP) for m in [*members, baseline]}
    missing = sorted(n for n in recipes if n not in by_name)
    if missing:
        raise MixtureError(f"no runs of {', '.join(missing)}; found: {', '.join(sorted(by_name))}")
    seeds = sorted(set.intersection(*(set(by_name[n]) for n in recipes)))
    if not seeds:
        raise MixtureError(f"{', '.join(members)} and {baseline} share no seed")

    def score(names: list[str], seed: int) -> tuple[float, int]:
        return mixed_accuracy([by_name[n.removesuffix(FLIP)][seed] for n in names],
                              [n.endswith(FLIP) for n in names])

    base = [score([baseline], s)[0] for s in seeds]
    rows = []
    mixture = [(" + ".join(members), members)] if len(members) > 1 else []
    for label, names in [*((n, [n]) for n in dict.fromkeys([baseline, *members])), *mixture]:
        scored = [score(names, s) for s in seeds]
        accuracy = [a for a, _ in scored]
        paired = [100 * (a - b) for a, b in zip(accuracy, base, strict=True)]
        rows.append({"name": label, "seeds": seeds, "accuracy": accuracy,
                     "errors": [e for _, e in scored],
                     "mean": float(np.mean(accuracy)),
                     "std": float(np.std(accuracy, ddof=1)) if len(seeds) > 1 else 0.0,
                     "paired": None if names == [baseline] else paired})
    return rows


def markdown(rows: list[dict], baseline: str) -> str:
    head = ("| model | seeds | accuracy per seed (all images) | errors | mean ± std | "
            f"Δ vs {baseline}, paired (pts) | two standard errors |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        paired = row["paired"]
        if paired is None or len(paired) < 2:
            delta = twice_se = "—"
        else:
            sd = float(np.std(paired, ddof=1))
            delta = f"{np.mean(paired):+.1f} ± {sd:.1f}"
            twice_se = f"{2 * sd / np.sqrt(len(paired)):.2f}"
        lines.append(f"| {row['name']} | {', '.join(map(str, row['seeds']))} | "
                     + " / ".join(f"{a:.1%}" for a in row["accuracy"])
                     + f" | {' / '.join(map(str, row['errors']))} | {row['mean']:.1%} ± "
                     f"{row['std']:.1%} | {delta} | {twice_se} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.mixture",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True,
                        help="a training.evaluate results folder (one data set's JSON files)")
    parser.add_argument("--members", required=True,
                        help="comma-separated recipe labels to average, each optionally with "
                        f"{FLIP} for flip TTA, e.g. edge-gap-crop,effnet-probe-224{FLIP}")
    parser.add_argument("--baseline", default="edge-gap-crop",
                        help="recipe the paired differences are taken to (default: edge-gap-crop)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    if not members:
        parser.error("--members needs a recipe")
    try:
        rows = mixture_rows(load_runs(Path(args.runs)), members, args.baseline)
    except (CtEdgeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown(rows, args.baseline), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
