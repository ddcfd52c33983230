"""The `laionface` command. Thin: it parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import signal
import sys

from laionface import __version__
from laionface.config import ConfigError, load_config
from laionface.layout import STAGE_ORDER

log = logging.getLogger("laionface")

FORCE_HELP = (
    "take over the folder's lease when it is stale (its last writer died without giving it back)"
)
EPILOG_RUN = """examples:
  laionface run pipelines/laion-face-50m.toml --run-dir s3://bucket/laion-face
  laionface run pipelines/demo.toml --stages select --set select.min_score=0.95
  laionface run pipelines/laion-face-50m.toml --scheduler tcp://10.0.0.5:8786
  laionface run pipelines/demo.toml --dry-run --set select.min_score=0.95
"""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="run folder, any fsspec URL (default: [run] run_dir)")
    parser.add_argument(
        "--stages",
        help=f"comma-separated stages to run, of {', '.join(STAGE_ORDER)} (default: all)",
    )
    _add_set(parser)
    parser.add_argument("--scheduler", default="", help="address of an existing Dask scheduler")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: [cluster])")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="download again the rows that failed with a transient error in earlier runs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set faces.batch_size=64 (repeatable); VALUE is TOML "
        "or a bare word; none unsets an optional key",
    )


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a pipeline's stages",
        description="Run the stages of a pipeline config; finished shards are skipped on re-run.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("pipeline", help="pipeline config, e.g. pipelines/demo.toml")
    _add_run_args(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="say what the run would do (inputs, shards, stages to run or skip and why, the "
        "cluster) and write nothing",
    )


def _add_config(commands) -> None:
    config = commands.add_parser(
        "config",
        help="print a pipeline's resolved config as TOML, defaults included",
        description="Print the config a run would use: the pipeline file with its --set "
        "overrides, every key with its value (defaults included). The output loads again as "
        "the same config.",
        epilog="example:\n  laionface config pipelines/demo.toml --set select.min_score=0.95",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument("pipeline", help="pipeline config, e.g. pipelines/demo.toml")
    _add_set(config)


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="build the demo corpus, serve it on 127.0.0.1 and run the whole pipeline on it",
        description="Run pipelines/demo.toml end to end on a generated corpus, offline.",
        epilog="example:\n  laionface demo --run-dir runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument(
        "--corpus-dir",
        default="",
        help="corpus folder (default: demo-corpus beside the run folder)",
    )
    demo.add_argument("--seed", type=int, default=0, help="corpus seed (default: 0)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--scheduler", default="", help="address of an existing Dask scheduler")
    demo.add_argument("--workers", type=int, help="LocalCluster workers")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_audit_commands(commands) -> None:
    stats = commands.add_parser(
        "stats",
        help="print a run's funnel: where every input row went",
        description="Print the funnel (stage, reason, count, % of input, % of stage input) and "
        "check that every input row has exactly one fate.",
        epilog="examples:\n  laionface stats runs/demo\n  laionface stats runs/demo --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("run", help="run folder (any fsspec URL)")
    stats.add_argument(
        "--json", action="store_true", help="print the funnel as one JSON object instead"
    )
    report = commands.add_parser(
        "report",
        help="write a run's self-contained HTML report",
        description="Write one HTML file with the funnel, plots and contact sheets of kept and "
        "dropped samples; it needs no network to open.",
        epilog="example:\n  laionface report runs/demo   # writes runs/demo/audit/report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run", help="run folder (any fsspec URL)")
    report.add_argument("--out", help="output file (default: RUN/audit/report.html)")
    report.add_argument(
        "--samples", type=int, metavar="N", help="images shown per drop reason (default: 8)"
    )
    report.add_argument(
        "--compare", metavar="RUN_B", help="add a section comparing the run with RUN_B (diff)"
    )
    _add_grid(report, "the threshold sweep's grid (default: around the run's thresholds)")


def _add_grid(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="select.KEY=V1,V2,...",
        help=f"{what}; repeat for more keys, every combination is counted",
    )


def _add_compare_commands(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="count what select and dedup would keep over a grid of select thresholds",
        description="For every combination of the --grid values, the images select would keep "
        "and those left after dedup, with their counted faces, from the recorded detections "
        "(nothing is detected again or written). Dedup's recorded clusters are decided again "
        "among the images kept there; where the grid keeps images the run's select dropped, "
        "dedup never compared them and the figure after dedup is an upper bound (marked *).",
        epilog="examples:\n  laionface sweep runs/demo --grid select.min_score=0.8,0.9,0.95 "
        "--grid select.min_face_size=32,64,96\n  laionface sweep runs/demo --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("run", help="run folder (any fsspec URL)")
    _add_grid(sweep, "a select key and its values (default: min_score x min_face_size)")
    sweep.add_argument("--json", action="store_true", help="print one JSON object instead")
    sweep.add_argument(
        "--scheduler", default="", help="read the shards on this Dask scheduler's workers"
    )
    diff = commands.add_parser(
        "diff",
        help="compare two runs: settings, funnels, and the samples one kept and the other not",
        description="The settings that differ (run.json: the last command's config and each "
        "stage's recorded settings), the funnels side by side per stage and reason, and the "
        "keys kept by one run and not the other (counts by the other run's reason, a sample "
        "of keys; --out writes them all).",
        epilog="example:\n  laionface diff runs/a runs/b --out a-vs-b.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diff.add_argument("run_a", help="run folder A")
    diff.add_argument("run_b", help="run folder B")
    diff.add_argument("--json", action="store_true", help="print one JSON object instead")
    diff.add_argument(
        "--out", metavar="FILE.parquet", help="write every key kept by one run only (parquet)"
    )


def _add_verify_publish(commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check a dataset: checksums, tar/parquet agreement, keys, indexes, images",
        description="Check every checksum, that tars and parquet files agree, key rules and "
        "uniqueness, sizes.json and shardindex.json, and that every image decodes. Exit 0 only "
        "if all hold; otherwise every problem found is listed.",
        epilog="examples:\n  laionface verify runs/demo/dataset\n  laionface verify s3://bucket/faces",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("path", help="a dataset folder or a run folder (any fsspec URL)")
    verify.add_argument("--no-images", action="store_true", help="skip decoding every image")
    verify.add_argument("--source-root", help="manifest mode: where raw/ lives (default: recorded)")
    verify.add_argument("--workers", type=int, help="parallel shard checks")
    publish = commands.add_parser(
        "publish",
        help="copy a run's dataset to a target, verify the copy, write dataset.json last",
        description="Copy the dataset to TARGET (a folder, s3://, gs://, any fsspec URL), verify "
        "the copy and write dataset.json last, so readers never see a half-published dataset. "
        "Re-running after an interruption continues where it stopped. For S3-compatible stores "
        "set FSSPEC_S3_ENDPOINT_URL=http://host:9000.",
        epilog="example:\n  laionface publish runs/demo s3://bucket/laion-face-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("run", help="run folder or dataset folder")
    publish.add_argument("target", help="where to publish (any fsspec URL)")
    publish.add_argument("--replace", action="store_true", help="replace another dataset there")
    publish.add_argument("--workers", type=int, default=4, help="parallel copies (default: 4)")
    publish.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_export_reference(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export SAMPLE_ID lists, URL lists or detections in LAION-Face's formats",
        description="Export the published samples: ids-parquet (SAMPLE_IDs), urls (URL + "
        "caption), laion-face-pth (laion_face_ids.pth's layout: a list of per-part SAMPLE_ID "
        "lists), sample2detect (sample2detect_{i}.pth per part: SAMPLE_ID -> [(box, "
        "landmarks[5,2], score), ...]).",
        epilog="example:\n  laionface export runs/demo --format laion-face-pth exports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run", help="run folder")
    export.add_argument(
        "--format",
        required=True,
        choices=["ids-parquet", "urls", "laion-face-pth", "sample2detect"],
        help="what to export",
    )
    export.add_argument("out", help="output folder (any fsspec URL)")
    reference = commands.add_parser(
        "reference",
        help="build a reference hash file (evaluation sets to keep out of the dataset)",
        description="Hash every image in folders, webdataset tars or an earlier laionface "
        "dataset into a parquet of pHashes; list it in [dedup] reference, and samples within "
        "dedup.max_distance of any of them are dropped as eval_overlap.",
        epilog="example:\n  laionface reference celeba/test lapa/test.tar --out refs/eval.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reference.add_argument("inputs", nargs="+", help="folders, tars, images or hash parquet files")
    reference.add_argument("--out", required=True, help="output parquet (any fsspec URL)")


def _add_takedown(commands) -> None:
    takedown = commands.add_parser(
        "takedown",
        help="write a new version of a dataset without some samples (removal requests)",
        description="Write a new version of DATASET to --out without the samples the selectors "
        "choose: shards that lose samples are rewritten, the others copied byte for byte; "
        "dataset.json names the old version (sha256 of its dataset.json) and counts the "
        "removals per reason. The old version is not touched; `laionface publish NEW TARGET "
        "--replace` swaps the new one in. Lists (IDs, URLs, sha256) take the layouts "
        "metadata.exclude_list reads: .pth/.pt, .npy, .parquet, .txt.",
        epilog="examples:\n"
        "  laionface takedown runs/demo/dataset --out runs/demo/dataset-v2 --ids optout.txt\n"
        "  laionface takedown s3://b/faces --out s3://b/faces-v2 --keep-only relaion-urls.parquet\n"
        "  laionface takedown runs/demo/dataset --images requests/ --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    takedown.add_argument("dataset", help="dataset folder or run folder (any fsspec URL)")
    takedown.add_argument("--out", help="where the new version goes (an empty folder)")
    takedown.add_argument("--ids", default="", metavar="FILE", help="remove these SAMPLE_IDs")
    takedown.add_argument("--urls", default="", metavar="FILE", help="remove these URLs")
    takedown.add_argument(
        "--sha256", default="", metavar="FILE", help="remove these image sha256 digests (hex)"
    )
    takedown.add_argument(
        "--images",
        nargs="+",
        default=[],
        metavar="FOLDER_OR_TAR",
        help="remove near duplicates of these images (folders, tars, images, pHash parquet)",
    )
    takedown.add_argument(
        "--max-distance", type=int, default=4, help="pHash distance for --images (default: 4)"
    )
    takedown.add_argument(
        "--keep-only",
        default="",
        metavar="FILE",
        help="remove every sample whose SAMPLE_ID and URL are both missing from this allow-list",
    )
    takedown.add_argument("--name", help="the new version's name (default: the old one's)")
    takedown.add_argument("--dry-run", action="store_true", help="count only, write nothing")
    takedown.add_argument("--workers", type=int, default=4, help="parallel shards (default: 4)")
    takedown.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_logging_args(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """-v, --log-level and --log-format, on the main parser (with the defaults) and on every
    subcommand (without: a subcommand's unset option leaves the main parser's value alone), so
    they are accepted before or after the subcommand."""
    unset = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, other libraries' too", **unset
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="what to log (default: the pipeline's run.log_level, else INFO)",
        **unset,
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text (default), or json: one JSON object per log line on stderr",
        **({"default": "text"} if defaults else unset),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laionface",
        description="Build, audit and publish face image-text datasets like LAION-FACE.",
        epilog="example:\n  laionface demo\n  laionface run pipelines/demo.toml --run-dir runs/x",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"laionface {__version__}")
    _add_logging_args(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_demo, _add_audit_commands, _add_compare_commands):
        add(commands)
    _add_verify_publish(commands)
    _add_export_reference(commands)
    _add_config(commands)
    _add_takedown(commands)
    for command in dict.fromkeys(commands.choices.values()):
        _add_logging_args(command, defaults=False)
    return parser


def cmd_stats(args: argparse.Namespace) -> int:
    from laionface.audit.stats import stats_command

    return stats_command(args.run, as_json=args.json)


def cmd_config(args: argparse.Namespace) -> int:
    from laionface.config import config_toml

    config = load_config(args.pipeline, args.overrides)
    command = ["laionface", "config", args.pipeline, *(f"--set={o}" for o in args.overrides)]
    print(f"# {shlex.join(command)}: the resolved config, defaults included")
    print(config_toml(config), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from laionface.audit.report import report_command

    return report_command(
        args.run, out=args.out, samples=args.samples, compare=args.compare, grid=args.grid
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from laionface.audit.sweep import sweep_command

    return sweep_command(args.run, args.grid, as_json=args.json, scheduler=args.scheduler)


def cmd_diff(args: argparse.Namespace) -> int:
    from laionface.audit.diff import diff_command

    return diff_command(args.run_a, args.run_b, as_json=args.json, out=args.out)


def cmd_verify(args: argparse.Namespace) -> int:
    from laionface.dataset.contract import dataset_folder
    from laionface.dataset.verify import verify

    problems = verify(
        dataset_folder(args.path),
        source_root=args.source_root,
        check_images=not args.no_images,
        workers=args.workers,
    )
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{args.path}: dataset verified, no problems found")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from laionface.dataset.publish import publish

    return publish(
        args.run, args.target, replace=args.replace, workers=args.workers, force=args.force
    )


def cmd_export(args: argparse.Namespace) -> int:
    from laionface.dataset.export import export

    for path in export(args.run, args.format, args.out):
        print(path)
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from laionface.stages.dedup.reference import build_reference

    rows = build_reference(args.inputs, args.out)
    print(f"{args.out}: {rows} reference hashes")
    return 0


def cmd_takedown(args: argparse.Namespace) -> int:
    from laionface.dataset.takedown import Selectors, takedown

    selectors = Selectors(
        ids=args.ids,
        urls=args.urls,
        sha256=args.sha256,
        images=tuple(args.images),
        max_distance=args.max_distance,
        keep_only=args.keep_only,
    )
    result = takedown(
        args.dataset,
        args.out,
        selectors,
        name=args.name,
        workers=args.workers,
        dry_run=args.dry_run,
        force=args.force,
    )
    for reason, count in result.removed.items():
        print(f"{reason}: {count:,} removed ({result.listed[reason]:,} listed)")
    for problem in result.unreadable_images:
        print(f"--images: not hashed: {problem}", file=sys.stderr)
    if result.without_phash:
        print(f"--images: {result.without_phash:,} samples have no pHash and were not compared")
    gone = result.samples_before - result.samples_after
    done = "would be" if args.dry_run else "were"
    print(
        f"{gone:,} of {result.samples_before:,} samples {done} removed; shards rewritten: "
        f"{', '.join(result.rewritten) or 'none'}"
    )
    if not args.dry_run:
        print(f"new version: {result.out} (previous dataset.json sha256 {result.previous_sha256})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from laionface.engine.pipeline import run_pipeline

    config = load_config(args.pipeline, args.overrides)
    if not (args.verbose or args.log_level):
        logging.getLogger("laionface").setLevel(config.run.log_level)
    if args.dry_run:
        from laionface.engine.dryrun import dry_run

        plan = dry_run(
            config,
            run_dir=args.run_dir,
            stages=args.stages,
            scheduler=args.scheduler,
            workers=args.workers,
        )
        print(plan.text())
        return 0
    run = run_pipeline(
        config,
        run_dir=args.run_dir,
        stages=args.stages,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
        options={"retry_failed": args.retry_failed},
        force=args.force,
    )
    print(f"run folder: {run.url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from laionface.demo.command import run_demo

    run_demo(
        run_dir=args.run_dir,
        corpus_dir=args.corpus_dir,
        seed=args.seed,
        overrides=args.overrides,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "stats": cmd_stats,
    "report": cmd_report,
    "sweep": cmd_sweep,
    "diff": cmd_diff,
    "verify": cmd_verify,
    "publish": cmd_publish,
    "export": cmd_export,
    "reference": cmd_reference,
    "takedown": cmd_takedown,
    "config": cmd_config,
}


class JsonLogFormatter(logging.Formatter):
    """`--log-format json`: one JSON object per log line (time in UTC, level, logger, message,
    and the traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if args.log_format == "json" else logging.Formatter("%(message)s")
    )
    if not args.verbose:
        # Dask logs cluster chatter and every retried task's traceback; laionface reports
        # failed shards itself, so only its own lines and others' errors are shown.
        handler.addFilter(lambda r: r.name.startswith("laionface") or r.levelno >= logging.ERROR)
    level = "DEBUG" if args.verbose else (args.log_level or "INFO")
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("laionface").setLevel(level)


def _error(args: argparse.Namespace, text: str) -> None:
    """A command's final error: a line on stderr, or a log record with --log-format json."""
    if args.log_format == "json":
        log.error("%s", text)
    else:
        print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _error(args, f"error: {exc}")
        return 2
    except Exception as exc:
        # laionface's own errors and missing files say what to do; anything else is a bug and
        # keeps its traceback.
        if not (type(exc).__module__.startswith("laionface") or isinstance(exc, FileNotFoundError)):
            raise
        _error(args, f"error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        # Ctrl-C, or SIGTERM during a run (engine.pipeline raises it as Terminated): 128 + signal.
        _error(args, "interrupted: re-run the same command to resume")
        return 128 + getattr(exc, "signum", signal.SIGINT)


def entry() -> None:
    """The `laionface` console command: `main()`, then an exit without native teardown.

    pyarrow's C++ thread pools (and DuckDB's) can abort the interpreter's finalization with
    "terminate called without an active exception" (apache/arrow#34314) after all the work is
    done, turning a finished command into exit -6. Once the command has returned and every
    stream is flushed, finalization has nothing left to do, so the process leaves at once.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
