"""Progress bars on stderr (click's, so no extra dependency), switchable off for tests and pipes."""

from __future__ import annotations

import sys
from typing import Iterator, TypeVar

import click

T = TypeVar("T")


def progress_bar(items: list[T], label: str, enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    with click.progressbar(items, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar
