"""What the `ct-edge batch` tests share: the rows a job wrote, by input path."""

from __future__ import annotations

from pathlib import Path

from ct_edge.batch import parts


def rows_by_path(out: Path) -> dict[str, dict]:
    rows = parts.read_results(out).to_pylist()
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "an input was scored twice"
    return {row["path"]: row for row in rows}
