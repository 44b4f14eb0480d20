"""Recorders: the outputs of named submodules of a model, captured by forward hooks while a
``with recorder:`` block runs (MMRazor 1.x's recorders are context managers too)."""
from __future__ import annotations

import difflib
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from akd_cli.errors import UserError


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{role} has no module {name!r}{hint}")
    return modules[name]


class FeatureRecorder:
    """Records the outputs of named submodules inside ``with recorder:`` (and only there).

    A module called once with a tuple output (an FPN neck) yields its levels; a module called once
    per level (a shared head branch) yields one output per call. Entering clears what an earlier
    pass recorded.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str):
        self.outputs: Dict[str, List[torch.Tensor]] = {}
        self.recording = False
        self._handles = [find_module(model, name, role).register_forward_hook(self._hook(name))
                         for name in dict.fromkeys(names)]

    def _hook(self, name):
        def record(module, inputs, output):
            if self.recording:
                self.outputs.setdefault(name, []).append(output)
        return record

    def __enter__(self) -> "FeatureRecorder":
        self.outputs = {}
        self.recording = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.recording = False

    def levels(self, name: str) -> List[torch.Tensor]:
        calls = self.outputs.get(name, [])
        if len(calls) == 1 and isinstance(calls[0], (tuple, list)):
            return list(calls[0])
        return list(calls)
