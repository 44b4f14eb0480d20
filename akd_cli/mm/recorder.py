"""Recorders: the outputs of named submodules of a model, captured by forward hooks while a
``with recorder:`` block runs (MMRazor 1.x's recorders are context managers too)."""
from __future__ import annotations

import difflib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from akd_cli.errors import UserError


def find_module(model: nn.Module, name: str, role: str, where: Optional[str] = None) -> nn.Module:
    """The named submodule; an unknown name is refused with the closest names (and, given ``where``,
    the preset field that named it)."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{where + ': ' if where else ''}{role} has no module {name!r}{hint}")
    return modules[name]


class FeatureRecorder:
    """Records the outputs of named submodules inside ``with recorder:`` (and only there).

    A module called once with a tuple output (an FPN neck) yields its levels; a module called once
    per level (a shared head branch) yields one output per call. Entering clears what an earlier
    pass recorded.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str, where: Optional[Dict[str, str]] = None):
        self.outputs: Dict[str, List[torch.Tensor]] = {}
        self.recording = False
        self._handles = [find_module(model, name, role, (where or {}).get(name)).register_forward_hook(self._hook(name))
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


class InputRecorder:
    """Records the positional inputs at given indices of named modules inside ``with recorder:``
    (the student's RoIs as its RoI extractor receives them)."""

    def __init__(self, model: nn.Module, specs: Dict[str, Sequence[int]], role: str, where: Optional[Dict[str, str]] = None):
        self.inputs: Dict[str, List[List[torch.Tensor]]] = {}
        self.recording = False
        self._handles = [find_module(model, name, role, (where or {}).get(name)).register_forward_pre_hook(
            self._hook(name, list(indices))) for name, indices in specs.items()]

    def _hook(self, name, indices):
        def record(module, inputs):
            if self.recording:
                self.inputs.setdefault(name, []).append([inputs[i] for i in indices])
        return record

    def __enter__(self) -> "InputRecorder":
        self.inputs = {}
        self.recording = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.recording = False
