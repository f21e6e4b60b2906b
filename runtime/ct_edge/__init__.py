"""ct-edge: offline chest-scan classifier for edge devices. Not a diagnostic device."""

from __future__ import annotations

__version__ = "0.1.0"

LABELS: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")
# What a folder walk picks up, in training and in `ct-edge classify` alike (a file named on the
# command line is tried whatever its suffix; DICOM without a suffix is recognised by content).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", *DICOM_SUFFIXES)
# The status of a result in words, for people: the CLI table, `ct-edge results` and the web page
# (server/static/app.js holds the same words; tests/test_browser.py pins them) say it one way.
STATUS_WORDS: dict[str, str] = {"ok": "ok", "uncertain": "uncertain", "out_of_domain": "out of domain"}
DISCLAIMER = "ct-edge is a research tool, not a diagnostic device; do not use it for clinical decisions."

__all__ = ["DISCLAIMER", "LABELS", "STATUS_WORDS", "__version__"]
