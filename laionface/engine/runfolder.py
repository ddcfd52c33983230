"""A run's records: run.json and config.json, written by the driver only.

run.json holds:

    created     when the run folder was first used
    config      the resolved config of the last command (also config.json)
    versions    the software versions of the last command
    stages      per stage and per step: status, start, end, seconds, shard counts, failures;
                per stage also the settings and software versions it last ran with
                (`record_stage`), so `--stages select` leaves download's record alone

Workers write shard outputs and markers, never run.json, so updates need no locking.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

from laionface.engine.markers import now_iso
from laionface.io import storage
from laionface.layout import RunLayout

if TYPE_CHECKING:
    from laionface.config import Config
    from laionface.engine.stage import Stage

SOFTWARE = ("laionface", "dask", "distributed", "pyarrow", "torch", "img2dataset", "pillow")


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class RunFolder:
    """A run's folder on any fsspec URL, and its run.json."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.layout = RunLayout(self.url)
        self.state: dict[str, Any] = {}
        if storage.exists(self.layout.run_json):
            self.state = storage.read_json(self.layout.run_json)

    def path(self, *parts: str) -> str:
        return self.layout.path(*parts)

    def start(self, config: Config) -> None:
        """Record the command's resolved config (also as config.json) and software versions."""
        storage.makedirs(self.url)
        self.state.setdefault("created", now_iso())
        self.state["config"] = config.resolved()
        self.state["versions"] = software_versions()
        self.state.setdefault("stages", {})
        storage.write_json(self.layout.config_json, config.resolved())
        self.save()

    def stage(self, name: str) -> dict[str, Any]:
        """The record of a stage or step (created empty)."""
        return self.state.setdefault("stages", {}).setdefault(name, {})

    def record_stage(self, stage: Stage, config: Config) -> None:
        """Note the settings and software a stage is running with, replacing its last ones."""
        self.stage(stage.name).update(
            settings=stage.settings_of(config),
            fingerprint=stage.fingerprint(config),
            versions=software_versions(),
        )

    def provenance(self, names: tuple[str, ...]) -> dict[str, dict]:
        """{stage: {settings, versions, finished}} of the stages in `names` that have run."""
        out = {}
        for name in names:
            record = self.state.get("stages", {}).get(name, {})
            if "settings" in record:
                out[name] = {
                    "settings": record["settings"],
                    "versions": record.get("versions", {}),
                    "finished": record.get("finished"),
                }
        return out

    def save(self) -> None:
        storage.write_json(self.layout.run_json, self.state)
