"""`laionface demo`: the whole pipeline on a generated corpus, offline, in a few minutes.

Builds the corpus (once; it is deterministic from the seed), serves it on 127.0.0.1, runs
`pipelines/demo.toml` through every stage, writes the HTML report, and says where the results
are.
The corpus URLs name a fixed host (corpus.DEMO_HOST) that `download.resolve` maps to the live
server's port, so two demo runs produce identical datasets whatever port the server got.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from laionface.audit.report import write_report
from laionface.config import load_config
from laionface.demo.corpus import DEMO_HOST, build_corpus
from laionface.demo.imageserver import ImageServer
from laionface.engine.pipeline import run_pipeline

log = logging.getLogger("laionface")

DEMO_PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "demo.toml"


def run_demo(
    run_dir: str = "runs/demo",
    corpus_dir: str = "",
    seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
    scheduler: str = "",
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> str:
    """Run the demo; returns the run folder URL."""
    corpus_dir = corpus_dir or str(Path(run_dir).parent / "demo-corpus")
    log.info("demo corpus: %s (seed %d)", corpus_dir, seed)
    corpus = build_corpus(corpus_dir, seed=seed)
    with ImageServer(corpus_dir) as server:
        log.info("image server: %s (serving %s)", server.base_url, DEMO_HOST)
        settings = [
            f"metadata.input={json.dumps([str(corpus.metadata_path)])}",
            f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
            *overrides,
        ]
        config = load_config(DEMO_PIPELINE, settings)
        run = run_pipeline(
            config,
            run_dir=run_dir,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            force=force,
        )
    run_url = run.url
    report = write_report(run_url)
    print(f"demo finished: run folder {run_url}")
    print(f"  dataset: {run.layout.dataset}  (check it: laionface verify)")
    print(f"  report:  {report}")
    print(f"  funnel:  laionface stats {run_url}")
    return run_url
