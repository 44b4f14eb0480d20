"""Checkpoints: loading them safely, checking that they fit a model, writing them atomically, and
exporting the student as a plain mmdet checkpoint.

Loading goes through ``torch.load(weights_only=True)`` unless the user chose otherwise
(``--trust-checkpoint``): a checkpoint that needs pickled code to load is refused in one line.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

STUDENT_PREFIX = "student."
TRUST_ENV = "AKD_TRUST_CHECKPOINTS"


class CheckpointLoadError(Exception):
    """A checkpoint file that cannot be loaded; the message says why in one line."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint that only a code-executing unpickler can read, and the user did not opt in."""


class CorruptCheckpointError(CheckpointLoadError):
    """Not a checkpoint torch can read: truncated, corrupt, or another kind of file."""


class CheckpointMismatch(ValueError):
    """Weights that do not fit the model they are loaded into; the message names the keys."""


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "") not in ("", "0", "false", "no")


def load_checkpoint_file(filename: str, map_location=None):
    """torch.load with weights_only=True unless the user opted in (``--trust-checkpoint``)."""
    import pickle
    import re

    import torch

    try:
        return torch.load(filename, map_location=map_location, weights_only=not trusted())
    except pickle.UnpicklingError as exc:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if needs:
            raise UnsafeCheckpointError(
                f"{filename} holds Python objects ({needs.group(1)}) that can only be loaded by running pickled "
                f"code; if you trust where it came from, pass --trust-checkpoint (or set {TRUST_ENV}=1)") from None
        raise CorruptCheckpointError(f"cannot read checkpoint {filename}: corrupt, truncated or not a torch file") from None
    except (OSError, MemoryError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise CorruptCheckpointError(f"cannot read checkpoint {filename}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 (a damaged file fails anywhere in the unpickler: KeyError, RuntimeError, ...)
        raise CorruptCheckpointError(f"cannot read checkpoint {filename}: corrupt, truncated or not a torch file "
                                     f"({type(exc).__name__})") from None


def cached_download(url: str, model_dir=None) -> str:
    """The local copy of a URL in torch's hub cache, downloaded once (never half-written)."""
    import torch.hub

    model_dir = model_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(model_dir, exist_ok=True)
    cached = os.path.join(model_dir, os.path.basename(url.split("?")[0]))
    if not os.path.exists(cached):
        partial = f"{cached}.partial-{os.getpid()}"
        torch.hub.download_url_to_file(url, partial, progress=True)
        os.replace(partial, cached)
    return cached


def without_ddp_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Weights saved from a DDP-wrapped model carry a ``module.`` prefix; the bare model's keys do not."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def read_checkpoint(checkpoint: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(weights, meta) of a local checkpoint file (``module.`` prefixes of DDP dropped; meta empty
    when it has none); one line when it cannot be read or holds no weights."""
    from akd_cli.errors import UserError

    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint not found: {checkpoint}")
    try:
        state = load_checkpoint_file(checkpoint, map_location="cpu")
    except CheckpointLoadError as exc:
        raise UserError(str(exc)) from None
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserError(f"{checkpoint} holds no state dict")
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    return without_ddp_prefix(state_dict), meta


def load_state_dict(checkpoint: str) -> Dict[str, Any]:
    """The weights of a local checkpoint file (``module.`` prefixes of DDP dropped)."""
    return read_checkpoint(checkpoint)[0]


def load_weights(model, checkpoint: str, role: str) -> None:
    """Load a checkpoint (path or URL) into a model; one that does not fit names the mismatched keys."""
    from mmcv.runner.checkpoint import CheckpointLoader

    state = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")  # weights_only: see compat
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else state
    load_checked(model, without_ddp_prefix(state_dict), checkpoint, role)


def load_checked(model, state_dict: dict, checkpoint: str, role: str) -> None:
    """Load weights that fit the model (``check_fits``), else raise CheckpointMismatch naming the keys."""
    check_fits(model, state_dict, checkpoint, role)
    model.load_state_dict(state_dict, strict=False)  # check_fits was strict about everything but counters


def check_fits(model, state_dict: dict, checkpoint: str, role: str) -> None:
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is a counter, not a weight; checkpoints of older torch lack it.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                   if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es): {few(wrong_shape)}")
        raise CheckpointMismatch(f"{checkpoint} does not fit the {role} model: {'; '.join(parts)}")


def atomic_torch_save(obj, path) -> str:
    """torch.save through akd_cli.fileio: the target is never half-written."""
    import torch

    from akd_cli import fileio

    return str(fileio.atomic_write(path, lambda f: torch.save(obj, f), binary=True))


def checkpoint_role(state_dict: Dict[str, object]) -> str:
    """'distiller' for a full akd checkpoint, else 'detector' (an exported student or a teacher)."""
    return "distiller" if any(k.startswith(STUDENT_PREFIX) for k in state_dict) else "detector"


def student_state_dict(state_dict: Dict[str, object]) -> Dict[str, object]:
    if checkpoint_role(state_dict) == "distiller":
        return {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
    return dict(state_dict)


def export_student(full_checkpoint: str, out: str) -> str:
    """Write the student of a full distiller checkpoint as a plain mmdet checkpoint
    (``meta`` + ``state_dict``), loadable by mmdet's own tools without akd."""
    full_checkpoint = os.path.realpath(full_checkpoint)
    state = load_checkpoint_file(full_checkpoint, map_location="cpu")
    meta = dict(state.get("meta", {}))
    keep = {k: meta[k] for k in ("mmdet_version", "akd_version", "CLASSES", "epoch", "iter", "time") if k in meta}
    keep["exported_from"] = os.path.basename(full_checkpoint)
    return atomic_torch_save({"meta": keep, "state_dict": student_state_dict(state["state_dict"])}, out)
