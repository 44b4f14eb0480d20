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
    if _compile_failure(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"torch.compile could not build the compiled Avatar passes ({first[:200]}); "
                "run with --avatar-kernel loop")
    return None


def _compile_failure(exc: BaseException) -> bool:
    """torch.compile's own failures (no C++ compiler, no Triton for this GPU, ...): the user can
    act on them by choosing the loop."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:
        return False
    return isinstance(exc, BackendCompilerFailed) or type(exc).__name__ in ("InductorError", "InvalidCxxCompiler")
