"""Mixtures of cross-validated recipes: the mean of their out-of-fold probabilities.

    python -m training.mixture --runs artifacts/evaluate/covid19-xray \\
        --members edge-gap-crop,effnet-probe-224[:flip|:int8|:kN] [--baseline edge-gap-crop] \\
        [--versus edge-gap-crop,effnet-probe-224:int8]

`training.evaluate` records every test image's probabilities; runs of one seed share their
folds whatever the recipe, so the mean of two recipes' probabilities per image is exactly what
a one-graph ensemble of their fold models (`training.ensemble`) would have answered on those
folds, without training anything again; `:flip` averages a recipe with its answer on the
mirrored image (flip TTA), `:int8` takes its full-int8 TFLite answers (runs made with --int8),
`:kN` the mean of its first N members' answers (runs made with --members K >= N). A recipe
may be a shell-style pattern matching several labels, one run per seed (e.g.
'edge-gap-crop+ens*:k3' takes three members of an ens3 run on one seed and of an ens5 run on
another).
Figures are the share of all images right per seed, mean ± std over the seeds every member
ran, and the paired difference to the baseline; `--versus` adds the top-1 agreement per seed of
the mixture with another (e.g. the same members in int8).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.errors import CtEdgeError

from .cv_runs import by_recipe, load_runs


class MixtureError(CtEdgeError):
    """Runs that cannot be mixed: missing, without probabilities, or on other images."""


# What a member's answer is: `recipe` its probabilities, `recipe:flip` their mean with the
# mirrored image's (flip TTA, as a graph that runs both), `recipe:int8` its full-int8 artifact's.
VIEWS = {"": ("probabilities",), "flip": ("probabilities", "flipped_probabilities"),
         "int8": ("int8_probabilities",)}
# `recipe:kN`: the mean of the first N members of an ensemble run (member_probabilities).
MEMBERS_VIEW = re.compile(r"k([1-9][0-9]*)")


def parse_member(spec: str) -> tuple[str, str]:
    """'recipe[:view]' -> (recipe, view)."""
    recipe, _, view = spec.partition(":")
    if view not in VIEWS and not MEMBERS_VIEW.fullmatch(view):
        raise MixtureError(f"{spec}: unknown view {view!r}; use one of "
                           + ", ".join(f":{v}" for v in VIEWS if v) + " or :kN")
    return recipe, view


def out_of_fold_probabilities(run: dict, view: str = "") -> dict[str, tuple[int, np.ndarray]]:
    """Per image (class folder/file name): its true class index and the recipe's probabilities
    as `view` (VIEWS, or kN) says."""
    rows = [p for fold in run["folds"] for p in fold.get("predictions", ())]
    members = MEMBERS_VIEW.fullmatch(view)
    if members:
        count = int(members.group(1))
        if not rows or any(len(r.get("member_probabilities", ())) < count for r in rows):
            raise MixtureError(f"run has no answers of {count} members (made with fewer "
                               "--members, or before they were recorded)")
        answers = [r["member_probabilities"][:count] for r in rows]
    else:
        keys = VIEWS[view]
        if not rows or any(key not in r for r in rows for key in keys):
            raise MixtureError(f"run has no per-image {' or '.join(k.replace('_', ' ') for k in keys)}"
                               " (made before they were recorded, or without --int8; run "
                               "training.evaluate again)")
        answers = [[r[k] for k in keys] for r in rows]
    return {"/".join(Path(r["path"]).parts[-2:]):
            (LABELS.index(r["true"]), np.mean(np.asarray(a, np.float64), axis=0))
            for r, a in zip(rows, answers, strict=True)}


def mixed_probabilities(runs: list[dict], views: list[str] | None = None
                        ) -> dict[str, tuple[int, np.ndarray]]:
    """Per image: true class and the mean of the runs' probabilities (each as its view)."""
    tables = [out_of_fold_probabilities(run, view)
              for run, view in zip(runs, views or [""] * len(runs), strict=True)]
    images = set(tables[0])
    if any(set(t) != images for t in tables[1:]):
        raise MixtureError("runs tested different images; mix runs of the same data only")
    return {image: (tables[0][image][0], np.mean([t[image][1] for t in tables], axis=0))
            for image in sorted(images)}


def mixed_accuracy(runs: list[dict], views: list[str] | None = None) -> tuple[float, int]:
    """Accuracy over all images of the mean of the runs' probabilities, and the error count."""
    mixed = mixed_probabilities(runs, views)
    errors = sum(int(p.argmax()) != true for true, p in mixed.values())
    return 1.0 - errors / len(mixed), errors


def load_by_recipe(folder: Path) -> dict[str, dict[int, dict]]:
    """Every run in a training.evaluate results folder, by recipe label and seed."""
    if not folder.is_dir():
        raise MixtureError(f"{folder}: no such results folder")
    return by_recipe(load_runs(folder))


