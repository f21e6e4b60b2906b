"""`ct-edge results`: list the results store (what `serve`, `listen` and others recorded)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import DISCLAIMER
from .. import STATUS_WORDS as BY_STATUS
from ..errors import parity_warning
from .common import EXIT_OK, EXIT_USAGE, RAW, error, json_line, positive_int, printable

STATUS_WORDS = {**BY_STATUS, None: "unreadable"}
EXAMPLES = """\
examples:
  ct-edge results                          (the 20 newest results)
  ct-edge results --limit 100 --status uncertain
  ct-edge results --json --label COVID-19 | jq .source
  ct-edge results --series                 (DICOM series received by `ct-edge listen`)
  ct-edge results --series --status uncertain
  ct-edge results --data-dir /var/lib/ct-edge

Reads the store in --data-dir (default: $CT_EDGE_DATA, else $XDG_DATA_HOME/ct-edge, else
~/.local/share/ct-edge), newest first, without writing to it (it may be on a read-only
disk). --json prints one JSON object per line. Control characters in stored text (a DICOM
series description, say) show as escapes, e.g. \\x1b, in the table. A `*` after a status marks a
result of an artifact that did not pass its parity check (its warning follows the table;
artifact_parity in --json). The disclaimer follows the table (on stderr with --json). Exit
code 2 when there is no usable store there (none, empty, damaged, made by an older ct-edge and
not yet upgraded by `serve` or `listen`, or busy in another process).
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("results", help="list stored results", formatter_class=RAW,
                                 description="List the results store, newest first.",
                                 epilog=EXAMPLES)
    parser.add_argument("--data-dir", metavar="DIR",
                        help="the data folder (default: $CT_EDGE_DATA, else "
                             "$XDG_DATA_HOME/ct-edge, else ~/.local/share/ct-edge)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line (default: a table)")
    parser.add_argument("--limit", type=positive_int, default=20, metavar="N",
                        help="show the N newest (default: 20, at most 1000)")
    parser.add_argument("--status", choices=("ok", "uncertain", "out_of_domain"),
                        help="only results (with --series: completed series) with this status "
                             "(default: all results, unreadable ones too)")
    parser.add_argument("--label", help="only results (with --series: completed series) with "
                                        "this label (default: all, labelled or not)")
    parser.add_argument("--series", action="store_true",
                        help="list DICOM series (from `ct-edge listen`) instead of results "
                             "(default: results); --status and --label apply to the series' "
                             "own result")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..store import DB_NAME, Store, default_data_dir

    data_dir = default_data_dir() if args.data_dir is None else Path(args.data_dir)
    if not (data_dir / DB_NAME).is_file():
        error(f"no results store in {data_dir} (no {DB_NAME}); pass --data-dir DIR or set "
              "$CT_EDGE_DATA")
        return EXIT_USAGE
    with Store(data_dir, read_only=True) as store:
        if args.series:
            rows = store.list_dicom_series(limit=args.limit, status=args.status,
                                           label=args.label)
        else:
            rows = store.list(limit=args.limit, status=args.status, label=args.label)
            total = store.count(status=args.status, label=args.label)
    if args.json:
        for row in rows:
            print(json_line(row))
    else:
        print(render_series(rows) if args.series else render_results(rows, total))
    print(DISCLAIMER, file=sys.stderr if args.json else sys.stdout)  # JSON stays pure
    return EXIT_OK


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns; every cell `printable` (stored text comes from clients and scanners)."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *rows]]
    return "\n".join(lines)


def render_results(rows: list[dict], total: int) -> str:
    """The table; a row whose artifact did not pass its parity check has a `*` after its status,
    explained under the table by the warning that artifact's run printed."""
    if not rows:
        return "no results stored"
    body, warnings = [], []
    for row in rows:
        answer = (f"{row['label']} {row['confidence']:.1%}" if row["label"] is not None
                  and row["confidence"] is not None else "-")
        detail = row["error"] or row["reason"] or ""
        status = STATUS_WORDS.get(row["status"], str(row["status"]))
        warning = _parity_warning(row)
        if warning:
            status += " *"
            if warning not in warnings:
                warnings.append(warning)
        body.append([str(row["id"]), row["created_at"].replace("T", " ").rstrip("Z"),
                     _short(row["source"], 40), answer, status, row["origin"],
                     _short(detail, 60)])
    table = _table(["id", "time (UTC)", "source", "result", "status", "from", "why"], body)
    notes = "".join(f"* {printable(warning)}\n" for warning in warnings)
    return f"{table}\n{notes}{len(rows)} of {total} shown, newest first"


def _parity_warning(row: dict) -> str | None:
    """The parity warning of the artifact that answered a row; None when it passed or the row
    does not say (written before the store recorded it)."""
    if row.get("artifact_parity") is None:
        return None
    return parity_warning(row.get("artifact") or "unknown", row["artifact_parity"])


def render_series(rows: list[dict]) -> str:
    if not rows:
        return "no DICOM series stored"
    body = []
    for row in rows:
        answer = (f"{row['label']} {row['confidence']:.1%}" if row.get("label")
                  and row.get("confidence") is not None else "-")
        body.append([str(row["id"]), str(row.get("last_received_at", "")).replace("T", " "),
                     str(row.get("modality") or "-"), str(row.get("instances", "")),
                     str(row.get("state", "")), answer,
                     STATUS_WORDS.get(row.get("status"), str(row.get("status")))
                     if row.get("state") == "complete" else "-",
                     _short(str(row.get("description") or ""), 30)])
    return _table(["id", "last received (UTC)", "modality", "slices", "state", "result", "status",
                   "description"], body)


def _short(text: str, width: int) -> str:
    """One line of at most `width` characters as shown (whitespace folded, the rest escaped)."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= width else text[:width - 3] + "..."
