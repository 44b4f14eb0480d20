"""Atomic file writes: a temporary sibling, flushed and fsynced, then renamed over the target.

A reader (or a run killed mid-write) sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Union

from akd_cli.errors import UserError

PathLike = Union[str, Path]


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def ensure_dir(path: PathLike, role: str = "directory") -> Path:
    """``path`` as a directory (made with its parents), or one line saying why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot use {role} {path}: a file of that name exists") from None
    except OSError as exc:
        raise UserError(f"cannot create {role} {path}: {_reason(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {role} {path}: permission denied")
    return path


def atomic_write(path: PathLike, write: Callable[[object], None], binary: bool = False) -> Path:
    """Write ``path`` through a sibling temporary file; an OS refusal (a directory of that name, a
    read-only or missing parent) is one line, and the old file is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    ensure_dir(path.parent)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {_reason(exc)}") from None
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
