"""Capture in its own thread, so inference never waits on a camera, a network or a disk.

Frames go through a bounded queue. A live source (camera, stream) that outpaces the model drops
its oldest queued frame, so the verdict is always about the part in front of the camera now, not
one from seconds ago. Files and folders never drop: every frame is judged, the reader just waits.
A live source that stops delivering (a camera unplugged, a stream's server restarting) is reopened
after growing pauses (``Reconnect``), and reported as a ProtoADError once it has delivered nothing for
``Reconnect.give_up_after`` seconds. Each outage survived is logged and its length kept for the summary.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import ProtoADError
from .source import Source

# Queue depth: a live source keeps at most two frames waiting (the verdict stays fresh); a file
# source reads a few ahead so decoding overlaps inference.
LIVE_QUEUE, FILE_QUEUE = 2, 8
STOP_POLL_S = 0.1  # how often a wait for the next frame looks whether the run was asked to stop
_END = object()


@dataclass(frozen=True)
class Reconnect:
    """How a live source that stops delivering is retried: pauses from ``first`` growing by ``factor`` up
    to ``longest`` seconds, until ``give_up_after`` seconds have passed without a frame."""

    first: float = 0.5
    factor: float = 2.0
    longest: float = 2.0  # a source back after an outage is judged again within this long
    give_up_after: float = 60.0

    def pause(self, attempt: int) -> float:
        """The pause before reconnect attempt ``attempt`` (0-based)."""
        return min(self.first * self.factor**attempt, self.longest)


@dataclass
class Frame:
    index: int  # position in the source; gaps mean a live source dropped frames
    rgb: np.ndarray  # HxWx3 uint8 RGB
    label: str  # the image path, or the source's name
    timestamp: float  # wall-clock seconds (time.time()) when captured
    pos_ms: float | None = None  # position in a video file


class Capture:
    """Reads ``source`` on a thread; ``get`` hands out frames in order.

    ``sleep(seconds) -> bool`` waits between reconnects and returns True when the capture is being
    stopped, and ``clock()`` tells the time; both are injectable so tests can run the schedule without
    real pauses. The capture owns the (already opened) source from ``start`` on and closes it when it
    finishes.
    """

    def __init__(
        self,
        source: Source,
        queue_size: int | None = None,
        reconnect: Reconnect = Reconnect(),
        sleep: Callable[[float], bool | None] | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        arrived: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.reconnect = reconnect
        self.dropped = 0
        self.reconnects = 0
        self.gaps: list[float] = []  # seconds without frames, per outage survived
        self._clock = clock
        size = queue_size or (LIVE_QUEUE if source.live else FILE_QUEUE)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._log = log or (lambda message: None)
        self._done = False
        self.arrived = arrived or threading.Event()  # set whenever something is queued: shared by a run's captures
        self._thread = threading.Thread(target=self._run, name=f"capture {source.name}", daemon=True)

    def start(self) -> Capture:
        self._thread.start()
        return self

    @property
    def ended(self) -> bool:
        """The source has ended (or failed, and its error was raised by ``poll``)."""
        return self._done

    def poll(self) -> Frame | None:
        """The next frame if one is waiting, else None at once; the source's error is raised here."""
        if self._done:
            return None
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Frame):
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        return None

    def get(self, stop: threading.Event | None = None) -> Frame | None:
        """The next frame, waiting for it; None once the source has ended (or ``stop`` is set while
        waiting); the source's error is raised here."""
        while True:
            frame = self.poll()
            if frame is not None or self._done or (stop is not None and stop.is_set()):
                return frame
            self.arrived.wait(STOP_POLL_S)
            self.arrived.clear()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish and wait for it (a camera stuck inside ``read`` is left behind:
        the thread is a daemon, so it cannot keep the process alive)."""
        self._stop.set()
        if self._thread.ident is None:
            self.source.close()
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            final: object = self._loop()
        except ProtoADError as exc:
            final = exc
        except Exception as exc:  # a bug or an OpenCV failure: re-raised in the consumer's thread
            final = exc
        finally:
            self.source.close()
        self._put(final, drop_old=False)

    @property
    def longest_gap(self) -> float:
        return max(self.gaps, default=0.0)

    def _loop(self) -> object:
        name = self.source.name
        index = 0
        failures = 0
        since = 0.0  # when the current outage began
        while not self._stop.is_set():
            got = self.source.read()
            if got is None:
                if not self.source.live:
                    if index == 0:
                        raise ProtoADError(f"no frame could be read from {name}")
                    return _END
                if failures == 0:
                    since = self._clock()
                waited = self._clock() - since
                if waited >= self.reconnect.give_up_after:
                    raise ProtoADError(
                        f"{name} stopped delivering frames: nothing for {waited:.0f} s after {failures} reconnect "
                        f"attempts (--reconnect-timeout {self.reconnect.give_up_after:g} s); check the cable, the "
                        "device or the stream"
                    )
                delay = min(self.reconnect.pause(failures), self.reconnect.give_up_after - waited)
                failures += 1
                self._log(f"{name}: no frame for {waited:.1f} s, reconnect attempt {failures} in {delay:g} s")
                if self._sleep(delay):
                    break
                try:
                    self.source.open()
                except ProtoADError as exc:
                    self._log(str(exc))
                continue
            if failures:
                self.reconnects += 1
                self.gaps.append(self._clock() - since)
                self._log(
                    f"{name}: frames again after {self.gaps[-1]:.1f} s without frames ({failures} reconnect attempts)"
                )
                failures = 0
            rgb, label = got
            self._put(Frame(index, rgb, label, time.time(), self.source.position_ms()), drop_old=self.source.live)
            index += 1
        return _END

    def _put(self, item: object, drop_old: bool) -> None:
        if drop_old:
            while True:
                try:
                    self._queue.put_nowait(item)
                    self.arrived.set()
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                self.arrived.set()
                return
            except queue.Full:
                pass
