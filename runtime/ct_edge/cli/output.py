"""How `ct-edge classify` prints results: a table for people, JSON Lines or CSV for scripts.

Every format carries the same `status` ("ok", "uncertain", "out_of_domain") and `reason`.
"""

from __future__ import annotations

import shutil
from typing import IO, TYPE_CHECKING

from .. import DISCLAIMER, STATUS_WORDS
from ..inputs import display_path
from .common import isatty, json_line, printable

if TYPE_CHECKING:
    from ..classifier import Prediction


class Writer:
    """Streams one row per Prediction; `finish` may print a footer."""

    def start(self) -> None:
        pass

    def row(self, prediction: Prediction) -> None:
        raise NotImplementedError

    def finish(self, failed: int, total: int) -> None:
        pass


class JsonWriter(Writer):
    """JSON Lines: one `Prediction.to_dict()` per input, flushed per line for pipes."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.stream, self.top_k = stream, top_k

    def row(self, prediction: Prediction) -> None:
        record = {**prediction.to_dict(self.top_k), "path": display_path(prediction.path)}
        self.stream.write(json_line(record) + "\n")
        self.stream.flush()


class CsvWriter(Writer):
    """One column per class (bundle order); classes outside the top-k are left empty."""

    def __init__(self, stream: IO[str], labels: tuple[str, ...], top_k: int) -> None:
        import csv

        self.labels, self.top_k = labels, top_k
        self.stream = stream
        self.csv = csv.writer(stream, lineterminator="\n")

    def start(self) -> None:
        self.csv.writerow(["path", "label", "confidence", "status", "reason", *self.labels, "error"])

    def row(self, prediction: Prediction) -> None:
        record = prediction.to_dict(self.top_k)
        shown = record["probabilities"]
        confidence = record["confidence"]
        self.csv.writerow([display_path(prediction.path), prediction.label or "",
                           "" if confidence is None else f"{confidence:.6f}",
                           prediction.status or "", prediction.reason or "",
                           *(f"{shown[label]:.6f}" if label in shown else "" for label in self.labels),
                           prediction.error or ""])
        self.stream.flush()


class TableWriter(Writer):
    """An aligned table streamed row by row: widths come from the input list, known up front;
    file names are `printable`, as in the error lines."""

    def __init__(self, stream: IO[str], paths: list[str], labels: tuple[str, ...], top_k: int,
                 quiet: bool, note: str | None = None) -> None:
        self.stream, self.top_k, self.quiet, self.note = stream, top_k, quiet, note
        self.file_width = max([len("FILE"), *(len(printable(path)) for path in paths)])
        if isatty(stream):  # on a terminal, keep rows on one line by shortening long paths
            room = shutil.get_terminal_size().columns - 2 * max(map(len, labels)) - 56
            self.file_width = min(self.file_width, max(24, room))
        self.label_width = max(len("LABEL"), *map(len, labels))
        self.status_width = max(map(len, STATUS_WORDS.values()))
        self.seen: dict[str, str] = {}  # status -> one reason, for the footer
        self.rows = 0

    def _line(self, file: str, label: str, confidence: str, status: str, others: str) -> None:
        file = printable(file)
        if len(file) > self.file_width:
            file = "..." + file[-(self.file_width - 3):]
        line = (f"{file:<{self.file_width}}  {label:<{self.label_width}}  {confidence:>6}  "
                f"{status:<{self.status_width}}")
        self.stream.write((f"{line}  {others}" if others else line).rstrip() + "\n")
        self.stream.flush()

    def start(self) -> None:
        if not self.quiet:
            self._line("FILE", "LABEL", "CONF", "STATUS", "OTHERS / REASON")

    def row(self, prediction: Prediction) -> None:
        if prediction.error is not None:  # reported on stderr, one line per input
            return
        status = prediction.status or "ok"
        self.seen.setdefault(status, prediction.reason or "")
        if prediction.label is None:  # out of domain: no label, the reason instead
            self._line(prediction.path, "-", "-", STATUS_WORDS.get(status, status),
                       prediction.reason or "")
        else:
            best, *others = prediction.ranked(self.top_k)
            self._line(prediction.path, best[0], f"{best[1]:.1%}", STATUS_WORDS.get(status, status),
                       ", ".join(f"{name} {p:.1%}" for name, p in others))
        self.rows += 1

    def finish(self, failed: int, total: int) -> None:
        if self.quiet:
            return
        if "uncertain" in self.seen:
            why = self.seen["uncertain"] or "its confidence is low"
            self.stream.write(f"uncertain: a label is given but {why}; treat it as inconclusive\n")
        if "out_of_domain" in self.seen:
            self.stream.write("out of domain: the input is not like the images this model was "
                              "trained on; no label is given\n")
        if self.note:
            self.stream.write(self.note + "\n")
        if failed:
            self.stream.write(f"{failed} of {total} inputs could not be classified "
                              "(see the error lines)\n")
        self.stream.write(DISCLAIMER + "\n")
        self.stream.flush()
