"""Errors convert raises on purpose; the CLI maps ParityError to exit 1, the others to exit 2."""

from __future__ import annotations

from ct_edge.errors import CtEdgeError


class ConvertError(CtEdgeError):
    """Convert cannot run: missing model, unusable config, output folder or format list."""


class ParityError(ConvertError):
    """The bundle and its reports were written, but the parity gate failed.

    `reasons` holds one line per broken threshold; `manifest` is the manifest that was written.
    """

    def __init__(self, reasons: list[str], manifest: dict) -> None:
        self.reasons = list(reasons)
        self.manifest = manifest
        super().__init__("; ".join(self.reasons))
