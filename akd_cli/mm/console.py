"""What a training or evaluation run shows on the console: its own progress, warnings, errors.

mmcv's progress bars and pycocotools' "loading annotations into memory..." go to stdout and
interleave with the rich progress bar; mmdet's logger writes everything that matters to the
run's log file as well. While ``stack_stdout_hidden`` is active those prints are dropped, and the
progress bars write to the stdout that was there before.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional, TextIO

_visible_stdout: Optional[TextIO] = None


@contextlib.contextmanager
def stack_stdout_hidden(hide: bool = True) -> Iterator[None]:
    global _visible_stdout
    if not hide or _visible_stdout is not None:
        yield
        return
    _visible_stdout = sys.stdout
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        _visible_stdout = None


def progress_console():
    """A rich console on the stdout the user sees, also while the stack's prints are hidden."""
    from rich.console import Console

    return Console(file=_visible_stdout) if _visible_stdout is not None else Console()


def progress(*columns):
    """A rich progress display on the user's stdout; the columns follow the standard bar and counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(*columns[:1], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), *columns[1:], console=progress_console())
