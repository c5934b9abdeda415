"""The station of one run: its database recorder, the per-source views, the web server, and what the page's
requests read and do. ``protoad-run --db / --station`` builds one, hands ``lane_sinks`` to the run loop, and
closes it when the run ends (the page lives exactly as long as the run)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ...errors import ProtoADError
from ..latency import Latencies
from ..outputs.sinks import Sink
from ..sources.source import Source
from . import database, review
from .images import FILES
from .lane import StationLane
from .recorder import Recorder, Retention
from .server import StationServer, is_loopback

TOKEN_ENV = "PROTOAD_STATION_TOKEN"
GALLERY_LIMIT = 100  # frames one gallery request returns at most
OPERATOR = re.compile(r"[^\x00-\x1f]{1,64}")  # a name the page sends with every action: printable, short
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}


class Changes(Protocol):
    """What "Apply", "Teach" and "Roll back" do to the run's bundle (``cli.station_changes.BundleChanges``)."""

    def set_threshold(self, threshold: float, reviewed: list[dict[str, Any]], operator: str) -> dict[str, Any]: ...

    def teach(self, normal: Path, defect: Path) -> dict[str, Any]: ...

    def rollback(self) -> dict[str, Any]: ...


@dataclass
class StationConfig:
    db: Path | None = None  # the database (None: no record; a page needs one)
    bind: tuple[str, int] | None = None  # where the page is served (None: no page)
    token: str | None = None
    retention: Retention = field(default_factory=Retention)

    def __post_init__(self) -> None:
        if self.bind is not None and not self.token and not is_loopback(self.bind[0]):
            host, port = self.bind
            raise ProtoADError(
                f"--station {host}:{port} is reachable from other machines: give it a token "
                f"(--station-token-file FILE, or the {TOKEN_ENV} environment variable)"
            )


@dataclass
class ModelFacts:
    """What the page says of the model: shown once, read from the backend when the run starts."""

    name: str
    category: str
    backend: str
    threshold: float  # the image threshold the run starts with
    override: bool = False  # --threshold: the run ignores the bundle's threshold
    version: int | None = None  # the bundle's version when the run started (each frame's is in its context)


