"""parity.md: one row per artifact plus the Keras reference, readable at a glance."""

from __future__ import annotations

from .formats import FLOAT32_GATE, GATE

HEADER = ("artifact", "format", "precision", "status", "size", "accuracy",
          "agreement with Keras", "max \\|Δp\\|", "status agreement")


def human_size(size: int | None) -> str:
    if size is None:
        return "—"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.2f} MiB"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _diff(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def table(parity: dict) -> str:
    """The aligned markdown table (also printed at the end of `python -m convert`)."""
    keras = parity["keras"]
    rows = [("keras (reference)", "keras", "fp32", "reference", human_size(keras.get("bytes")),
             _percent(keras["accuracy"]), "—", "—", "—")]
    for a in parity["artifacts"]:
        rows.append((a["name"], a["format"], a["precision"], a["status"].upper()
                     if a["status"] == "failed" else a["status"], human_size(a.get("bytes")),
                     _percent(a.get("accuracy")), _percent(a.get("agreement")),
                     _diff(a.get("max_abs_diff")), _percent(a.get("status_agreement"))))
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    right = {4, 5, 6, 7, 8}

    def line(cells: tuple[str, ...]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(HEADER), rule, *(line(r) for r in rows)])


def markdown(parity: dict) -> str:
    lines = [
        "# Parity report",
        "",
        f"Every artifact run through the ct-edge runtime on the whole test split "
        f"({parity['test_images']} images, {parity['test_split']}) and compared with the Keras model "
        f"it was converted from.",
        "",
        table(parity),
        "",
        f"Default artifact: **{parity['default'] or 'none (no artifact passed)'}**.",
        "",
        f"Gate: accuracy at most max(one test image, {GATE.max_accuracy_drop * 100:g} point) below Keras; "
        f"top-1 agreement with Keras at least {GATE.min_agreement:.0%}; float32 artifacts "
        f"max |Δp| at most {FLOAT32_GATE.max_abs_diff:.0e}; the same status (ok / uncertain / "
        f"out_of_domain) as Keras for at least {GATE.min_status_agreement:.0%} of the images "
        "(when the bundle has a domain gate).",
    ]
    failed = [a for a in parity["artifacts"] if a["failures"]]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {a['name']}: {reason}" for a in failed for reason in a["failures"]]
    lines += ["", "Test loss, per-class recall, mean |Δp|, conversion times and the thresholds per "
              "artifact: `parity.json`.", ""]
    return "\n".join(lines)
