"""`ct-edge explain`: a heatmap of where in an image the answer comes from."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import DISCLAIMER
from ..inputs import display_path
from .common import (
    BUNDLE_HELP,
    DOMAIN_CHECK_OFF,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    RAW,
    error,
    json_line,
    native_info_silenced,
    positive_int,
    printable,
    warn,
    window_arg,
)

EXAMPLES = """\
examples:
  ct-edge explain scan.png -o heatmap.png
  ct-edge explain --json scan.png                        (no figure: where the heat is, as JSON)
  ct-edge explain 'scans/*/*.png' -o heatmaps/           (several inputs: -o is a folder)
  ct-edge explain --method occlusion scan.png -o occlusion.png

The figure (520x320 px) shows the input as the model saw it and the heatmap over it, with the
label and probabilities. Methods: cam (class-activation maps the artifact exports: one
inference) or occlusion (a patch slides over the image: ~170 inferences, any model); default:
cam when the artifact has them. --json objects (one per input) hold: path, label (null when out
of domain), confidence, status (ok, uncertain or out_of_domain), reason, probabilities, target
(the class explained), method, artifact, peak {x, y in input-image pixels, x_rel, y_rel, value},
lung_share (share of heat inside the estimated lung fields; null when they cannot be estimated,
e.g. most chest films), lung_area, border_share (heat in the outer 8% band), border_area (that
band's share of the image: what an even heatmap would give), output (the PNG written, or null),
timings_ms and error.
exit codes: 0 all explained, 1 some inputs failed: unreadable, or their figure could not be
written (one 'error:' line each on stderr; the others are still explained), 2 usage or bundle
error, e.g. an -o that would replace an input.
"""


def add_parser(commands: Any) -> None:
    explain = commands.add_parser(
        "explain", help="draw where in an image the answer comes from (heatmap)",
        formatter_class=RAW, epilog=EXAMPLES,
        description="Classify images and draw a heatmap of the evidence over each one.")
    explain.add_argument("paths", nargs="+", metavar="IMAGE", help="file, folder or glob pattern")
    explain.add_argument("-o", "--output", metavar="PNG|DIR",
                         help="where to write the figure: a .png file for one input, a folder "
                              "(created; one <name>.png per input) for several (default: none, "
                              "then --json is required)")
    explain.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    explain.add_argument("--artifact", metavar="NAME",
                         help="artifact to run (default: the bundle's default)")
    explain.add_argument("--method", choices=("cam", "occlusion"),
                         help="heatmap method (default: cam when the artifact has class maps, "
                              "else occlusion)")
    explain.add_argument("--target", metavar="LABEL",
                         help="class to explain (default: the predicted one)")
    explain.add_argument("--window", type=window_arg, metavar="lung|mediastinum|W,L",
                         help="CT window for DICOM (default: the bundle's)")
    explain.add_argument("--threads", type=positive_int, metavar="N",
                         help="engine threads (default: the engine's own choice)")
    explain.add_argument("--no-domain-check", action="store_true",
                         help="research use only: label every input, even one unlike the "
                              "training images (default: check)")
    explain.add_argument("--json", action="store_true",
                         help="JSON Lines on stdout, one object per input (default: one line of "
                              "text per input)")
    explain.add_argument("--quiet", "-q", action="store_true",
                         help="no notes or disclaimer; errors are still printed (default: off)")
    explain.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..classifier import Classifier, Prediction
    from ..dicom import DicomError
    from ..errors import InputError
    from ..explain import choose_method, explain

    if args.output is None and not args.json:
        error("nothing to write: pass -o FILE.png (or -o DIR/ for several inputs) and/or --json")
        return EXIT_USAGE
    from ..inputs import expand_inputs

    items = expand_inputs(args.paths)
    outputs = explain_outputs([path for path, _ in items], args.output)
    if isinstance(outputs, str):
        error(outputs)
        return EXIT_USAGE
    with native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact,
                                            threads=args.threads, window=args.window,
                                            domain_check=not args.no_domain_check)
    if not args.quiet:
        warn(classifier.artifact.parity_warning)
    if args.no_domain_check and not args.quiet:
        print(DOMAIN_CHECK_OFF, file=sys.stderr)
    method = choose_method(classifier, args.method)  # BundleError (exit 2) when cam is missing
    if args.target is not None and args.target not in classifier.labels:
        error(f"--target {args.target!r} is not a class of this bundle; choose one of: "
               + ", ".join(classifier.labels))
        return EXIT_USAGE
    unmade = make_folder(args.output, len(items))  # only now: a usage error leaves no folder
    if unmade is not None:
        error(unmade)
        return EXIT_USAGE
    failed = 0
    for (path, problem), output in zip(items, outputs, strict=True):
        try:
            if problem is not None:
                raise InputError(path, problem)
            result = explain(classifier, path, method=method, target=args.target)
        except InputError as exc:
            refused = classifier.refusal(exc) if isinstance(exc, DicomError) else None
            if refused is not None:  # as `classify` answers it: out of domain, not an error
                refused.path = path
                if args.json:
                    print_record({**refused.to_dict(), "output": None})
                else:
                    print(f"{printable(path)}: out of domain, no label ({refused.reason}); "
                          "no image to explain", flush=True)
                continue
            failed += 1
            error(f"{printable(path)}: {exc.problem}")
            if args.json:  # the keys of `classify --json` for an unreadable input
                print_record({**Prediction(path=path, label=None, probabilities={},
                                           error=exc.problem).to_dict(), "output": None})
            continue
        result.path = path
        failed += not report(result, output, args.json)
    if not args.quiet:
        print(DISCLAIMER, file=sys.stderr if args.json else sys.stdout)
    return EXIT_INPUT if failed else EXIT_OK


def report(result: Any, output: str | None, as_json: bool) -> bool:
    """Write one input's figure (with -o) and print its line; False when the figure failed."""
    problem = None if output is None else write_figure(result, output)
    if problem is not None:  # this input only: the others are still explained
        error(f"{printable(result.path)}: {problem}")
    if as_json:
        print_record({**result.to_dict(), "output": None if problem else output, "error": problem})
    elif problem is None:
        print(explain_line(result, output), flush=True)
    return problem is None


def print_record(record: dict[str, Any]) -> None:
    """One JSON Lines object on stdout, its paths as valid text."""
    for key in ("path", "output"):
        if record.get(key) is not None:
            record[key] = display_path(record[key])
    print(json_line(record), flush=True)


def explain_outputs(paths: list[str], output: str | None) -> list[str | None] | str:
    """One PNG path per input (None without -o), or a usage error message; creates nothing.

    -o is a folder when it exists as one, ends with '/', or there are several inputs; in a folder
    each figure is named after its input, with the parent folder's name prefixed when two inputs
    share a name (e.g. test/COVID-19/00000.png -> COVID-19_00000.png). A figure may not replace
    one of the inputs, nor anything but a regular file given as -o.
    """
    if output is None:
        return [None] * len(paths)
    if not output_is_folder(output, len(paths)):
        parent = os.path.dirname(output) or "."
        if not os.path.isdir(parent):
            return f"-o {output}: folder {parent} does not exist"
        if os.path.lexists(output) and not os.path.isfile(output):
            return f"-o {output} exists and is not a regular file; choose another -o"
        names = [output]
    elif os.path.exists(output) and not os.path.isdir(output):
        return f"-o {output} is a file; several inputs need a folder (e.g. -o heatmaps/)"
    elif not os.path.isdir(output) and output.lower().endswith(".png"):
        # A folder named like a figure is a typo, not a wish: one PNG cannot hold several.
        return (f"-o {output} names one PNG, but there are {len(paths)} inputs; give a folder "
                "(e.g. -o heatmaps/) for one PNG per input")
    else:
        names = folder_names(paths, output)
    clash = overwritten_input(paths, names)
    if clash is not None:
        figure = "" if clash[1] == output else f" (as {clash[1]})"
        return f"-o {output}{figure} would replace the input {clash[0]}; choose another -o"
    return names


def output_is_folder(output: str, count: int) -> bool:
    """Whether -o names a folder (one figure per input) rather than one PNG."""
    return os.path.isdir(output) or output.endswith(("/", os.sep)) or count > 1


def folder_names(paths: list[str], folder: str) -> list[str]:
    """One unique <name>.png in `folder` per input."""
    from collections import Counter

    stems = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in paths]
    shared = Counter(stems)
    names, used = [], set()
    next_suffix: dict[str, int] = {}  # per name, so n equal names cost n steps, not n^2 / 2
    for path, stem in zip(paths, stems, strict=True):
        name = stem
        if shared[stem] > 1:
            name = f"{os.path.basename(os.path.dirname(os.path.normpath(path)))}_{stem}"
        name = "_".join(name.split()) or "image"
        unique, k = name, next_suffix.get(name, 2)
        while unique in used:
            unique, k = f"{name}_{k}", k + 1
        next_suffix[name] = k
        used.add(unique)
        names.append(os.path.join(folder, unique + ".png"))
    return names


