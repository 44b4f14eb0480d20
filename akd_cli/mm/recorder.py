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


class _Recorder:
    """What a hook records per module name, kept only inside ``with recorder:``; entering clears
    what an earlier pass recorded."""

    def __init__(self):
        self.calls: Dict[str, list] = {}
        self.recording = False

    def _store(self, name: str, value) -> None:
        if self.recording:
            self.calls.setdefault(name, []).append(value)

    def __enter__(self):
        self.calls = {}
        self.recording = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.recording = False


class FeatureRecorder(_Recorder):
    """Records the outputs of named submodules inside ``with recorder:`` (and only there).

    A module called once with a tuple output (an FPN neck) yields its levels; a module called once
    per level (a shared head branch) yields one output per call.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str, where: Optional[Dict[str, str]] = None):
        super().__init__()
        self._handles = [find_module(model, name, role, (where or {}).get(name)).register_forward_hook(
            lambda module, inputs, output, name=name: self._store(name, output)) for name in dict.fromkeys(names)]

    def levels(self, name: str) -> List[torch.Tensor]:
        calls = self.calls.get(name, [])
        if len(calls) == 1 and isinstance(calls[0], (tuple, list)):
            return list(calls[0])
        return list(calls)


class InputRecorder(_Recorder):
    """Records the positional inputs at given indices of named modules inside ``with recorder:``
    (the student's RoIs as its RoI extractor receives them): ``calls[name]`` holds one list per call."""

    def __init__(self, model: nn.Module, specs: Dict[str, Sequence[int]], role: str,
                 where: Optional[Dict[str, str]] = None):
        super().__init__()
        self._handles = [find_module(model, name, role, (where or {}).get(name)).register_forward_pre_hook(
            lambda module, inputs, name=name, indices=tuple(indices): self._store(name, [inputs[i] for i in indices]))
            for name, indices in specs.items()]
