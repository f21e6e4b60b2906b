"""`ct-edge classify`: classify files, folders or globs; a table, JSON Lines or CSV."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import DISCLAIMER
from .common import (
    BUNDLE_HELP,
    DOMAIN_CHECK_OFF,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    PROGRESS_MIN_FILES,
    RAW,
    Progress,
    error,
    isatty,
    native_info_silenced,
    positive_int,
    printable,
    warn,
    window_arg,
)

EXAMPLES = """\
examples:
  ct-edge classify scan.png
  ct-edge classify --bundle artifacts/bundle scans/            (a folder, recursively)
  ct-edge classify 'scans/**/*.png' --top-k 2                  (a glob, quoted or not)
  ct-edge classify --json scans/ > results.jsonl               (one JSON object per input)
  ct-edge classify --csv --quiet scans/ > results.csv
  ct-edge classify --window mediastinum --backend onnx slice.dcm

output: a table (file, label, confidence, status, the other classes). Every result has a
status: 'ok' (answered), 'uncertain' (a label, but confidence below the bundle's operating
point, or a bundle with no domain gate: treat as inconclusive) or 'out_of_domain' (not like
the images the model was trained on, e.g. another modality or a photograph: no label, and a
reason). --json objects hold: path,
label and confidence (both null when out_of_domain), status, reason, probabilities {label: p,
in the bundle's label order},
timings_ms and error (null, or why the input could not be read).
exit codes: 0 all inputs processed (flagged ones included), 1 some inputs could not be read
(one 'error:' line each on stderr), 2 usage or bundle error.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "classify", help="classify image files, folders or globs", formatter_class=RAW,
        description="Classify PNG, JPEG and DICOM files; folders are searched recursively.",
        epilog=EXAMPLES)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file, folder or glob pattern")
    parser.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    parser.add_argument("--artifact", metavar="NAME",
                        help="artifact to run, as listed by 'ct-edge info' (default: the bundle's "
                             "default, else the smallest that passed its parity check)")
    parser.add_argument("--backend", choices=("tflite", "onnx"),
                        help="engine: tflite (LiteRT) or onnx (onnxruntime) (default: the format "
                             "of the bundle's default artifact)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="engine threads (default: the engine's own choice)")
    parser.add_argument("--top-k", type=positive_int, metavar="K",
                        help="classes reported per input: the label and K-1 others "
                             "(default: all classes)")
    parser.add_argument("--window", type=window_arg, metavar="lung|mediastinum|W,L",
                        help="CT window for DICOM, in Hounsfield units: a name or width,level "
                             "(default: the bundle's, normally lung = 1500,-600)")
    parser.add_argument("--no-domain-check", action="store_true",
                        help="research use only: label every input, even one unlike the training "
                             "images; results then say the check was off (default: check)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout, one object per input (default: a table)")
    output.add_argument("--csv", action="store_true",
                        help="CSV on stdout with a header row (default: a table)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no header, progress bar, notes or disclaimer; errors are still "
                             "printed (default: off)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..classifier import Classifier
    from ..inputs import expand_inputs, predictions
    from .output import CsvWriter, JsonWriter, TableWriter, Writer

    with native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact,
                                            backend=args.backend, threads=args.threads,
                                            window=args.window,
                                            domain_check=not args.no_domain_check)
    artifact = classifier.artifact
    if args.backend and artifact.format != args.backend:
        error(f"artifact {artifact.name!r} is a {artifact.format} model, not {args.backend}; "
              "drop --backend or choose another --artifact (see 'ct-edge info')")
        return EXIT_USAGE
    if not args.quiet:
        warn(artifact.parity_warning)
    if args.no_domain_check and not args.quiet:
        print(DOMAIN_CHECK_OFF, file=sys.stderr)

    items = expand_inputs(args.paths)
    labels = classifier.labels
    top_k = min(args.top_k or len(labels), len(labels))
    if args.json:
        writer: Writer = JsonWriter(sys.stdout, top_k)
    elif args.csv:
        writer = CsvWriter(sys.stdout, labels, top_k)
    else:
        writer = TableWriter(sys.stdout, [path for path, _ in items], labels, top_k, args.quiet)
    writer.start()
    progress = Progress(len(items), sys.stderr,
                        enabled=not args.quiet and len(items) > PROGRESS_MIN_FILES
                        and isatty(sys.stderr))
    failed = 0
    try:
        for prediction in predictions(classifier, items):
            progress.clear()
            if prediction.error is not None:
                failed += 1
                error(f"{printable(prediction.path)}: {prediction.error}")
            writer.row(prediction)
            progress.update()
    finally:
        progress.close()
    writer.finish(failed, len(items))
    if not args.quiet and not isinstance(writer, TableWriter):
        print(DISCLAIMER, file=sys.stderr)  # stdout stays pure JSON / CSV
    return EXIT_INPUT if failed else EXIT_OK
