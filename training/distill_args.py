"""The command line of `python -m training.distill`: its options, their defaults and every
usage check, made before any data is read or model trained."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ct_edge.cli.common import positive_int
from ct_edge.preprocess import PreprocessSpec

from .ensemble import MIXTURE_SIZE
from .models import ARCHITECTURES, PRETRAINED
from .train import TrainConfig

DESCRIPTION = "Knowledge distillation: a teacher's soft targets, at a temperature, teach a small student."
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.5
CV_FOLDS = 5  # k of compare_fold, as training.evaluate's default


def check_weights(temperature: float, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0 or not 0 < temperature < math.inf:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=DESCRIPTION)
    add = parser.add_argument
    archs = ", ".join(sorted(ARCHITECTURES))
    add("--teacher", type=Path,
        help="teacher model folder (model.keras, config.json) (default: none; needed unless "
             "--cv-fold or --table)")
    add("--out", type=Path,
        help="folder for the student, or with --cv-fold the JSON result file (default: none; "
             "needed unless --table)")
    add("--cv-fold", type=int, default=None, metavar="N", choices=range(CV_FOLDS),
        help=f"instead: fold N (0-{CV_FOLDS - 1}) of the {CV_FOLDS}-fold cross-validation on --data "
             "(seed --seed): edge-gap, a teacher trained there (--teacher-arch/--teacher-lr/"
             "--teacher-epochs/--teacher-size), their mean, and edge-gap distilled from it "
             "(default: none)")
    add("--table", nargs="+", type=Path, metavar="JSON",
        help="instead: print the markdown tables of --cv-fold result files (per fold; per "
             "seed whose five folds are all there) (default: none)")
    add("--data", type=Path, help="data folder, for --cv-fold (default: none; needed there)")
    add("--seed", type=int, default=0,
        help="cross-validation seed, 0 or more, for --cv-fold (default: 0)")
    add("--teacher-recipe", default="finetune", choices=["finetune", "probe", "mixture"],
        help="for --cv-fold: the teacher's recipe; mixture: `--recipe mixture` of training.train "
        "(its own members, lr and epochs; 224 px unless --teacher-size) (default: %(default)s)")
    add("--teacher-arch", default="efficientnet-lite0", choices=sorted(ARCHITECTURES),
        metavar="NAME", help=f"for --cv-fold, one of {archs} (default: %(default)s)")
    add("--teacher-lr", type=float, default=3e-4,
        help="for --cv-fold, more than 0 (default: %(default)s)")
    add("--teacher-epochs", type=positive_int, default=15,
        help="for --cv-fold (default: %(default)s)")
    add("--teacher-size", type=positive_int, default=None,
        help=f"for --cv-fold (default: {PreprocessSpec().size}; {MIXTURE_SIZE} for a mixture)")
    add("--bank-views", type=int, default=0, metavar="V",
        help="distil on V fixed augmented views of every training image, the "
             "teacher run once per view, for --epochs passes with a cosine schedule and no early "
             "stopping; 0: online, early stopping on the validation split (default: %(default)s)")
    add("--mixup", type=float, default=0.0,
        help="with --bank-views: blend every view with another image's, weight ~ Beta(a, a) "
             "(default: %(default)s)")
    add("--arch", default="edge-gap", choices=sorted(ARCHITECTURES), metavar="NAME",
        help=f"student architecture, one of {archs} (default: %(default)s)")
    add("--size", type=positive_int, default=PreprocessSpec().size,
        help="student input size (default: %(default)s)")
    add("--temperature", type=float, default=DEFAULT_TEMPERATURE,
        help="softening temperature T, more than 0 (default: %(default)s)")
    add("--alpha", type=float, default=DEFAULT_ALPHA,
        help="weight of the label loss, 0 to 1; 1 - alpha goes to the teacher "
             "(default: %(default)s)")
    add("--epochs", type=positive_int, default=TrainConfig().epochs,
        help="maximum epochs with early stopping; with --bank-views the exact number of passes "
             "over the bank; --cv-fold without --bank-views uses the default (default: "
             "%(default)s)")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every usage error before any data is read or model trained."""
    if (args.bank_views or args.mixup) and args.cv_fold is None and args.teacher is None:
        parser.error("--bank-views and --mixup go with --teacher or --cv-fold")
    if args.mixup and not args.bank_views:
        parser.error("--mixup needs --bank-views")
    if args.bank_views < 0 or not 0 <= args.mixup < math.inf:
        parser.error(f"--bank-views and --mixup must be 0 or more (got {args.bank_views}, "
                     f"{args.mixup})")
    try:
        check_weights(args.temperature, args.alpha)
    except ValueError:
        parser.error(f"--temperature must be more than 0 (got {args.temperature}) and --alpha "
                     f"0 to 1 (got {args.alpha})")
    if not 0 < args.teacher_lr < math.inf:
        parser.error(f"--teacher-lr must be more than 0, got {args.teacher_lr}")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    for flag, size in (("--size", args.size), ("--teacher-size", args.teacher_size)):
        try:
            PreprocessSpec(size=size or PreprocessSpec().size)
        except ValueError as exc:
            parser.error(f"{flag} {size}: {exc}")
    if (args.cv_fold is not None and args.teacher_recipe == "probe"
            and args.teacher_arch not in PRETRAINED):
        parser.error(f"--teacher-recipe probe needs a pretrained --teacher-arch "
                     f"({', '.join(PRETRAINED)})")
