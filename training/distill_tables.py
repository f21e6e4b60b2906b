"""Reading `training.distill --cv-fold` result files and their markdown tables: accuracy per
fold, and per complete seed with the paired difference to a baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ct_edge.errors import one_line

from .data import DataError

# What a --cv-fold result file holds (fold_table and seed_summary read these).
RESULT_KEYS = ("seed", "fold", "n_test", "models")
MODEL_KEYS = ("accuracy", "errors", "params")


def fold_table(results: list[dict]) -> str:
    """Markdown: accuracy per fold of each model of `compare_fold` results, and over all of them."""
    results = sorted(results, key=lambda r: (r["seed"], r["fold"]))
    names = list(results[0]["models"])
    header = ["model", "params", *(f"seed {r['seed']} fold {r['fold']} ({r['n_test']})"
                                   for r in results), "all folds run", "errors"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    tested = sum(r["n_test"] for r in results)
    for name in names:
        errors = sum(r["models"][name]["errors"] for r in results)
        cells = [name, f"{results[0]['models'][name]['params']:,}",
                 *(f"{r['models'][name]['accuracy']:.1%}" for r in results),
                 f"{1 - errors / tested:.1%} of {tested}", str(errors)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_summary(results: list[dict], baseline: str = "edge-gap", folds: int = 5) -> str:
    """Markdown: each model's accuracy per complete seed (every fold run, all images once), mean
    ± std over those seeds, and the paired difference to `baseline` with its standard error."""
    by_seed: dict[int, list[dict]] = {}
    for result in results:
        by_seed.setdefault(result["seed"], []).append(result)
    complete = sorted(seed for seed, runs in by_seed.items()
                      if {r["fold"] for r in runs} == set(range(folds)) and len(runs) == folds)
    if not complete:
        return f"no seed has all {folds} folds yet"
    names = list(by_seed[complete[0]][0]["models"])

    def accuracy(seed: int, name: str) -> float:
        runs = by_seed[seed]
        return 1 - sum(r["models"][name]["errors"] for r in runs) / sum(r["n_test"] for r in runs)

    lines = [f"| model | accuracy per seed ({', '.join(map(str, complete))}) | mean ± std | "
             f"Δ vs {baseline} (pts, ± SE) |", "|---|---:|---:|---:|"]
    for name in names:
        acc = np.array([accuracy(seed, name) for seed in complete])
        spread = f" ± {acc.std(ddof=1):.1%}" if len(acc) > 1 else " (one seed)"
        delta = "—"
        if name != baseline and baseline in names:
            paired = 100 * (acc - np.array([accuracy(seed, baseline) for seed in complete]))
            error = (f" ± {paired.std(ddof=1) / np.sqrt(len(paired)):.1f}" if len(paired) > 1
                     else " (one seed: no SE)")
            delta = f"{paired.mean():+.1f}{error}"
        lines.append(f"| {name} | {' / '.join(f'{a:.1%}' for a in acc)} | {acc.mean():.1%}{spread} "
                     f"| {delta} |")
    return "\n".join(lines)


def read_results(paths: list[Path]) -> list[dict]:
    """--cv-fold result files, each checked to hold what the tables read (DataError naming the
    file otherwise)."""
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
            raise DataError(f"{path}: cannot read it ({problem})") from None
        if not isinstance(result, dict) or not all(k in result for k in RESULT_KEYS):
            raise DataError(f"{path}: not a --cv-fold result (needs "
                                     f"{', '.join(RESULT_KEYS)})")
        models = result["models"]
        if not isinstance(models, dict) or not models or not all(
                isinstance(m, dict) and all(k in m for k in MODEL_KEYS) for m in models.values()):
            raise DataError(f"{path}: not a --cv-fold result (each model needs "
                                     f"{', '.join(MODEL_KEYS)})")
        if results and set(models) != set(results[0]["models"]):
            raise DataError(f"{path}: its models ({', '.join(models)}) are not those of "
                                     f"{paths[0]} ({', '.join(results[0]['models'])})")
        results.append(result)
    return results
