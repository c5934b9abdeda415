"""Progress on stderr that reads well on a terminal and in a log file.

On a terminal: click's bar (no extra dependency). Elsewhere (systemd, docker logs, a file), a bar
is one garbled line, so a plain line with counts and units is written every ``EVERY_S`` seconds,
and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import click

T = TypeVar("T")
EVERY_S = 10.0


def progress_bar(
    items: Sequence[T], label: str, enabled: bool = True, *, unit: str = "items", sizes: Sequence[int] | None = None
) -> Iterator[T]:
    """Yield ``items``, reporting progress in ``unit`` (``sizes``: units per item, default one each)."""
    if not enabled:
        yield from items
        return
    weights = list(sizes) if sizes is not None else [1] * len(items)
    total = sum(weights)
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=f"{label} ({unit})", file=sys.stderr, show_pos=True) as bar:
            for item, weight in zip(items, weights):
                yield item
                bar.update(weight)
        return
    start = last = time.monotonic()
    done = 0
    for item, weight in zip(items, weights):
        yield item
        done += weight
        now = time.monotonic()
        if now - last >= EVERY_S and done < total:
            left = (now - start) / done * (total - done)
            print(
                f"{label}: {done:,}/{total:,} {unit} ({100 * done / total:.0f}%), {now - start:,.0f} s, "
                f"about {left:,.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            last = now
    print(f"{label}: {done:,} {unit} in {time.monotonic() - start:,.1f} s", file=sys.stderr, flush=True)
