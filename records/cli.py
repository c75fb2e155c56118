"""Command line: `python -m records <subcommand> --help`.

Exit status: 0 success; 1 the answer is "no" (validate found problems, compare found no record, new
wrote a folder that does not validate); 2 bad input (unreadable or incomplete logs, refused `new`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import rules

EXIT_OK, EXIT_NO, EXIT_INPUT = 0, 1, 2
EXIT_HELP = (
    "exit status: 0 success; 1 the answer is no (validate found problems, compare found no record, new "
    "wrote a folder that does not validate); 2 bad input (unreadable or incomplete logs, refused new)"
)


def _add_track(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--track",
        choices=rules.TRACKS,
        default=rules.RECORD_TRACK,
        help=f"{rules.RECORD_TRACK} (default) applies the record rules: 600 s train+export and 600 s eval "
        f"on 8xH100; {rules.NON_RECORD_TRACK} drops the time and hardware checks (smoke or non-record "
        "runs) but keeps the 16,000,000-byte cap and the eval legality checks",
    )


def _parser_new(sub) -> None:
    p = sub.add_parser(
        "new",
        help="create records/track_*/YYYY-MM-DD_Name/ from a run's logs",
        description="Create a record folder from the logs of one run (one log per seed): copies the exact "
        "script (its sha256 must equal the logs' script_sha256; runs that counted its packed form get "
        "that as train_gpt.py and the script as train_gpt_source.py) and the logs, and writes "
        "submission.json and a README skeleton whose numbers are computed from the logs. Refuses "
        "(exit 2, nothing written) when a log is incomplete, the logs disagree, or the script does "
        "not match. Exit 1 when the folder was written but does not validate under --track.",
    )
    p.add_argument("logs", nargs="+", help="run logs, e.g. logs/<RUN_ID>.txt, one per seed")
    p.add_argument("--name", required=True, help="submission name (submission.json name, README title)")
    p.add_argument("--author", required=True, help="author's name")
    p.add_argument("--github-id", required=True, help="author's GitHub id")
    p.add_argument("--blurb", required=True, help="one-paragraph summary for submission.json and README")
    p.add_argument(
        "--script", default="train_gpt.py", help="the script the logs came from (default: %(default)s)"
    )
    p.add_argument("--date", help="YYYY-MM-DD for the folder and submission.json (default: today)")
    p.add_argument("--slug", help="folder name after the date (default: derived from --name)")
    p.add_argument(
        "--root", default="records", help="records root holding track_* folders (default: %(default)s)"
    )
    p.add_argument("--out", help="exact folder to create instead of ROOT/track_TRACK/DATE_SLUG")
    p.add_argument("--extra", nargs="*", metavar="FILE", help="other files the run needs (copied in)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty folder")
    _add_track(p)
    p.set_defaults(func=cmd_new)


def _parser_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a record folder the way a reviewer does",
        description="Check a record folder: required files; complete logs; script hash; bytes_total <= "
        "16,000,000 recomputed from the files; 600 s train+export and eval limits; legal eval mode "
        "scored before update; no ignored env vars; submission.json and README numbers equal the "
        "logs. Exit 0 with a one-line summary, or 1 with the list of problems.",
    )
    p.add_argument("folders", nargs="+", help="record folder(s)")
    _add_track(p)
    p.set_defaults(func=cmd_validate)


def _parser_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="is the candidate a record over the baseline? (exit 0 yes, 1 no)",
        description="Record rule: mean(baseline val_loss) - mean(candidate val_loss) > MIN_DELTA nats at "
        "p < ALPHA, by a one-sided Welch t-test over the per-seed final val_loss (nats). BPB is shown "
        "too. Each side is record folders and/or log files; a folder without logs in our format (e.g. "
        "an official record) is read from its submission.json seed_results. Exit 0 if it is a record, "
        "1 if not, 2 if an input cannot be read.",
    )
    p.add_argument("--baseline", nargs="+", required=True, metavar="PATH", help="baseline folder(s)/log(s)")
    p.add_argument("--candidate", nargs="+", required=True, metavar="PATH", help="candidate folder(s)/log(s)")
    p.add_argument(
        "--min-delta", type=float, default=rules.RECORD_MIN_DELTA_NATS, help="nats (default: %(default)s)"
    )
    p.add_argument(
        "--alpha", type=float, default=rules.RECORD_ALPHA, help="significance level (default: %(default)s)"
    )
    p.set_defaults(func=cmd_compare)


def _parser_diff(sub) -> None:
    p = sub.add_parser(
        "diff",
        help="code diff and logged-config diff between two runs",
        description="Show the unified diff of train_gpt.py and, separately, the difference of the logged "
        "resolved settings (hp:NAME=value lines). A side is a record folder, a bare script (code only: "
        "no logged config) or a single run log (config only).",
    )
    p.add_argument("a", help="record folder, train_gpt.py or run log")
    p.add_argument("b", nargs="?", default="train_gpt.py", help="the other side (default: %(default)s)")
    p.add_argument("--code-only", action="store_true", help="only the code diff")
    p.add_argument("--config-only", action="store_true", help="only the config diff")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context (default: %(default)s)")
    p.set_defaults(func=cmd_diff)


def _parser_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="PNG of val_bpb and train loss vs wallclock and step",
        description="Plot val_bpb and train loss against training wallclock (train_time_ms) and step for "
        "one or more runs (log files or record folders, ours or official records') into a PNG.",
    )
    p.add_argument("paths", nargs="+", help="log files and/or record folders")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=cmd_plot)


def _parser_rank(sub) -> None:
    p = sub.add_parser(
        "rank",
        help="one table for a track folder (folder of record folders), sorted by score",
        description="Validate every record folder under TRACK_FOLDER (ours or anyone's, any log dialect) "
        "and print one table sorted by mean val_bpb: date, name, val_bpb mean and std over seeds, seeds, "
        "max bytes, max training (artifact production where stated) and eval seconds, the source of the "
        "scores (logs, or submission.json when the logs give none) and the flags validate raised. "
        "Nothing is written into the folders.",
    )
    p.add_argument("track_folder", help="e.g. records/track_10min_16mb")
    p.add_argument("--format", choices=("md", "csv"), default="md", help="Markdown (default) or CSV")
    _add_track(p)
    p.set_defaults(func=cmd_rank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m records",
        description="Record submission tools; run from the repo root. Each subcommand has --help.",
        epilog=EXIT_HELP,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{new,validate,compare,diff,rank,plot}"
    )
    for add in (_parser_new, _parser_validate, _parser_compare, _parser_diff, _parser_rank, _parser_plot):
        add(sub)
    return parser


# ---- commands ------------------------------------------------------------------------------------
# Modules are imported per command so `validate` and `--help` do not pay for scipy and matplotlib.


def cmd_new(args) -> int:
    from . import new, validate

    try:
        folder = new.make_record(args)
    except (new.RefusedError, OSError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"created {folder}")
    rep = validate.validate_folder(folder, args.track)
    print(validate.format_report(rep))
    return EXIT_OK if rep.ok else EXIT_NO


def cmd_validate(args) -> int:
    from . import validate

    status = EXIT_OK
    for folder in args.folders:
        rep = validate.validate_folder(folder, args.track)
        print(validate.format_report(rep))
        status = max(status, EXIT_OK if rep.ok else EXIT_NO)
    return status


def cmd_compare(args) -> int:
    from . import compare

    try:
        base = compare.load_side("baseline", args.baseline)
        cand = compare.load_side("candidate", args.candidate)
    except (compare.InputError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    verdict = compare.decide(base, cand, args.min_delta, args.alpha)
    print(compare.format_comparison(base, cand, verdict, args.min_delta, args.alpha))
    return EXIT_OK if verdict.record else EXIT_NO


def cmd_diff(args) -> int:
    from . import diff

    try:
        a, b = diff.load_side(args.a), diff.load_side(args.b)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(diff.format_diff(a, b, not args.config_only, not args.code_only, args.context))
    return EXIT_OK


def cmd_rank(args) -> int:
    from . import rank

    if not Path(args.track_folder).is_dir():
        print(f"error: {args.track_folder}: not a folder", file=sys.stderr)
        return EXIT_INPUT
    rows, skipped = rank.rank_folder(args.track_folder, args.track)
    print(rank.format_csv(rows) if args.format == "csv" else rank.format_markdown(rows))
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return EXIT_OK


def cmd_plot(args) -> int:
    from . import plot

    try:
        logs = plot.collect_logs(args.paths)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    out = plot.plot_runs(logs, Path(args.out), args.title)
    print(f"wrote {out} ({len(logs)} run(s))")
    return EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `python -m records diff ... | head`
        sys.stderr.close()
        return EXIT_OK
