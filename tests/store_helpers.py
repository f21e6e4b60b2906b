"""Results stores for tests: a row with every field filled, and a store whose rows cannot be read."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from ct_edge.classifier import Prediction
from ct_edge.store import Store


def add_row(store: Store, **overrides) -> int:
    fields = {"source": "scan.png", "origin": "test", "status": "ok", "label": "Normal",
              "probabilities": {"COVID-19": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1},
              "timings_ms": {"inference": 1.5}, "sha256": "ab" * 32}
    return store.add(**{**fields, **overrides})


def damage_store(data_dir: Path, rows: int = 300) -> None:
    """A store of `rows` results, checkpointed, whose later pages (the rows, not the schema) are
    overwritten with random bytes: it opens, and reading the rows fails."""
    with Store(data_dir) as store:
        store.add_predictions([(Prediction(path=f"scan{i:04d}.png" * 4, label="Normal", status="ok",
                                           probabilities={"Normal": 0.9}, reason="r" * 40),
                                "ab" * 32) for i in range(rows)], origin="test")
    db = sqlite3.connect(data_dir / "results.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    path = data_dir / "results.sqlite3"
    data = bytearray(path.read_bytes())
    noise = random.Random(7)
    for start in range(len(data) // 2 // page * page, len(data), page):
        data[start + 100:start + page - 100] = noise.randbytes(page - 200)
    path.write_bytes(bytes(data))
