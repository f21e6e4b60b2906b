"""`ct-edge info`: what a bundle holds and how it was verified."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .. import DISCLAIMER
from ..errors import REBUILD_BUNDLE
from .common import BUNDLE_HELP, EXIT_OK, EXIT_USAGE, RAW, error, json_line, printable

if TYPE_CHECKING:
    from ..bundle import Artifact, Bundle

EXAMPLES = """\
examples:
  ct-edge info
  ct-edge info --bundle artifacts/bundle
  ct-edge info --json | python -m json.tool

Shows the labels, input contract, preprocessing, calibration, every artifact (size, parity
status and figures, whether its sha256 matches) and the provenance. --json prints it as one
JSON object on one line. The disclaimer follows the text (on stderr with --json). Exit code 2
when the bundle cannot be read or a model file is missing or does not match its sha256.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("info", help="describe a model bundle", formatter_class=RAW,
                                 description="Show a bundle's manifest in readable form.",
                                 epilog=EXAMPLES)
    parser.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    parser.add_argument("--json", action="store_true",
                        help="the manifest and file checks as JSON (default: text)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import BundleError
    from ..inputs import display_path

    bundle = Bundle.load(args.bundle)
    # Every file the manifest names -> "ok" or why it cannot be used (the error line says it whole).
    found = {name: check_artifact(artifact) for name, artifact in bundle.artifacts.items()}
    # A malformed section may name no file: check_gate says why, under a stand-in name.
    gate_file = str(bundle.domain.get("file", "domain statistics")) \
        if "method" in bundle.domain else None
    if gate_file is not None:
        found[gate_file] = check_gate(bundle)
    checks = {name: short_check(found[name]) for name in bundle.artifacts}
    if args.json:
        print(json_line({"path": display_path(str(bundle.root)), "manifest": bundle.manifest,
                         "checks": checks,
                         "domain_gate": short_check(found[gate_file]) if gate_file else None,
                         "problems": {name: why for name, why in found.items() if why != "ok"}}))
    else:
        try:
            text = render_info(bundle, checks, found.get(gate_file or ""))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # Fields only `info` shows (provenance, parity figures) are checked here, not on load.
            raise BundleError(f"{bundle.root / 'manifest.json'}: malformed manifest "
                              f"({type(exc).__name__}: {exc}); {REBUILD_BUNDLE}") from None
        print("\n".join(printable(line) for line in text.split("\n")))
    print(DISCLAIMER, file=sys.stderr if args.json else sys.stdout)  # JSON stays pure
    bad = {name: why for name, why in found.items() if why != "ok"}
    if bad:
        text = "; ".join(f"{'artifact ' if name in bundle.artifacts else ''}{name!r}: {check}"
                         for name, check in bad.items())
        error(text if text.endswith(REBUILD_BUNDLE) else f"{text} - {REBUILD_BUNDLE}")
        return EXIT_USAGE
    return EXIT_OK


def check_artifact(artifact: Artifact) -> str:
    """'ok', 'missing', or why the model file cannot be used (its size or sha256, say)."""
    from ..errors import BundleError, one_line

    if not artifact.path.exists():
        return "missing"
    try:
        artifact.read_verified()
    except BundleError as exc:
        return one_line(exc)
    return "ok"


def short_check(check: str) -> str:
    """A file check as one word or two for the artifact table (the error line gives it whole)."""
    if check in ("ok", "missing", "?"):
        return check
    return "sha256 mismatch" if "does not match" in check else "unusable"


def check_gate(bundle: Bundle) -> str:
    """'ok', or why the domain gate's statistics cannot be used (the same check classify makes)."""
    from ..errors import BundleError, one_line

    try:
        bundle.feature_gate()
    except BundleError as exc:
        return one_line(exc)
    return "ok"


def render_info(bundle: Bundle, checks: dict[str, str], gate_check: str | None = None) -> str:
    """The manifest as aligned text; `checks` per artifact, `gate_check` for the domain gate's
    statistics file (None: the bundle has none)."""
    from ..preprocess import WINDOWS

    manifest = bundle.manifest
    spec = bundle.spec
    contract = manifest.get("input", {})
    shape = "x".join("N" if d in (None, -1) else str(d) for d in contract.get("shape", []))
    value_range = contract.get("range", [0, 1])
    named = next((name for name, window in WINDOWS.items() if window == spec.window), None)
    window = f"{spec.window[0]:g},{spec.window[1]:g} (width,level HU)" + (f", {named}" if named else "")
    lines = [
        ("bundle", str(bundle.root)),
        ("labels", ", ".join(bundle.labels)),
        ("input", f"{shape} {contract.get('dtype', '?')} {contract.get('layout', '?')}, "
                  f"values {value_range[0]:g}..{value_range[1]:g}"),
        ("preprocess", f"{spec.size}x{spec.size} px, aspect {spec.aspect}, {spec.resample} resize, "
                       f"contrast {getattr(spec, 'contrast', 'none')}, "
                       f"gray to {spec.channels} channel{'s' if spec.channels > 1 else ''}"),
        ("DICOM window", window),
        ("calibration", f"temperature {bundle.temperature:g}, uncertain below "
                        f"{bundle.uncertain_below:.1%}"),
        ("  chosen by", _operating_point_line(bundle.operating_point)),
        ("domain", _domain_line(bundle.domain) + (f"; {bundle.domain.get('file')}: "
                                                  f"{short_check(gate_check)}" if gate_check else "")),
        ("default", str(bundle.default or "(none: smallest artifact that passed parity)")),
        ("explain", _explain_line(manifest.get("explain"))),
    ]
    out = [f"{key:<13} {value}" for key, value in lines]

    header = ("artifact", "format", "precision", "size", "status", "file", "parity")
    rows = [(a.name, a.format, a.precision, _size(a.bytes), a.status,
             checks.get(a.name, "?"), _figures(a.parity)) for a in bundle.artifacts.values()]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    out.append("")
    for row in [header, *rows]:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False)]
        out.append(("  ".join(cells) + "  " + row[-1]).rstrip())
        artifact = bundle.artifacts.get(row[0])
        if artifact is not None and artifact.failures:
            out.append(" " * (widths[0] + 2) + "failures: " + "; ".join(artifact.failures))

    provenance = manifest.get("provenance") or {}
    if provenance:
        out.append("")
        out.append("provenance")
        width = max(map(len, provenance)) + 2
        for key, value in provenance.items():
            out.append(f"  {key:<{width}}{_plain(value)}")
    return "\n".join(out)