def runs_of(by_name: dict[str, dict[int, dict]], recipe: str) -> dict[int, dict]:
    """The runs of `recipe` by seed; a `*` in it matches several labels, one run per seed."""
    names = sorted(n for n in by_name if fnmatch.fnmatchcase(n, recipe))
    if not names:
        raise MixtureError(f"no runs of {recipe}; found: {', '.join(sorted(by_name))}")
    runs: dict[int, dict] = {}
    for name in names:
        for seed, run in by_name[name].items():
            if seed in runs:
                raise MixtureError(f"{recipe} matches two runs of seed {seed} "
                                   f"({', '.join(names)}); make the pattern narrower")
            runs[seed] = run
    return runs


def _seeds(by_name: dict[str, dict[int, dict]], specs: list[str]) -> list[int]:
    recipes = {parse_member(m)[0] for m in specs}
    seeds = sorted(set.intersection(*(set(runs_of(by_name, n)) for n in recipes)))
    if not seeds:
        raise MixtureError(f"{', '.join(specs)} share no seed")
    return seeds


def _runs_and_views(by_name: dict[str, dict[int, dict]], specs: list[str], seed: int
                    ) -> tuple[list[dict], list[str]]:
    parsed = [parse_member(m) for m in specs]
    return [runs_of(by_name, r)[seed] for r, _ in parsed], [v for _, v in parsed]


def _mixed(by_name: dict[str, dict[int, dict]], specs: list[str], seed: int
           ) -> dict[str, tuple[int, np.ndarray]]:
    return mixed_probabilities(*_runs_and_views(by_name, specs, seed))


def mixture_rows(by_name: dict[str, dict[int, dict]], members: list[str],
                 baseline: list[str]) -> list[dict]:
    """One row for the baseline (itself a mixture when it names several members), one per member
    and one for the mixture: accuracy per seed on the seeds all of them ran."""
    seeds = _seeds(by_name, [*members, *baseline])

    def score(names: list[str], seed: int) -> tuple[float, int]:
        return mixed_accuracy(*_runs_and_views(by_name, names, seed))

    base = [score(baseline, s)[0] for s in seeds]
    rows = []
    mixture = [(" + ".join(members), members)] if len(members) > 1 else []
    singles = [(n, [n]) for n in dict.fromkeys(members) if [n] != baseline]
    for label, names in [(" + ".join(baseline), baseline), *singles, *mixture]:
        scored = [score(names, s) for s in seeds]
        accuracy = [a for a, _ in scored]
        paired = [100 * (a - b) for a, b in zip(accuracy, base, strict=True)]
        rows.append({"name": label, "seeds": seeds, "accuracy": accuracy,
                     "errors": [e for _, e in scored],
                     "mean": float(np.mean(accuracy)),
                     "std": float(np.std(accuracy, ddof=1)) if len(seeds) > 1 else 0.0,
                     "paired": None if names == baseline else paired})
    return rows


def agreement(by_name: dict[str, dict[int, dict]], members: list[str],
              versus: list[str]) -> dict[int, tuple[float, int]]:
    """Per seed: top-1 agreement of two mixtures over all images, and how many images differ."""
    out = {}
    for seed in _seeds(by_name, [*members, *versus]):
        a, b = _mixed(by_name, members, seed), _mixed(by_name, versus, seed)
        differ = sum(int(a[i][1].argmax()) != int(b[i][1].argmax()) for i in a)
        out[seed] = (1.0 - differ / len(a), differ)
    return out


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
                        ":flip (flip TTA), :int8 (its full-int8 answers) or :kN (its first N "
                        "members); '*' matches several labels, e.g. "
                        "'edge-gap-crop+ens*:k3,effnet-probe-224:flip'")
    parser.add_argument("--baseline", default="edge-gap-crop",
                        help="recipe (or comma-separated members of a mixture, as --members) the "
                        "paired differences are taken to (default: edge-gap-crop)")
    parser.add_argument("--versus", default=None,
                        help="another member list; prints its top-1 agreement with --members per "
                        "seed, e.g. the same members with :int8 (default: none)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    baseline = [m.strip() for m in args.baseline.split(",") if m.strip()]
    if not members or not baseline:
        parser.error("--members and --baseline need a recipe")
    try:
        by_name = load_by_recipe(Path(args.runs))
        rows = mixture_rows(by_name, members, baseline)
        versus = [m.strip() for m in (args.versus or "").split(",") if m.strip()]
        agreed = agreement(by_name, members, versus) if versus else {}
    except (CtEdgeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"rows": rows, "agreement": {str(k): v[0] for k, v in agreed.items()}},
                         indent=2))
        return 0
    print(markdown(rows, " + ".join(baseline)), end="")
    if agreed:
        print(f"\ntop-1 agreement of {' + '.join(members)} with {' + '.join(versus)}: "
              + ", ".join(f"seed {s} {a:.1%} ({d} differ)" for s, (a, d) in agreed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
