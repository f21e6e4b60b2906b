"""`ct-edge`: classify chest scans with a model bundle, or describe a bundle. Not a diagnostic device.

Exit codes: 0 every input classified, 1 some inputs failed (one `error: <path>: <problem>` line
each on stderr; the others are still classified), 2 usage or bundle error (one line saying what
to do). Start-up time matters on a device, so only the standard library is imported here at
module level; numpy, Pillow and the inference engine are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from . import DISCLAIMER, IMAGE_SUFFIXES, __version__
from .errors import CtEdgeError

if TYPE_CHECKING:  # imported lazily at run time
    from .bundle import Artifact, Bundle
    from .classifier import Classifier, Prediction

EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2
PROGRESS_MIN_FILES = 20
DECODE_WORKERS = 2  # decode the next file while the engine runs the current one

CLASSIFY_EXAMPLES = """\
examples:
  ct-edge classify scan.png
  ct-edge classify --bundle artifacts/bundle scans/            (a folder, recursively)
  ct-edge classify 'scans/**/*.png' --top-k 2                  (a glob, quoted or not)
  ct-edge classify --json scans/ > results.jsonl               (one JSON object per input)
  ct-edge classify --csv --quiet scans/ > results.csv
  ct-edge classify --window mediastinum --backend onnx slice.dcm