def _operating_point_line(point: dict) -> str:
    """How the uncertain threshold was chosen, and what it means on the data it was chosen on."""
    if not point:
        return "not recorded (an older bundle)"
    line = str(point.get("method", "?"))
    inner = point.get("operating_point")
    if isinstance(inner, dict) and isinstance(inner.get("coverage"), int | float):
        line += (f": on {inner.get('images', '?')} held-out images it answers "
                 f"{inner['coverage']:.0%} and is wrong on {inner.get('risk', 0):.1%} of those")
    elif point.get("data"):
        line += f" ({point['data']})"
    return line


def _domain_line(domain: dict) -> str:
    """What the bundle accepts: modality and the feature gate (an optional section)."""
    if not domain:
        return "not recorded (an older bundle: no out-of-domain check)"
    parts = [f"accepts {domain.get('modality_name') or domain.get('modality') or 'any modality'}"]
    if "method" in domain:
        threshold = domain.get("threshold")
        parts.append(f"gate {domain['method']} on {(domain.get('features') or {}).get('dim', '?')} "
                     f"features, out of domain above {_plain(threshold)} ({domain.get('rule', '?')})")
    else:
        parts.append("no feature gate (DICOM header rules only)")
    return ", ".join(parts)


def _explain_line(explain: object) -> str:
    """What the manifest says about heatmaps (an optional field: '?' where it is malformed)."""
    if explain is None:
        return "not recorded (explain uses class maps when the model exports them, else occlusion)"
    if not isinstance(explain, dict) or not explain:
        return "? (malformed)"
    maps = explain.get("class_maps")
    line = str(explain.get("method", "?"))
    if isinstance(maps, dict):
        shape = maps.get("shape")
        size = ("x".join(map(str, shape[1:3])) if isinstance(shape, list) and len(shape) == 4
                else "?")
        line += f" from the {size} class maps of layer {maps.get('layer', '?')}"
    if explain.get("fallback"):
        line += f", fallback {explain['fallback']}"
    return line


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# The parity figures worth a glance; `info --json` and the bundle's parity.md hold all of them.
_PARITY_FIGURES = {"accuracy": "accuracy", "agreement": "agreement", "max_abs_diff": "max|dp|"}


def _figures(parity: dict) -> str:
    shown = {key: value for key, value in parity.items() if key in _PARITY_FIGURES} or parity
    text = ", ".join(f"{_PARITY_FIGURES.get(key, key)} {_plain(value)}"
                     for key, value in shown.items() if not isinstance(value, dict | list))
    images = parity.get("test_images")
    # A figure says what it was measured on: the build's test split, not the world.
    return f"{text} (on {images} test images)" if text and isinstance(images, int) else text


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_plain(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(item) for item in value)
    return str(value)
