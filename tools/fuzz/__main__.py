"""The command line: `python -m tools.fuzz` runs a campaign (or replays saved inputs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tools.fuzz
from ct_edge.limits import MEMORY_BOUND_MB

from .campaign import build_cases
from .cases import regression_cases
from .runner import TIME_LIMIT, Result, run_campaign


def print_summary(summary: dict, failures: list[Result], out=sys.stdout) -> None:
    """The campaign's counts, slowest and hungriest case, tables, and one line per failure kind."""
    s = summary
    print(f"fuzz: {s['cases']} cases in {s['seconds']} s: {s['valid']} valid, {s['clean_errors']} "
          f"clean errors (InputError/BundleError), {s['crashes']} crashes, {s['hangs']} hangs, "
          f"{s['memory']} over the memory bound, {s['invalid_output']} invalid outputs", file=out)
    if s["slowest_case"]:
        print(f"fuzz: slowest case {s['slowest_case']['seconds']} s: {s['slowest_case']['case']} "
              f"(limit {s['time_limit_s']:g} s)", file=out)
    print(f"fuzz: peak RSS growth in one case {s['peak_rss_growth_mb']} MiB: {s['peak_rss_case']} "
          f"(bound {s['memory_bound_mb']} MiB; worker baseline {s['worker_baseline_rss_mb']} MiB)",
          file=out)
    for target, row in s["by_target"].items():
        print(f"fuzz:   {target:<9} " + "  ".join(f"{k} {v}" for k, v in sorted(row.items())), file=out)
    for name, row in s["by_generator"].items():
        print(f"fuzz:     {name:<20} " + "  ".join(f"{k} {v}" for k, v in sorted(row.items())),
              file=out)
    groups: dict[str, list[Result]] = {}
    for r in failures:
        groups.setdefault(failure_signature(r), []).append(r)
    for signature, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"FAIL x{len(members)} {signature}  e.g. {members[0].case.label()}", file=out)


def failure_signature(result: Result) -> str:
    """outcome + the exception's type (or the detail's first words): one line per distinct bug."""
    last = result.detail.strip().splitlines()[-1] if result.detail.strip() else ""
    head = last.split(":", 1)[0] if result.outcome == "crash" else " ".join(last.split()[:6])
    return f"{result.outcome}: {result.case.target}/{result.case.generator.split(':')[0]}: {head}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz",
                                     description=tools.fuzz.__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated input cases (default "
                        "10000), on top of the bombs and the truncation sweep (0: no input cases at all)")
    parser.add_argument("--manifests", type=int, default=None,
                        help="generated manifest cases (default: cases / 5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated cases: the same seed, the same campaign "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="every 97th truncation and the smaller bombs only (default: every "
                             "truncation and bomb)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                        help="seconds one case may run; past it the case is a hang and the worker "
                             "is replaced (default: %(default)g)")
    parser.add_argument("--memory-bound", type=float, default=MEMORY_BOUND_MB,
                        help="peak RSS of the worker allowed, MiB (default: %(default)s)")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="write failing inputs here (default: not written)")
    parser.add_argument("--replay", type=Path, default=None, metavar="DIR",
                        help="run the saved inputs in DIR instead of generated cases (default: generate)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the summary and the failures as JSON here (default: printed only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a campaign (or --replay saved inputs); 1 if any case failed."""
    args = build_parser().parse_args(argv)

    if args.replay is not None:
        cases = regression_cases(args.replay)
    else:
        manifests = args.manifests if args.manifests is not None else args.cases // 5
        cases = build_cases(args.cases, manifests, args.seed, args.quick)
    total = len(cases)
    print(f"fuzz: {total} cases (seed {args.seed}), time limit {args.time_limit:g} s, memory bound "
          f"{args.memory_bound:g} MiB per case", flush=True)

    def progress(n: int) -> None:
        if n % 1000 == 0 or n == total:
            print(f"fuzz: {n}/{total}", file=sys.stderr, flush=True)

    report = run_campaign(iter(cases), time_limit=args.time_limit, memory_bound_mb=args.memory_bound,
                          progress=progress, save=args.save)
    summary = report.summary()
    print_summary(summary, report.failures)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**summary, "seed": args.seed, "failures": [
            {"outcome": r.outcome, "case": r.case.label(), "detail": r.detail}
            for r in report.failures]}, indent=2) + "\n")
    if report.failures and args.save is not None:
        print(f"fuzz: failing inputs saved in {args.save}/", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