def overwritten_input(paths: list[str], names: list[str]) -> tuple[str, str] | None:
    """The first (input, figure) pair where the figure is the input file itself, else None."""
    inputs = {}
    for path in paths:
        try:
            status = os.stat(path)
        except (OSError, ValueError):  # unreadable inputs are reported when their turn comes
            continue
        inputs[status.st_dev, status.st_ino] = path
    for name in names:
        try:
            status = os.stat(name)
        except (OSError, ValueError):
            continue
        if (status.st_dev, status.st_ino) in inputs:
            return inputs[status.st_dev, status.st_ino], name
    return None


def make_folder(output: str | None, count: int) -> str | None:
    """Create the -o folder when -o is one; None, or why it cannot be created."""
    if output is None or not output_is_folder(output, count):
        return None
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        return f"cannot create folder {output}: {exc.strerror or exc}"
    return None


def write_figure(result: Any, output: str) -> str | None:
    """Save one figure; None, or why it could not be written."""
    from ..explain import save

    # Saving renames over the folder entry whatever it is (a device, a FIFO): only a regular
    # file may be replaced.
    if os.path.lexists(output) and not os.path.isfile(output):
        return f"cannot write {output}: it exists and is not a regular file"
    try:
        save(result, output)
    except OSError as exc:
        return f"cannot write {output}: {exc.strerror or exc}"
    return None


def explain_line(result: Any, output: str | None) -> str:
    """The text line of one explained input."""
    peak = result.peak
    shares = [f"peak at x={peak['x']:.0f} y={peak['y']:.0f}"]
    if result.lung_share is not None:
        shares.append(f"in lungs {result.lung_share:.0%}")
    if result.border_share is not None:
        shares.append(f"at border {result.border_share:.0%}")
    head = f"{printable(output or result.path)}: "
    if result.status == "out_of_domain":
        answer = f"out of domain, no label ({result.reason})"
    else:
        answer = f"{result.label} {result.probabilities[result.label]:.1%} {result.status}"
        if result.status != "ok" and result.reason:
            answer += f" ({result.reason})"
    return f"{head}{answer}; heat for {result.target} ({result.method}): " + ", ".join(shares)
