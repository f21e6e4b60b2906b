"""A series result from its slice results.

Slices that are out of domain or unreadable are excluded and counted. When most classified slices
(more than half of those that are not unreadable) are out of domain, the series is out of domain.
Otherwise the answered slices (status ok or uncertain) are aggregated:

- `topk-mean` (default): per finding class, the mean of its k highest slice probabilities, with
  k = ceil(10% of the answered slices) (at least 1). A finding shows in some slices of a volume,
  not all, so a series is as sick as its sickest tenth. The label named "Normal" (the absence of
  findings) scores 1 - the highest finding score; with no such label every class is a finding.
- `max`: the same with k = 1 (one slice decides; sensitive, and so prone to false alarms).
- `mean`: the mean probability over all answered slices (a finding in few slices is diluted).

The scores are divided by their sum so they read as probabilities; the label is the highest.
The series status follows the slice contract: "uncertain" when that probability is below the
bundle's operating point.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METHODS = ("topk-mean", "max", "mean")
TOP_FRACTION = 0.10
NORMAL_LABEL = "normal"


@dataclass
class SeriesResult:
    """The aggregate of one series; `counts` holds slices, used, ok, uncertain, out_of_domain,
    unreadable and k."""

    status: str | None
    label: str | None
    probabilities: dict[str, float]
    reason: str | None
    aggregate: str
    counts: dict[str, int] = field(default_factory=dict)


def top_k(answered: int, method: str) -> int:
    """How many slices per class the method averages."""
    if method == "max":
        return 1
    if method == "mean":
        return answered
    return max(1, math.ceil(TOP_FRACTION * answered))


def aggregate(slices: Sequence[dict[str, Any]], labels: Sequence[str], method: str = "topk-mean",
              uncertain_below: float = 0.0, caveat: str | None = None) -> SeriesResult:
    """Slice results (dicts with status, probabilities, reason, error) -> the series result;
    with a `caveat` (the bundle has no domain gate), an answered series is never `ok`."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(METHODS)}")
    answered = [s for s in slices if s.get("status") in ("ok", "uncertain") and s.get("probabilities")]
    outside = [s for s in slices if s.get("status") == "out_of_domain"]
    unreadable = [s for s in slices if s.get("status") not in ("ok", "uncertain", "out_of_domain")]
    counts = {"slices": len(slices), "used": len(answered),
              "ok": sum(s["status"] == "ok" for s in answered),
              "uncertain": sum(s["status"] == "uncertain" for s in answered),
              "out_of_domain": len(outside), "unreadable": len(unreadable), "k": 0}
    if not answered and not outside:
        return SeriesResult(None, None, {}, f"none of the {len(slices)} slices could be read",
                            method, counts)
    if len(outside) > len(answered):
        common = Counter(s.get("reason") or "out of domain" for s in outside).most_common(1)[0][0]
        return SeriesResult("out_of_domain", None, {},
                            f"{len(outside)} of {len(outside) + len(answered)} slices out of "
                            f"domain ({common})", method, counts)
    k = top_k(len(answered), method)
    counts["k"] = k
    scores: dict[str, float] = {}
    for label in labels:
        column = sorted((float(s["probabilities"].get(label, 0.0)) for s in answered), reverse=True)
        scores[label] = sum(column[:k]) / k
    normal = [label for label in labels if label.lower() == NORMAL_LABEL]
    if method != "mean" and normal and len(labels) > 1:
        findings = [scores[label] for label in labels if label != normal[0]]
        scores[normal[0]] = 1.0 - max(findings)
    total = sum(scores.values())
    probabilities = ({label: score / total for label, score in scores.items()} if total > 0 else
                     {label: 1.0 / len(labels) for label in labels})
    label = max(probabilities, key=probabilities.__getitem__)
    reasons = [f"confidence below {uncertain_below:.0%}"] if probabilities[label] < uncertain_below \
        else []
    if caveat is not None:
        reasons.append(caveat)
    return SeriesResult("uncertain" if reasons else "ok", label, probabilities,
                        "; ".join(reasons) or None, method, counts)
