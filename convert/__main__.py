"""Convert the trained Keras model into a TFLite + ONNX bundle, each artifact parity-checked.

exit status: 0 bundle written, gate passed; 1 parity gate failed: tflite-int8 failed (the bundle
is written with the passing artifacts), or every artifact did (nothing replaced: --out stays as
it was, the bundle is kept at <out>.rejected); 2 nothing written (missing model, unusable data or
options); 3 an unexpected error, a bug (a traceback says where).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from ct_edge import DISCLAIMER
from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError

from .errors import ParityError
from .formats import DEFAULT_ARTIFACT, FORMATS
from .pipeline import DEFAULT_CALIBRATION_IMAGES, PARITY_MD, BundleRejected, convert_model

DEFAULT_MODEL = Path("artifacts") / "model" / "model.keras"
DEFAULT_OUT = Path("artifacts") / "bundle"
EXIT_BUG = 3  # never 1, which says the parity gate failed


def _names(values: list[str]) -> list[str]:
    return [name for value in values for name in value.split(",") if name]


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(row.name for row in FORMATS)
    parser = argparse.ArgumentParser(
        prog="python -m convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m convert\n"
               "  python -m convert --data ../shared/data/covid19-xray\n"
               "  python -m convert --formats tflite-int8 onnx-fp32 --out /tmp/bundle\n\n"
               + __doc__.split("\n\n")[1])
    add = parser.add_argument
    add("--model", type=Path, default=DEFAULT_MODEL,
        help=f"trained Keras model; config.json beside it names the data (default: {DEFAULT_MODEL})")
    add("--out", type=Path, default=DEFAULT_OUT,
        help="bundle folder, replaced only when the new bundle is complete and has an artifact "
             f"that passed parity (default: {DEFAULT_OUT})")
    add("--data", type=Path, default=None,
        help="data folder for the test split and calibration (default: the one in config.json)")
    add("--formats", nargs="+", metavar="NAME", default=None,
        help=f"formats to write, space or comma separated (default: all: {names})")
    add("--calibration-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
        help="training images for int8 calibration, all when fewer "
             f"(default: {DEFAULT_CALIBRATION_IMAGES})")
    add("--threads", type=positive_int, default=None, metavar="N",
        help="inference threads for the parity runs (default: the engine's own choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Exception:  # a bug: keep its traceback, but do not pass for a parity failure (exit 1)
        traceback.print_exc()
        print("error: convert failed unexpectedly (a bug; the traceback above says where)",
              file=sys.stderr)
        return EXIT_BUG


def _run(args: argparse.Namespace) -> int:
    formats = _names(args.formats) if args.formats is not None else None
    status, folder = 0, args.out
    try:
        manifest = convert_model(args.model, args.out, args.data, formats, args.calibration_images,
                                 threads=args.threads)
    except ParityError as exc:
        manifest, status = exc.manifest, 1
        failure = exc
        if isinstance(exc, BundleRejected):
            folder = exc.folder
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    print()
    print((folder / PARITY_MD).read_text(encoding="utf-8").rstrip())
    files = len(manifest["artifacts"])
    print(f"\nwrote {folder}/: manifest.json, {PARITY_MD}, parity.json and {files} model file(s); "
          f"default artifact: {manifest['default'] or 'none'}")
    if status:
        for reason in failure.reasons:
            print(f"error: {reason}", file=sys.stderr)
        print(f"error: parity gate failed ({DEFAULT_ARTIFACT} is the intended default); the reports "
              f"above say which threshold broke", file=sys.stderr)
    print(DISCLAIMER)
    return status


if __name__ == "__main__":
    sys.exit(main())
