"""Checkpoint helpers: atomic writes and the export of the student as a plain mmdet checkpoint."""
from __future__ import annotations

import os
from typing import Dict

STUDENT_PREFIX = "student."


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
    from akd_cli.mm import compat

    full_checkpoint = os.path.realpath(full_checkpoint)
    state = compat.load_checkpoint_file(full_checkpoint, map_location="cpu")
    meta = dict(state.get("meta", {}))
    keep = {k: meta[k] for k in ("mmdet_version", "akd_version", "CLASSES", "epoch", "iter", "time") if k in meta}
    keep["exported_from"] = os.path.basename(full_checkpoint)
    return atomic_torch_save({"meta": keep, "state_dict": student_state_dict(state["state_dict"])}, out)
