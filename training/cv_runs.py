"""Tables and plots from stored cross-validation runs (`training.evaluate`'s JSON files).

Every run records each test image's answer, so seeds can be pooled, recipes paired by seed, the
images every recipe misses listed and the risk-coverage of the out-of-fold answers drawn, all
without training again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.errors import one_line

from . import abstention
from .data import DataError
from .metrics import scale_temperature


def seed_of(label: str) -> tuple[str, int]:
    name, _, seed = label.partition("@seed")
    return name, int(seed or 0)


def pooled_accuracy(run: dict) -> float:
    """Share of all images right: each image is in exactly one test fold."""
    tested = sum(f["n_test"] for f in run["folds"])
    return 1.0 - sum(round((1 - f["accuracy"]) * f["n_test"]) for f in run["folds"]) / tested


def seed_table(runs: dict[str, dict], baseline: str = "edge-gap-crop") -> str:
    """Recipes measured with several seeds (other folds each): accuracy over all images per seed,
    mean ± std over seeds, and the paired difference to `baseline` on the same seeds."""
    by_name = by_recipe(runs)
    head = ("| experiment | seeds | params | accuracy per seed (all images) | mean ± std over seeds | "
            f"Δ vs {baseline}, same seeds (pts) | loss (mean of folds) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = by_name.get(baseline, {})
    for name, seeds in sorted(by_name.items()):
        if len(seeds) < 2:
            continue
        order = sorted(seeds)
        acc = [pooled_accuracy(seeds[s]) for s in order]
        paired = [100 * (pooled_accuracy(seeds[s]) - pooled_accuracy(base[s]))
                  for s in order if s in base]
        delta = (f"{np.mean(paired):+.1f} ± {np.std(paired, ddof=1):.1f} ({len(paired)} seeds)"
                 if len(paired) > 1 and name != baseline else "—")
        loss = np.mean([f["loss"] for s in order for f in seeds[s]["folds"]])
        lines.append(f"| {name} | {', '.join(map(str, order))} | {seeds[order[0]]['params']:,} | "
                     + " / ".join(f"{a:.1%}" for a in acc)
                     + f" | {np.mean(acc):.1%} ± {np.std(acc, ddof=1):.1%} | {delta} | {loss:.3f} |")
    return "\n".join(lines) + "\n"


def hard_images(runs: dict[str, dict], share: float = 0.8) -> str:
    """Images wrong in at least `share` of the runs that tested them (every run tests every image
    once): the same misses under every recipe point at the images, not at a recipe."""
    wrong: dict[str, list[str]] = {}
    with_errors = [run for run in runs.values() if all("errors" in f for f in run["folds"])]
    for run in with_errors:
        for fold in run["folds"]:
            for error in fold["errors"]:
                # class folder/file name: the same image whatever --data path the run was given
                image = "/".join(Path(error["path"]).parts[-2:])
                wrong.setdefault(image, []).append(error["predicted"])
    rows = sorted((path, predicted) for path, predicted in wrong.items()
                  if len(predicted) >= share * len(with_errors))
    lines = [f"{len(rows)} image(s) wrong in at least {share:.0%} of {len(with_errors)} runs:", ""]
    lines += [f"- {path}: wrong {len(predicted)}x, taken for "
              + ", ".join(f"{label} {predicted.count(label)}x" for label in sorted(set(predicted)))
              for path, predicted in rows]
    return "\n".join(lines) + "\n"


def out_of_fold(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of every image a run tested, from its folds' recorded predictions."""
    rows = [p for fold in run["folds"] for p in fold.get("predictions", ())]
    return (np.asarray([r["confidence"] for r in rows], dtype=np.float64),
            np.asarray([r["predicted"] == r["true"] for r in rows], dtype=bool))


