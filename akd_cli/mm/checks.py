"""Input checks done before any work starts, and the translation of known failures into one line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from akd_cli.errors import UserError


def check_checkpoint_path(checkpoint: Optional[str], role: str) -> None:
    if checkpoint and "://" not in checkpoint and not Path(checkpoint).expanduser().is_file():
        raise UserError(f"{role} checkpoint not found: {checkpoint}")


def friendly_message(exc: BaseException) -> Optional[str]:
    """One line for failures a user can act on; None for bugs (those keep their traceback)."""
    from akd_cli.mm.checkpoints import CheckpointLoadError, CheckpointMismatch

    if isinstance(exc, (UserError, CheckpointLoadError, CheckpointMismatch, FileNotFoundError, FloatingPointError)):
        return str(exc)
    return None
