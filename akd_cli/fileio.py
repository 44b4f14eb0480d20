"""Atomic file writes: a temporary sibling, flushed and fsynced, then renamed over the target.

A reader (or a run killed mid-write) sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[object], None], binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path


def write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def write_json(path: PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def copy(source: PathLike, target: PathLike) -> Path:
    with open(source, "rb") as src:
        return atomic_write(target, lambda f: shutil.copyfileobj(src, f), binary=True)
