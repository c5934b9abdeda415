"""``protoad-run``'s flags for the line station (--db, --station and their settings) and its health checks
(--health-window), and what they add to a run (``LineServices``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from ..bundle import Bundle
from ..errors import ProtoADError
from ..runtime.backends.base import Backend
from ..runtime.health import WINDOW, Health
from ..runtime.loop import thresholds_in_force
from ..runtime.outputs.sinks import Sink
from ..runtime.sources.source import Source
from ..runtime.station.recorder import KEEP_IMAGES, KEEP_MB, NORMAL_EVERY, Retention
from ..runtime.station.server import parse_bind
from ..runtime.station.station import TOKEN_ENV, ModelFacts, Station, StationConfig
from .station_changes import BundleChanges

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_DB = Path("protoad-station.db")

OPTIONS = [
    click.option(
        "--db",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE",
        help="Record every judgement in the SQLite database FILE (created if missing; README: 'The station "
        "database'), with the frame, mask and overlay of anomalous frames and of a sample of normal "
        "ones in FILE.images/. Default with --station: ./protoad-station.db.",
    ),
    click.option(
        "--db-keep",
        type=click.IntRange(min=0),
        default=KEEP_IMAGES,
        show_default=True,
        metavar="N",
        help="Keep the pictures of at most N frames; beyond it (or --db-keep-mb) the oldest are removed "
        "(their records stay).",
    ),
    click.option(
        "--db-keep-mb",
        type=click.IntRange(min=0),
        default=KEEP_MB,
        show_default=True,
        metavar="MB",
        help="Keep at most MB megabytes of pictures.",
    ),
    click.option(
        "--db-normal-every",
        type=click.IntRange(min=0),
        default=NORMAL_EVERY,
        show_default=True,
        metavar="N",
        help="Keep the pictures of every N-th normal frame of each source too (0: none), to review passed parts.",
    ),
    click.option(
        "--station",
        "station_bind",
        default=None,
        metavar="HOST:PORT",
        help="Serve the station page (live view, counters, health, gallery, review) at HOST:PORT for as "
        "long as the run lasts. Bound beyond 127.0.0.1 it needs a token: --station-token-file or "
        f"${TOKEN_ENV}. Port 0 picks a free one (the log names the URL).",
    ),
    click.option(
        "--station-token-file",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE",
        help=f"The station's token: the first line of FILE (instead of ${TOKEN_ENV}).",
    ),
    click.option(
        "--health-window",
        type=click.IntRange(min=1),
        default=WINDOW,
        show_default=True,
        metavar="N",
        help="A health problem (the judged area's size, exposure, focus, black or frozen frames, scores "
        "drifting from the normal images') is reported once more than half of the last N frames of a "
        "source show it, and cleared when no more than half do (README: 'Health').",
    ),
]


def station_options(func: F) -> F:
    for option in reversed(OPTIONS):
        func = option(func)
    return func


def read_token(path: Path | None) -> str | None:
    """The token from ``path`` (its first line) or the environment; None when neither gives one."""
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except OSError as exc:
        raise ProtoADError(f"--station-token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ProtoADError(f"--station-token-file {path}: the first line is empty")
    return token


def station_config(
    db: Path | None,
    db_keep: int,
    db_keep_mb: int,
    db_normal_every: int,
    station_bind: str | None,
    station_token_file: Path | None,
) -> StationConfig | None:
    """The flags as a StationConfig (checked before a model is loaded), or None without --db and --station."""
    if db is None and station_bind is None:
        return None
    bind = parse_bind(station_bind) if station_bind is not None else None
    retention = Retention(db_keep, db_keep_mb * 1024 * 1024, db_normal_every)
    token = read_token(station_token_file) if bind is not None else None
    return StationConfig(db if db is not None else DEFAULT_DB, bind, token, retention)


class LineServices:
    """What the station's and health's flags add to a run: a health monitor per source (always), the station
    (with --db or --station), and the health's MQTT status message (with --mqtt)."""

    def __init__(
        self,
        config: StationConfig | None,
        health_window: int,
        backend: Backend,
        bundle: Bundle | None,
        sources: Sequence[str],
        threshold: float | None,
        log: Callable[[str], None],
    ) -> None:
        self.health = Health(sources, backend.info.built_on, health_window, log)
        self.station: Station | None = None
        self.publisher: Any = None
        if config is not None:
            info, facts = backend.info, backend.describe()
            if config.db == DEFAULT_DB:
                log(f"station: recording into {DEFAULT_DB} in the current folder (--db FILE to choose)")
            image_threshold = thresholds_in_force(info, threshold)[0]
            model = ModelFacts(
                facts.model, info.category, facts.line(), image_threshold, threshold is not None, info.version
            )
            self.station = Station(config, model, sources, log)
            if bundle is not None:
                self.station.changes = BundleChanges(bundle, log)
            for lane, monitor in zip(self.station.lanes, self.health.monitors):
                lane.health = monitor

    def lane_sinks(self, index: int, source: Source) -> list[Sink]:
        """``RunOptions.lane_sinks``: the health first (its findings go into the records), then the station's."""
        return self.health.lane_sinks(index) + (self.station.lane_sinks(index, source) if self.station else [])

    def start(self, mqtt: Any, mqtt_url: str | None, access: Any) -> None:
        """With the run's MQTT sink (or None): the page starts, the health's first state is published."""
        if mqtt_url is not None:
            from ..runtime.outputs.health_mqtt import HealthPublisher

            self.publisher = HealthPublisher(mqtt_url, access)
            self.health.announce = self.publisher.publish
            self.publisher.publish(self.health.report())
        if self.station is not None:
            self.station.mqtt = mqtt
            self.station.start()

    def close(self) -> list[str]:
        """Ends the page and the health's messages; the summary's lines."""
        if self.publisher is not None:
            self.publisher.close(self.health.report(running=False))
        return self.station.close() if self.station is not None else []