def int8_confidence(run: dict) -> np.ndarray | None:
    """Top-1 confidence of the run's full-int8 answers, scaled by each fold's temperature as the
    runtime does, in `out_of_fold`'s order; None for a run made without --int8."""
    rows = [p.get("int8_probabilities") for fold in run["folds"] for p in fold.get("predictions", ())]
    if not rows or any(probs is None for probs in rows):
        return None
    return np.concatenate([
        scale_temperature(np.asarray([p["int8_probabilities"] for p in fold["predictions"]],
                                     np.float32), fold["temperature"]).max(axis=1)
        for fold in run["folds"] if fold.get("predictions")]).astype(np.float64)


def by_recipe(runs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Runs by recipe name and seed ('recipe@seedN' labels)."""
    by_name: dict[str, dict[int, dict]] = {}
    for label, run in runs.items():
        name, seed = seed_of(label)
        by_name.setdefault(name, {})[seed] = run
    return by_name


def _by_recipe(runs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Runs that recorded per-image predictions, by recipe name and seed."""
    return by_recipe({label: run for label, run in runs.items()
                      if all(fold.get("predictions") for fold in run["folds"])})


def abstention_table(runs: dict[str, dict]) -> str:
    """Per recipe: AURC per seed and the operating point chosen on all its seeds' out-of-fold
    predictions pooled (training.abstention's rule), and for the seeds run with --int8 how many
    images the full-int8 answer puts on the other side of that threshold (ok / uncertain; labels
    aside)."""
    head = ("| experiment | seeds | predictions | error rate | AURC per seed | AURC pooled (perfect "
            "ranking) | threshold | answered | risk among answered (errors) | target met | "
            "int8 same ok / uncertain |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, seeds in sorted(_by_recipe(runs).items()):
        order = sorted(seeds)
        parts = [out_of_fold(seeds[s]) for s in order]
        per_seed = [abstention.aurc(abstention.risk_coverage(*part)) for part in parts]
        confidence, correct = (np.concatenate(column) for column in zip(*parts, strict=True))
        found = abstention.summary(confidence, correct)
        point = found["operating_point"]
        int8 = [int8_confidence(seeds[s]) for s in order]
        have = [i for i, c in enumerate(int8) if c is not None]
        same = "—"
        if have:  # the seeds run with --int8, at the threshold of all seeds pooled
            in_float = np.concatenate([parts[i][0] for i in have])
            above = np.concatenate([int8[i] for i in have]) >= point["threshold"]
            differ = int(np.sum((in_float >= point["threshold"]) != above))
            only = ("" if len(have) == len(order) else
                    f"; seed{'s' if len(have) > 1 else ''} {', '.join(str(order[i]) for i in have)}")
            same = f"{1 - differ / len(in_float):.1%} ({differ} differ{only})"
        lines.append(
            f"| {name} | {', '.join(map(str, order))} | {len(correct)} | {found['error_rate']:.1%} | "
            + " / ".join(f"{v:.3f}" for v in per_seed)
            + f" | {found['aurc']:.3f} ({found['aurc_optimal']:.3f}) | {point['threshold']:.3f} | "
            f"{point['coverage']:.1%} | {point['risk']:.1%} ({point['errors']} of "
            f"{point['answered']}; ≤ {point['risk_upper_95']:.1%} at 95%) | "
            f"{'yes' if point['target_met'] else 'no'} | {same} |")
    return "\n".join(lines) + "\n"


def abstention_plots(runs: dict[str, dict], folder: Path) -> list[Path]:
    """One risk–coverage PNG per recipe: all seeds pooled (operating point marked), and each seed."""
    written = []
    for name, seeds in sorted(_by_recipe(runs).items()):
        order = sorted(seeds)
        parts = [out_of_fold(seeds[s]) for s in order]
        pooled = (np.concatenate([c for c, _ in parts]), np.concatenate([k for _, k in parts]))
        first = seeds[order[0]]
        data = Path(first["config"]["data"]).name
        curves = [(f"{len(order)} seeds pooled" if len(order) > 1 else f"seed {order[0]}",
                   *pooled)]
        if len(order) > 1:
            curves += [(f"seed {s}", *part) for s, part in zip(order, parts, strict=True)]
        path = folder / f"abstention-{name}.png"
        abstention.plot(curves, path, f"{name}: out-of-fold predictions of {first['k']}-fold CV "
                        f"by near-duplicate group\non {first['n_images']} images of {data} "
                        f"(train/ folder), seeds {', '.join(map(str, order))}")
        written.append(path)
    return written


def errors_by_members(predictions: list[dict]) -> tuple[list[int], list[int]]:
    """Errors among `predictions` (with `member_probabilities`) of the mean of the first k
    members, k = 1..K, and of each member alone."""
    members = np.asarray([p["member_probabilities"] for p in predictions])  # (n, K, classes)
    truth = np.asarray([LABELS.index(p["true"]) for p in predictions])
    count = members.shape[1]
    return ([int((members[:, :k].mean(axis=1).argmax(axis=1) != truth).sum())
             for k in range(1, count + 1)],
            [int((members[:, m].argmax(axis=1) != truth).sum()) for m in range(count)])


def members_table(runs: dict[str, dict]) -> str:
    """Runs of K models per fold (`training.evaluate --members K`): the errors of the mean of the
    first k members, k = 1..K, per fold and over all images, and of each member alone; '' when
    no run recorded its members."""
    lines = []
    for label, run in sorted(runs.items()):
        folds = run["folds"]
        if not all("member_probabilities" in p for f in folds for p in f.get("predictions") or [{}]):
            continue  # a single model, or a run stored without its answers
        by_k, alone = zip(*(errors_by_members(fold["predictions"]) for fold in folds),
                          strict=True)  # errors per fold: [fold][k], [fold][member]
        tested = sum(f["n_test"] for f in folds)
        for k, errors in enumerate(zip(*by_k, strict=True), 1):
            # Members numbered as training.evaluate seeds them (seed + fold + 1000 x member).
            model = "member 0 (k = 1)" if k == 1 else f"mean of members 0-{k - 1} (k = {k})"
            lines.append(f"| {label} | {model} | {' / '.join(map(str, errors))} | "
                         f"{sum(errors)} | {1 - sum(errors) / tested:.1%} |")
        each = [sum(errors) for errors in zip(*alone, strict=True)]
        lines.append(f"| {label} | each member alone | | {', '.join(map(str, each))} | "
                     f"{1 - max(each) / tested:.1%}-{1 - min(each) / tested:.1%} |")
    if not lines:
        return ""
    return ("| run | model | errors per fold | errors | accuracy (all images) |\n"
            "|---|---|---|---:|---:|\n" + "\n".join(lines) + "\n")


def load_runs(folder: Path) -> dict[str, dict]:
    """Every run of one data set's results folder, by label ('recipe' or 'recipe@seedN'); a file
    that is no training.evaluate run is named in a DataError."""
    runs = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable earlier result ({one_line(exc)}); "
                            "move it away or delete it") from None
        if not isinstance(run, dict) or not isinstance(run.get("folds"), list):
            raise DataError(f"{path}: not a training.evaluate result (no folds); move it away "
                            "or delete it")
        runs[path.stem] = run
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cv_runs",
                                     description="Print the several-seed and abstention tables "
                                     "of stored training.evaluate runs (and, for runs of K "
                                     "members, the errors of k = 1..K), without training.")
    parser.add_argument("runs", type=Path,
                        help="a training.evaluate results folder (one data set's JSON files)")
    parser.add_argument("--baseline", default="edge-gap-crop",
                        help="recipe the paired differences are taken to (default: edge-gap-crop)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: {args.runs}: no training.evaluate runs (*.json) there", file=sys.stderr)
        return 2
    members = members_table(runs)
    print(seed_table(runs, args.baseline) + "\n" + abstention_table(runs)
          + (f"\n{members}" if members else ""), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
