"""ct-edge: offline chest-scan classifier for edge devices. Not a diagnostic device."""

from __future__ import annotations

__version__ = "0.1.0"

LABELS: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")
DISCLAIMER = "ct-edge is a research tool, not a diagnostic device; do not use it for clinical decisions."

__all__ = ["DISCLAIMER", "LABELS", "__version__"]
