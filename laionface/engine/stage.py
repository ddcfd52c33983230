"""How a stage is declared: once, at the bottom of its module, as `STAGE = Stage(...)`.

The declaration is everything the engine needs to know about a stage without reading its code:
which run-folder folders it reads and writes, which config keys shape its output (their values
fingerprint its shards and are recorded in run.json and dataset.json), the Dask resources its
tasks ask for, the modules its workers should import before they start, and the function that
runs it on the driver. `engine.pipeline` finds a stage as `laionface.stages.<name>.STAGE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from laionface.engine.markers import digest

if TYPE_CHECKING:
    from laionface.config import Config
    from laionface.engine.runner import StageContext


def _no_resources(config: Config) -> dict[str, float] | None:
    return None


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline.

    settings: config keys whose values shape the stage's output: a section ("select") or one key
    ("metadata.rows_per_shard"). ignored: keys of those sections that change only speed or
    placement ("faces.batch_size"), left out of the fingerprint.
    finish: called by the pipeline after the audit, with the funnel (as `Funnel.as_dict()`),
    when the stage ran in the command: emit completes its dataset.json there.
    """

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    settings: tuple[str, ...]
    run: Callable[[StageContext], None]
    ignored: frozenset[str] = frozenset()
    resources: Callable[[Config], dict[str, float] | None] = _no_resources
    worker_imports: tuple[str, ...] = ()
    finish: Callable[[StageContext, dict], None] | None = field(default=None)

    def settings_of(self, config: Config) -> dict[str, Any]:
        """{key: value} of the declared settings, ignored keys left out."""
        data = config.resolved()
        out: dict[str, Any] = {}
        for key in self.settings:
            section, _, name = key.partition(".")
            if name:
                out[key] = data[section][name]
            else:
                out[key] = {
                    k: v for k, v in data[section].items() if f"{section}.{k}" not in self.ignored
                }
        return out

    def fingerprint(self, config: Config) -> str:
        """The hash of `settings_of(config)`: a changed value redoes the stage's shards."""
        return digest(self.settings_of(config))
