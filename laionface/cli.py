"""The `laionface` command. Thin: it parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import logging
import sys

from laionface import __version__
from laionface.config import ConfigError, load_config
from laionface.runner import StageFailed

log = logging.getLogger("laionface")

EPILOG_RUN = """examples:
  laionface run pipelines/laion-face-50m.toml --run-dir s3://bucket/laion-face
  laionface run pipelines/demo.toml --stages select --set select.min_score=0.95
  laionface run pipelines/laion-face-50m.toml --scheduler tcp://10.0.0.5:8786
"""


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="run folder, any fsspec URL (default: [run] run_dir)")
    parser.add_argument("--stages", help="comma-separated stages to run (default: all)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set faces.batch_size=64 (repeatable)",
    )
    parser.add_argument("--scheduler", default="", help="address of an existing Dask scheduler")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: [cluster])")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="download again the rows that failed with a transient error in earlier runs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laionface",
        description="Build, audit and publish face image-text datasets like LAION-FACE.",
        epilog="example:\n  laionface demo\n  laionface run pipelines/demo.toml --run-dir runs/x",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"laionface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a pipeline's stages",
        description="Run the stages of a pipeline config; finished shards are skipped on re-run.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("pipeline", help="pipeline config, e.g. pipelines/demo.toml")
    _add_run_args(run)

    demo = commands.add_parser(
        "demo",
        help="build the demo corpus, serve it on 127.0.0.1 and run the whole pipeline on it",
        description="Run pipelines/demo.toml end to end on a generated corpus, offline.",
        epilog="example:\n  laionface demo --run-dir runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--corpus-dir", default="", help="corpus folder (default: RUN_DIR/corpus)")
    demo.add_argument("--seed", type=int, default=0, help="corpus seed (default: 0)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--scheduler", default="", help="address of an existing Dask scheduler")
    demo.add_argument("--workers", type=int, help="LocalCluster workers")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from laionface.pipeline import run_pipeline

    config = load_config(args.pipeline, args.overrides)
    run = run_pipeline(
        config,
        run_dir=args.run_dir,
        stages=args.stages,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
        options={"retry_failed": args.retry_failed},
    )
    print(f"run folder: {run.url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from laionface.demo import run_demo

    run_demo(
        run_dir=args.run_dir,
        corpus_dir=args.corpus_dir,
        seed=args.seed,
        overrides=args.overrides,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
    )
    return 0


COMMANDS = {"run": cmd_run, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("laionface").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # Dask logs every retried task's traceback; laionface reports failed shards itself.
    logging.getLogger("distributed").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
