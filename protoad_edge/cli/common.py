"""What every CLI shares: user errors become one line on stderr and a non-zero exit, never a traceback; options
that mean the same in every command are written once here."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import click

from ..errors import ProtoADError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_TERMINATED = 143  # 128 + SIGTERM


def threads_option(what: str) -> Callable[[F], F]:
    """--threads, one meaning in every CLI that has it: CPU threads for ``what``, 0 = all cores."""
    return click.option(
        "--threads",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help=f"CPU threads for {what} (0 = all cores).",
    )


def cpu_threads(threads: int) -> int:
    """--threads as a count: 0 (all cores) becomes the core count, so every library gets the same number."""
    return threads or os.cpu_count() or 1


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(func: F) -> F:
    """Turn ProtoADError (and the OS errors of files the user named) into one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ProtoADError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as exc:
            fail(f"{exc.strerror}: {exc.filename}")
        except OSError as exc:
            if exc.filename:
                fail(f"{exc.strerror or exc}: {exc.filename}")
            raise

    return wrapper  # type: ignore[return-value]