class Station:
    def __init__(
        self,
        config: StationConfig,
        model: ModelFacts,
        sources: Sequence[str],
        log: Callable[[str], None],
        mqtt: Any = None,
    ) -> None:
        self.config, self.model, self.log, self.mqtt = config, model, log, mqtt
        self.changes: Changes | None = None  # set by the caller where the bundle is at hand
        self.latency = Latencies()  # capture -> the station has the verdict
        self.lanes = [StationLane(i, name, self.latency) for i, name in enumerate(sources)]
        self.recorder: Recorder | None = None
        self.server: StationServer | None = None
        if config.db is not None:
            self.recorder = Recorder(config.db, model.name, model.category, sources, config.retention, log)
        try:
            if config.bind is not None:
                if config.db is None:
                    raise ProtoADError("--station needs --db FILE: the gallery and the labels live there")
                self.server = StationServer(config.bind, self, config.token)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
            self.log(f"station: {self.server.url}" + (" (token required)" if self.config.token else ""))

    def lane_sinks(self, index: int, source: Source) -> list[Sink]:
        """The station's sinks for the run's ``index``-th source (``RunOptions.lane_sinks``)."""
        sinks: list[Sink] = []
        if self.recorder is not None:
            sinks.append(self.recorder.sink(index))
        if self.server is not None:
            sinks.append(self.lanes[index])
        return sinks

    def close(self) -> list[str]:
        """Stops the page, stores what is queued; returns the summary's lines (the database, the latencies)."""
        lines = []
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.recorder is not None:
            lines.append(f"database    {self.recorder.close()}")
        lines += self.latency_lines()
        self.recorder = None
        return lines

    def latency_lines(self) -> list[str]:
        """Capture -> station (the page's live view) and -> the database (the gallery), for the summary."""
        legs = [("station", self.latency)] if self.config.bind is not None else []
        if self.recorder is not None:
            legs.append(("database", self.recorder.committed))
        return [
            f"latency     capture -> {name}: {figures.line()}"
            for name, leg in legs
            if (figures := leg.figures()) is not None
        ]

    # ------------------------------------------------------------------ what the page reads

    def _db(self) -> Any:
        if self.config.db is None:
            raise ProtoADError("this run keeps no database (--db)")
        return database.connect(self.config.db)

    def status(self) -> dict[str, Any]:
        mqtt = None
        if self.mqtt is not None:
            mqtt = {
                "url": self.mqtt.url,
                "connected": self.mqtt.connected,
                "delivered": self.mqtt.delivered,
                "queued": self.mqtt.queued,
                "dropped": self.mqtt.dropped,
            }
        return {
            "time": time.time(),
            "model": vars(self.model),
            "sources": [lane.state() for lane in self.lanes],
            "mqtt": mqtt,
            "database": self.recorder.state() if self.recorder is not None else None,
            "latency": {
                "station": _figures(self.latency),
                "database": _figures(self.recorder.committed) if self.recorder is not None else None,
            },
        }

    def live(self, lane: int, width: int) -> tuple[dict[str, Any], bytes] | None:
        if not 0 <= lane < len(self.lanes):
            raise ProtoADError(f"no source {lane}: this run has {len(self.lanes)}")
        picture = self.lanes[lane].live.picture(width)
        if picture is None:
            return None
        facts = {
            "Seq": picture.seq,
            "Index": picture.frame,
            "Score": f"{picture.score:.6g}",
            "Verdict": "anomaly" if picture.anomalous else "ok",
        }
        return facts, picture.jpeg

    def gallery(self, query: dict[str, str]) -> dict[str, Any]:
        """The newest frames of ``verdict`` (anomaly; ok: the sampled normal frames with pictures) after row
        ``after``, newest first, of source ``lane`` (index) or all."""
        verdict = query.get("verdict", "anomaly")
        if verdict not in ("anomaly", "ok"):
            raise ProtoADError(f"verdict must be anomaly or ok, not {verdict!r}")
        lane = None
        if query.get("lane", "") != "":
            index = _whole(query["lane"], "lane")
            if not 0 <= index < len(self.lanes):
                raise ProtoADError(f"no source {index}: this run has {len(self.lanes)}")
            lane = self.lanes[index].name
        limit = min(max(_whole(query.get("limit", "24"), "limit"), 1), GALLERY_LIMIT)
        db = self._db()
        try:
            frames = database.recent(
                db, verdict, _whole(query.get("after", "0"), "after"), limit, lane, with_images=verdict == "ok"
            )
        finally:
            db.close()
        return {"frames": frames}

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        db = self._db()
        try:
            return database.frame_by_id(db, frame_id)
        finally:
            db.close()

    def picture(self, frame_id: int, kind: str) -> tuple[bytes, str] | None:
        found = self.frame(frame_id)
        if found is None or not found["images"] or self.recorder is None:
            return None
        path = self.recorder.image_folder / found["images"] / FILES[kind]
        try:
            return path.read_bytes(), CONTENT_TYPES[path.suffix]
        except FileNotFoundError:  # removed by the retention since the row was read
            return None

    def threshold_in_force(self) -> float:
        """The image threshold of the newest judged frame (a new bundle version may have changed it)."""
        newest = max(
            (lane for lane in self.lanes if lane.last_result is not None), key=lambda lane: lane.last, default=None
        )
        return newest.last_result.context.threshold if newest is not None else self.model.threshold  # type: ignore

    @property
    def export_folder(self) -> Path:
        assert self.config.db is not None
        return self.config.db.with_name(self.config.db.name + ".review")

    def review(self) -> dict[str, Any]:
        """The reviewed frames' counts and the trade of candidate thresholds on them."""
        db = self._db()
        try:
            reviewed = database.labelled(db)
        finally:
            db.close()
        kinds = [review.KIND[r["label"]] for r in reviewed]
        return {
            "threshold": self.threshold_in_force(),
            "normal": kinds.count("normal"),
            "defect": kinds.count("defect"),
            "trade": [t.to_dict() for t in review.trade(reviewed, self.threshold_in_force())],
            "export_folder": str(self.export_folder),
        }

    def actions(self) -> dict[str, Any]:
        """Who did what, newest first."""
        db = self._db()
        try:
            return {"actions": database.actions(db)}
        finally:
            db.close()

    # ------------------------------------------------------------------ what the page does

    def post(self, action: str, body: dict[str, Any], address: str) -> dict[str, Any]:
        operator = str(body.get("operator") or "").strip()
        if not OPERATOR.fullmatch(operator):
            raise ProtoADError("enter your name (at most 64 characters) before acting: every action is logged")
        if action == "label":
            return self._label(body, operator, address)
        if action == "export":
            return self._export(operator, address)
        if action == "apply":
            return self._apply(body, operator, address)
        if action == "teach":
            return self._teach(operator, address)
        if action == "rollback":
            return self._rollback(operator, address)
        raise ProtoADError(f"no such action: {action}")

    def _changes(self, what: str) -> Changes:
        if self.changes is None:
            raise ProtoADError(f"{what}: this run judges with a model on a server (--server), whose bundle is not here")
        return self.changes

    def _apply(self, body: dict[str, Any], operator: str, address: str) -> dict[str, Any]:
        """The threshold ``body["threshold"]`` as a new version of the bundle, which the line switches to."""
        threshold = body.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ProtoADError("apply: give the threshold as a number")
        if self.model.override:
            raise ProtoADError(
                f"apply: this run judges with --threshold {self.model.threshold:.6g}, whatever the bundle says: "
                "restart it without --threshold to judge with the bundle's"
            )
        changes = self._changes("apply")
        db = self._db()
        try:
            done = changes.set_threshold(float(threshold), database.labelled(db), operator)
            database.log_action(db, operator, address, "apply", {"threshold": threshold, "version": done["version"]})
        finally:
            db.close()
        self.log(f"station: {operator} ({address}): {done['message']}")
        return done

    def _teach(self, operator: str, address: str) -> dict[str, Any]:
        """The marked false alarms taught to the bundle as a new version (exported first: the folders it reads)."""
        changes = self._changes("teach")
        exported = self._export(operator, address)
        if not exported["normal"]:
            raise ProtoADError("teach: no frame marked as a false alarm has its picture: mark some first")
        done = changes.teach(Path(exported["normal_folder"]), Path(exported["defect_folder"]))
        db = self._db()
        try:
            database.log_action(db, operator, address, "teach", {"frames": exported["normal"], **done})
        finally:
            db.close()
        self.log(f"station: {operator} ({address}) taught: {done['message']}")
        return done

    def _rollback(self, operator: str, address: str) -> dict[str, Any]:
        """The version the one in force was made from back in force (an Apply or a Teach undone)."""
        done = self._changes("rollback").rollback()
        db = self._db()
        try:
            database.log_action(db, operator, address, "rollback", {"from": done["from"], "version": done["version"]})
        finally:
            db.close()
        self.log(f"station: {operator} ({address}): {done['message']}")
        return done

    def _export(self, operator: str, address: str) -> dict[str, Any]:
        """The reviewed frames into FILE.review/normal and /defect, the folders protoad-eval and protoad-teach take."""
        db = self._db()
        try:
            reviewed = database.labelled(db)
            assert self.recorder is not None
            done = review.export(reviewed, self.recorder.image_folder, self.export_folder)
            database.log_action(db, operator, address, "export", done)
        finally:
            db.close()
        missing = f" ({done['without_picture']} marked frames have no picture left)" if done["without_picture"] else ""
        message = (
            f"exported {done['normal']} normal frames to {done['normal_folder']} and {done['defect']} defects "
            f"to {done['defect_folder']}{missing}"
        )
        self.log(f"station: {operator} ({address}) {message}")
        return {**done, "message": message}

    def _label(self, body: dict[str, Any], operator: str, address: str) -> dict[str, Any]:
        frame_id, label = body.get("frame"), body.get("label")
        if not isinstance(frame_id, int):
            raise ProtoADError("label: give the frame's id")
        db = self._db()
        try:
            database.add_label(db, frame_id, str(label), operator, address)
            found = database.frame_by_id(db, frame_id)
        finally:
            db.close()
        assert found is not None
        self.log(
            f"station: {operator} ({address}) marked frame {found['frame']} of {found['lane']} "
            f"(score {found['score']:.5g}, {found['verdict']}) as {label}"
        )
        return {"frame": found}


def _figures(latencies: Latencies) -> dict[str, float] | None:
    figures = latencies.figures()
    return figures.to_dict() if figures is not None else None


def _whole(text: str, name: str) -> int:
    if not text.isdigit():
        raise ProtoADError(f"{name} must be a whole number, not {text!r}")
    return int(text)