output: a table (file, label, confidence, the other classes); '?' marks an uncertain result
(confidence below the bundle's threshold). --json objects hold: path, label, confidence,
uncertain, probabilities {label: p} and error (null, or why the input was not classified).
exit codes: 0 all classified, 1 some inputs failed (one 'error:' line each on stderr),
2 usage or bundle error.
"""

INFO_EXAMPLES = """\
examples:
  ct-edge info
  ct-edge info --bundle artifacts/bundle
  ct-edge info --json | python -m json.tool

Shows the labels, input contract, preprocessing, calibration, every artifact (size, parity
status and figures, whether its sha256 matches) and the provenance. Exit code 2 when the bundle
cannot be read or a model file is missing or does not match its sha256.
"""

MAIN_EXAMPLES = """\
examples:
  ct-edge classify scan.png
  ct-edge classify --json scans/
  ct-edge info --bundle artifacts/bundle
  ct-edge explain scan.png -o heatmap.png
  ct-edge batch archive/ --out results/     (Parquet, on Ray: needs ct-edge[ray])
  ct-edge classify --help

The bundle is found at --bundle DIR, else $CT_EDGE_BUNDLE, else ./artifacts/bundle.
""" + DISCLAIMER


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (also used by the training/convert CLIs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _window(text: str) -> tuple[float, float]:
    from .preprocess import parse_window

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The `ct-edge` argument parser (every option's help states its default)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ct-edge", formatter_class=raw, epilog=MAIN_EXAMPLES,
                     description="Offline chest-scan classifier (COVID-19 / Normal / Viral Pneumonia).")
    parser.add_argument("--version", action="version", version=f"ct-edge {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    bundle_help = "model bundle folder (default: $CT_EDGE_BUNDLE, then ./artifacts/bundle)"
    classify = commands.add_parser(
        "classify", help="classify image files, folders or globs", formatter_class=raw,
        description="Classify PNG, JPEG and DICOM files; folders are searched recursively.",
        epilog=CLASSIFY_EXAMPLES)
    classify.add_argument("paths", nargs="+", metavar="PATH", help="file, folder or glob pattern")
    classify.add_argument("--bundle", metavar="DIR", help=bundle_help)
    classify.add_argument("--artifact", metavar="NAME",
                          help="artifact to run, as listed by 'ct-edge info' (default: the bundle's "
                               "default, else the smallest that passed its parity check)")
    classify.add_argument("--backend", choices=("tflite", "onnx"),
                          help="engine: tflite (LiteRT) or onnx (onnxruntime) (default: the format "
                               "of the bundle's default artifact)")
    classify.add_argument("--threads", type=positive_int, metavar="N",
                          help="engine threads (default: the engine's own choice)")
    classify.add_argument("--top-k", type=positive_int, metavar="K",
                          help="classes reported per input: the label and K-1 others "
                               "(default: all classes)")
    classify.add_argument("--window", type=_window, metavar="lung|mediastinum|W,L",
                          help="CT window for DICOM, in Hounsfield units: a name or width,level "
                               "(default: the bundle's, normally lung = 1500,-600)")
    output = classify.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout, one object per input (default: a table)")
    output.add_argument("--csv", action="store_true",
                        help="CSV on stdout with a header row (default: a table)")
    classify.add_argument("--quiet", "-q", action="store_true",
                          help="no header, progress bar, notes or disclaimer; errors are still "
                               "printed (default: off)")
    classify.set_defaults(handler=cmd_classify)

    from .batch import add_batch_parser  # the parser only: Ray is imported when `batch` runs

    add_batch_parser(commands, raw, bundle_help)

    info = commands.add_parser("info", help="describe a model bundle", formatter_class=raw,
                               description="Show a bundle's manifest in readable form.",
                               epilog=INFO_EXAMPLES)
    info.add_argument("--bundle", metavar="DIR", help=bundle_help)
    info.add_argument("--json", action="store_true",
                      help="the manifest and file checks as JSON (default: text)")
    info.set_defaults(handler=cmd_info)
    add_explain_parser(commands, raw, bundle_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ct-edge` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("ct-edge: error: choose a command: classify, info, explain or batch (see 'ct-edge --help')",
              file=sys.stderr)
        return EXIT_USAGE
    from .errors import CtEdgeError

    try:
        return args.handler(args)
    except CtEdgeError as exc:  # BundleError, and anything else raised on purpose
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ct-edge classify --json scans/ | head -1`
        _silence_stdout()
        return EXIT_INPUT


# --- classify ------------------------------------------------------------------------------


def cmd_classify(args: argparse.Namespace) -> int:
    import warnings

    from PIL import Image

    from .classifier import Classifier

    # The library rejects images over its own pixel limit; Pillow's warning would only be noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    with _native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact,
                                            backend=args.backend, threads=args.threads,
                                            window=args.window)
    artifact = classifier.artifact
    if args.backend and artifact.format != args.backend:
        _error(f"artifact {artifact.name!r} is a {artifact.format} model, not {args.backend}; "
               "drop --backend or choose another --artifact (see 'ct-edge info')")
        return EXIT_USAGE
    if artifact.status != "passed" and not args.quiet:
        print(f"warning: artifact {artifact.name!r} has parity status {artifact.status!r}; its "
              "answers may differ from the reference model", file=sys.stderr)

    items = expand_inputs(args.paths)
    labels = classifier.labels
    top_k = min(args.top_k or len(labels), len(labels))
    if args.json:
        writer: _Writer = _JsonWriter(sys.stdout, top_k)
    elif args.csv:
        writer = _CsvWriter(sys.stdout, labels, top_k)
    else:
        writer = _TableWriter(sys.stdout, [path for path, _ in items], labels, top_k,
                              classifier.bundle.uncertain_below, args.quiet)
    writer.start()
    progress = Progress(len(items), sys.stderr,
                        enabled=not args.quiet and len(items) > PROGRESS_MIN_FILES
                        and _isatty(sys.stderr))
    failed = 0
    try:
        for prediction in predictions(classifier, items):
            progress.clear()
            if prediction.error is not None:
                failed += 1
                _error(f"{prediction.path}: {prediction.error}")
            writer.row(prediction)
            progress.update()
    finally:
        progress.close()
    writer.finish(failed, len(items))
    if not args.quiet and not isinstance(writer, _TableWriter):
        print(DISCLAIMER, file=sys.stderr)  # stdout stays pure JSON / CSV
    return EXIT_INPUT if failed else EXIT_OK


def expand_inputs(args: Iterable[str]) -> list[tuple[str, str | None]]:
    """Command-line paths -> (path, error or None), in order, without duplicates.

    A folder is searched recursively for image files (hidden files and folders skipped); a path
    that does not exist but holds a wildcard is a glob. A folder with no images and a glob that
    matches nothing are input errors. Missing or unreadable files are left to the library, which
    says what is wrong with them.
    """
    import glob

    items: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: str, error: str | None = None) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            items.append((path, error))

    def add_folder(folder: str) -> None:
        problems: list[OSError] = []
        found = list(_walk(folder, problems.append))
        for problem in problems:
            add(problem.filename or folder, f"cannot read folder ({problem.strerror or problem})")
        if not found and not problems:
            add(folder, "folder contains no PNG, JPEG or DICOM images")
        for path in found:
            add(path)

    for arg in args:
        if os.path.isdir(arg):
            add_folder(arg)
        elif os.path.lexists(arg) or not any(c in arg for c in "*?["):
            add(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                add(arg, "no files match this pattern")
            for match in matches:
                if os.path.isdir(match):
                    add_folder(match)
                else:
                    add(match)
    return items


def _walk(folder: str, onerror: Any) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):  # also skips macOS '._scan.png' resource-fork files
                continue
            path = os.path.join(root, name)
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES or (not suffix and _has_dicom_magic(path)):
                yield path


def _has_dicom_magic(path: str) -> bool:
    """DICOM files often have no suffix; their bytes 128..132 say 'DICM'."""
    if not os.path.isfile(path):  # opening a FIFO would block
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def predictions(classifier: Classifier, items: list[tuple[str, str | None]],
                workers: int = DECODE_WORKERS) -> Iterator[Prediction]:
    """One Prediction per item, in order; files are decoded a few ahead in a small thread pool.

    Pillow and pydicom's numpy work release the GIL and the engine call is serialised by the
    backend's lock, so decoding the next file overlaps inference on the current one.
    """
    if workers <= 1 or len(items) <= 1:
        yield from (_classify_one(classifier, path, error) for path, error in items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="ct-edge-decode") as pool:
        pending: deque = deque()
        queue = iter(items)
        # A bounded look-ahead, so Ctrl-C or a closed pipe waits for a few files, not all of them.
        for path, error in queue:
            pending.append(pool.submit(_classify_one, classifier, path, error))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            following = next(queue, None)
            if following is not None:
                pending.append(pool.submit(_classify_one, classifier, *following))
            yield result


def _classify_one(classifier: Classifier, path: str, error: str | None) -> Prediction:
    from .classifier import Prediction

    if error is None:
        try:
            # predict_many turns an InputError into a Prediction with `error` set.
            prediction = next(iter(classifier.predict_many([path])))
        except CtEdgeError:
            raise  # a model that cannot run is the bundle's problem (exit 2), not this file's
        except Exception as exc:  # a bug, but one bad file must not stop the batch
            prediction = Prediction(path=path, label=None, probabilities={},
                                    error=f"unexpected {type(exc).__name__}: {exc} "
                                          "(please report this file)")
        prediction.path = path  # as the user wrote it, not normalised by Path()
        if prediction.error is not None:
            prediction.error = " ".join(prediction.error.split())
        return prediction
    return Prediction(path=path, label=None, probabilities={}, error=error)


def ranked(prediction: Prediction, top_k: int) -> list[tuple[str, float]]:
    """The top_k (label, probability) pairs, most probable first (ties in bundle label order)."""
    return sorted(prediction.probabilities.items(), key=lambda item: -item[1])[:top_k]


class _Writer:
    def start(self) -> None:
        pass

    def row(self, prediction: Prediction) -> None:
        raise NotImplementedError

    def finish(self, failed: int, total: int) -> None:
        pass


class _JsonWriter(_Writer):
    """JSON Lines: one object per input, flushed per line so a pipe sees results as they come."""

    def __init__(self, stream: IO[str], top_k: int) -> None:
        self.stream, self.top_k = stream, top_k

    def row(self, prediction: Prediction) -> None:
        import json

        self.stream.write(json.dumps(json_record(prediction, self.top_k), ensure_ascii=False) + "\n")
        self.stream.flush()


def json_record(prediction: Prediction, top_k: int) -> dict[str, Any]:
    """The --json object of one input (the documented contract; tests pin its keys)."""
    ok = prediction.error is None
    return {"path": prediction.path,
            "label": prediction.label,
            "confidence": round(prediction.confidence, 6) if ok else None,
            "uncertain": prediction.uncertain if ok else None,
            "probabilities": {label: round(p, 6) for label, p in ranked(prediction, top_k)},
            "error": prediction.error}


class _CsvWriter(_Writer):
    """One column per class (bundle order); classes outside the top-k are left empty."""

    def __init__(self, stream: IO[str], labels: tuple[str, ...], top_k: int) -> None:
        import csv

        self.labels, self.top_k = labels, top_k
        self.stream = stream
        self.csv = csv.writer(stream, lineterminator="\n")

    def start(self) -> None:
        self.csv.writerow(["path", "label", "confidence", "uncertain", *self.labels, "error"])

    def row(self, prediction: Prediction) -> None:
        ok = prediction.error is None
        shown = dict(ranked(prediction, self.top_k))
        self.csv.writerow([prediction.path, prediction.label or "",
                           f"{prediction.confidence:.6f}" if ok else "",
                           ("true" if prediction.uncertain else "false") if ok else "",
                           *(f"{shown[label]:.6f}" if label in shown else "" for label in self.labels),
                           prediction.error or ""])
        self.stream.flush()


class _TableWriter(_Writer):
    """An aligned table streamed row by row: widths come from the input list, known up front."""

    def __init__(self, stream: IO[str], paths: list[str], labels: tuple[str, ...], top_k: int,
                 uncertain_below: float, quiet: bool) -> None:
        self.stream, self.top_k, self.quiet = stream, top_k, quiet
        self.uncertain_below = uncertain_below
        self.file_width = max([len("FILE"), *map(len, paths)])
        if _isatty(stream):  # on a terminal, keep rows on one line by shortening long paths
            import shutil

            room = shutil.get_terminal_size().columns - 2 * max(map(len, labels)) - 40
            self.file_width = min(self.file_width, max(24, room))
        self.label_width = max(len("LABEL"), *(len(label) + 1 for label in labels))
        self.uncertain_seen = False
        self.rows = 0

    def _line(self, file: str, label: str, confidence: str, others: str) -> None:
        if len(file) > self.file_width:
            file = "..." + file[-(self.file_width - 3):]
        line = f"{file:<{self.file_width}}  {label:<{self.label_width}}  {confidence:>6}"
        self.stream.write((f"{line}  {others}" if others else line).rstrip() + "\n")
        self.stream.flush()

    def start(self) -> None:
        if not self.quiet:
            self._line("FILE", "LABEL", "CONF", "OTHERS" if self.top_k > 1 else "")

    def row(self, prediction: Prediction) -> None:
        if prediction.error is not None:  # reported on stderr, one line per input
            return
        best, *others = ranked(prediction, self.top_k)
        label = best[0] + ("?" if prediction.uncertain else "")
        self.uncertain_seen |= prediction.uncertain
        self._line(prediction.path, label, f"{best[1]:.1%}",
                   ", ".join(f"{name} {p:.1%}" for name, p in others))
        self.rows += 1

    def finish(self, failed: int, total: int) -> None:
        if self.quiet:
            return
        if self.uncertain_seen:
            self.stream.write(f"? uncertain: confidence below {self.uncertain_below:.0%}; "
                              "treat as inconclusive\n")
        if failed:
            self.stream.write(f"{failed} of {total} inputs could not be classified "
                              "(see the error lines)\n")
        self.stream.write(DISCLAIMER + "\n")
        self.stream.flush()


class Progress:
    """A one-line progress bar on a terminal's stderr (the runtime does not depend on tqdm)."""

    def __init__(self, total: int, stream: IO[str], enabled: bool = True,
                 interval: float = 0.1) -> None:
        self.total, self.stream, self.enabled, self.interval = total, stream, enabled, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.width = 0  # characters currently drawn

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self.draw(now)

    def draw(self, now: float | None = None) -> None:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        fraction = self.done / self.total if self.total else 1.0
        bar = "#" * int(fraction * 24)
        text = f"[{bar:<24}] {self.done}/{self.total}  {self.done / elapsed:.1f} files/s"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        """Erase the bar before other output shares the terminal; the next update redraws it."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def close(self) -> None:
        self.clear()


# --- info ------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .bundle import Bundle
    from .errors import BundleError

    bundle = Bundle.load(args.bundle)
    checks = {name: check_artifact(artifact) for name, artifact in bundle.artifacts.items()}
    if args.json:
        print(json.dumps({"path": str(bundle.root), "manifest": bundle.manifest, "checks": checks},
                         indent=2, ensure_ascii=False))
    else:
        try:
            text = render_info(bundle, checks)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # Fields only `info` shows (provenance, parity figures) are checked here, not on load.
            raise BundleError(f"{bundle.root / 'manifest.json'}: malformed manifest "
                              f"({type(exc).__name__}: {exc}); rebuild the bundle") from None
        print(text)
    bad = {name: check for name, check in checks.items() if check != "ok"}
    if bad:
        _error("; ".join(f"artifact {name!r}: {check}" for name, check in bad.items())
               + " - rebuild the bundle with `make convert`")
        return EXIT_USAGE
    return EXIT_OK


def check_artifact(artifact: Artifact) -> str:
    """'ok', 'missing' or 'sha256 mismatch' for one model file."""
    from .errors import BundleError

    if not artifact.path.is_file():
        return "missing"
    try:
        artifact.read_verified()
    except BundleError:
        return "sha256 mismatch"
    return "ok"


def render_info(bundle: Bundle, checks: dict[str, str]) -> str:
    """The manifest as aligned text."""
    from .preprocess import WINDOWS

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
                        f"{bundle.uncertain_below:.0%}"),
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
    return ", ".join(f"{_PARITY_FIGURES.get(key, key)} {_plain(value)}" for key, value in shown.items()
                     if not isinstance(value, dict | list))


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


# --- explain ---------------------------------------------------------------------------------

EXPLAIN_EXAMPLES = """\
examples:
  ct-edge explain scan.png -o heatmap.png
  ct-edge explain --json scan.png                        (no figure: where the heat is, as JSON)
  ct-edge explain 'scans/*/*.png' -o heatmaps/           (several inputs: -o is a folder)
  ct-edge explain --method occlusion scan.png -o occlusion.png

The figure (520x320 px) shows the input as the model saw it and the heatmap over it, with the
label and probabilities. Methods: cam (class-activation maps the artifact exports: one inference)
or occlusion (a patch slides over the image: ~170 inferences, any model); default: cam when the
artifact has them. --json objects (one per input) hold: path, label, confidence, uncertain,
probabilities, target (the class explained), method, artifact, peak {x, y in input-image pixels,
x_rel, y_rel, value}, lung_share (share of heat inside the estimated lung fields; null when they
cannot be estimated, e.g. most chest films), lung_area, border_share (heat in the outer 8% band),
border_area (that band's share of the image: what an even heatmap would give), output (the PNG
written, or null), timings_ms and error.
exit codes: 0 all explained, 1 some inputs failed (one 'error:' line each on stderr),
2 usage or bundle error.
"""


def add_explain_parser(commands: Any, formatter: Any, bundle_help: str) -> None:
    explain = commands.add_parser(
        "explain", help="draw where in an image the answer comes from (heatmap)",
        formatter_class=formatter, epilog=EXPLAIN_EXAMPLES,
        description="Classify images and draw a heatmap of the evidence over each one.")
    explain.add_argument("paths", nargs="+", metavar="IMAGE", help="file, folder or glob pattern")
    explain.add_argument("-o", "--output", metavar="PNG|DIR",
                         help="where to write the figure: a .png file for one input, a folder "
                              "(created; one <name>.png per input) for several (default: none, "
                              "then --json is required)")
    explain.add_argument("--bundle", metavar="DIR", help=bundle_help)
    explain.add_argument("--artifact", metavar="NAME",
                         help="artifact to run (default: the bundle's default)")
    explain.add_argument("--method", choices=("cam", "occlusion"),
                         help="heatmap method (default: cam when the artifact has class maps, "
                              "else occlusion)")
    explain.add_argument("--target", metavar="LABEL",
                         help="class to explain (default: the predicted one)")
    explain.add_argument("--window", type=_window, metavar="lung|mediastinum|W,L",
                         help="CT window for DICOM (default: the bundle's)")
    explain.add_argument("--threads", type=positive_int, metavar="N",
                         help="engine threads (default: the engine's own choice)")
    explain.add_argument("--json", action="store_true",
                         help="JSON Lines on stdout, one object per input (default: one line of "
                              "text per input)")
    explain.add_argument("--quiet", "-q", action="store_true",
                         help="no notes or disclaimer; errors are still printed (default: off)")
    explain.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from .classifier import Classifier
    from .errors import InputError
    from .explain import choose_method, explain, save

    if args.output is None and not args.json:
        _error("nothing to write: pass -o FILE.png (or -o DIR/ for several inputs) and/or --json")
        return EXIT_USAGE
    items = expand_inputs(args.paths)
    outputs = explain_outputs([path for path, _ in items], args.output)
    if isinstance(outputs, str):
        _error(outputs)
        return EXIT_USAGE
    with _native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact,
                                            threads=args.threads, window=args.window)
    method = choose_method(classifier, args.method)  # BundleError (exit 2) when cam is missing
    if args.target is not None and args.target not in classifier.labels:
        _error(f"--target {args.target!r} is not a class of this bundle; choose one of: "
               + ", ".join(classifier.labels))
        return EXIT_USAGE
    failed = 0
    for (path, problem), output in zip(items, outputs, strict=True):
        try:
            if problem is not None:
                raise InputError(path, problem)
            result = explain(classifier, path, method=method, target=args.target)
        except InputError as exc:
            failed += 1
            _error(f"{path}: {' '.join(exc.problem.split())}")
            if args.json:
                print(json.dumps({"path": path, "label": None, "output": None,
                                  "error": exc.problem}, ensure_ascii=False), flush=True)
            continue
        result.path = path
        if output is not None:
            try:
                save(result, output)
            except OSError as exc:
                _error(f"cannot write {output}: {exc.strerror or exc}; choose another -o")
                return EXIT_USAGE
        if args.json:
            record = {**result.to_dict(), "output": output, "error": None}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(explain_line(result, output), flush=True)
    if not args.quiet:
        print(DISCLAIMER, file=sys.stderr if args.json else sys.stdout)
    return EXIT_INPUT if failed else EXIT_OK


def explain_outputs(paths: list[str], output: str | None) -> list[str | None] | str:
    """One PNG path per input (None without -o), or a usage error message.

    -o is a folder when it exists as one, ends with '/', or there are several inputs; in a folder
    each figure is named after its input, with the parent folder's name prefixed when two inputs
    share a name (e.g. test/COVID-19/00000.png -> COVID-19_00000.png).
    """
    if output is None:
        return [None] * len(paths)
    folder = os.path.isdir(output) or output.endswith(("/", os.sep)) or len(paths) > 1
    if not folder:
        parent = os.path.dirname(output) or "."
        if not os.path.isdir(parent):
            return f"-o {output}: folder {parent} does not exist"
        return [output]
    if os.path.exists(output) and not os.path.isdir(output):
        return f"-o {output} is a file; several inputs need a folder (e.g. -o heatmaps/)"
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        return f"cannot create folder {output}: {exc.strerror or exc}"
    stems = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in paths]
    names, used = [], set()
    for path, stem in zip(paths, stems, strict=True):
        name = stem
        if stems.count(stem) > 1:
            name = f"{os.path.basename(os.path.dirname(os.path.normpath(path)))}_{stem}"
        name = "_".join(name.split()) or "image"
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name}_{k}", k + 1
        used.add(unique)
        names.append(os.path.join(output, unique + ".png"))
    return names


def explain_line(result: Any, output: str | None) -> str:
    """The text line of one explained input."""
    peak = result.peak
    shares = [f"peak at x={peak['x']:.0f} y={peak['y']:.0f}"]
    if result.lung_share is not None:
        shares.append(f"in lungs {result.lung_share:.0%}")
    if result.border_share is not None:
        shares.append(f"at border {result.border_share:.0%}")
    label = result.label + ("?" if result.uncertain else "")
    head = f"{output}: " if output else f"{result.path}: "
    return (f"{head}{label} {result.probabilities[result.label]:.1%}, heat for {result.target} "
            f"({result.method}): " + ", ".join(shares))


# --- helpers ---------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


@contextmanager
def _native_info_silenced() -> Iterator[None]:
    """Drop the INFO lines native engines print on fd 2 while loading, keep anything else.

    LiteRT's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight
    to the process's stderr; from the CLI, stderr is reserved for errors and warnings.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a real file
        yield
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not line.startswith("INFO: ")]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
