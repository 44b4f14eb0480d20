"""`akd table`: metrics.json files -> the paper's result tables, with our numbers beside the paper's.

Pure Python (json and the presets): no torch, no mmdet.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from akd_cli import fileio
from akd_cli.errors import UserError
from akd_cli.names import EVAL_ROLES
from akd_cli.presets import Preset, list_presets

START, END = "<!-- akd-table:start -->", "<!-- akd-table:end -->"
ROLES = EVAL_ROLES
METHOD_NAMES = {"cwd": "CWD", "mgd": "MGD", "maskd": "MasKD", "fgd": "FGD", "pkd": "PKD", "mse": "MSE"}
SECTIONS = (("baseline", "Baseline settings"), ("stronger", "Stronger teachers"), ("tiny", "Tiny presets (synthetic data)"))


@dataclass
class Row:
    preset: Preset
    ours: Dict[str, float] = field(default_factory=dict)   # role -> AP in percent (the mean over runs)
    methods: Dict[str, str] = field(default_factory=dict)  # role -> base loss that produced it
    spread: Dict[str, Tuple[float, int]] = field(default_factory=dict)  # role -> (sd, n) when several runs

    @property
    def section(self) -> str:
        return "tiny" if self.preset.tiny else (self.preset.table or "")

    def paper(self, role: str) -> Optional[float]:
        return {"baseline": self.preset.student.reference_map, "teacher": self.preset.teacher.reference_map,
                "kd": self.kd_paper(self.preset.method), "akd": self.preset.reference_akd_map}.get(role)

    def kd_paper(self, method: str) -> Optional[float]:
        """The base loss's own published number (MasKD's, for rows whose base loss is MasKD): the
        paper's tables have no KD column, so a reader sees what the Avatars add over the base."""
        p = self.preset
        return p.reference_kd_map if p.reference_kd_source and method == p.method else None

    def kd_label(self, method: str) -> str:
        return f" ({self.preset.reference_kd_source})" if self.kd_paper(method) is not None else ""


def collect(paths: Iterable[Path]) -> Tuple[List[dict], List[str]]:
    """All metrics.json records under the given files or directories; corrupt ones become problems."""
    records, problems = [], []
    files: List[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("metrics.json")))
        else:
            problems.append(f"{path}: not found")
    for file in files:
        try:
            record = json.loads(file.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            ap = record["metrics"]["AP"]
            if not isinstance(ap, (int, float)) or isinstance(ap, bool):
                raise ValueError("metrics.AP is not a number")
            if record.get("role") not in ROLES + ("student", "detector"):
                raise ValueError(f"unknown role {record.get('role')!r}")
            if not isinstance(record.get("preset"), str):
                raise ValueError("no preset")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{file}: skipped ({type(exc).__name__}: {exc})")
            continue
        record["_file"] = str(file)
        records.append(record)
    return records, problems


def build_rows(records: List[dict], presets: Optional[List[Preset]] = None) -> List[Row]:
    """One row per preset of the paper's tables, plus tiny presets that have measurements.
    Several evaluations of one checkpoint: the most recent counts. Several checkpoints of one
    (preset, role), such as a study's seeds: the cell is their mean, with sd and n beside it."""
    import statistics

    presets = presets if presets is not None else list_presets()
    by_name = {p.name: Row(p) for p in presets}
    latest: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for record in records:
        row, role = by_name.get(record["preset"]), record["role"]
        if row is None or role not in ROLES:
            continue
        runs = latest.setdefault((record["preset"], role), {})
        checkpoint = str(record.get("checkpoint") or record.get("_file"))
        if checkpoint in runs and str(runs[checkpoint].get("date", "")) > str(record.get("date", "")):
            continue
        runs[checkpoint] = record
    for (preset, role), runs in latest.items():
        row = by_name[preset]
        values = [100.0 * float(r["metrics"]["AP"]) for r in runs.values()]
        row.ours[role] = statistics.fmean(values)
        if len(values) > 1:
            row.spread[role] = (statistics.stdev(values), len(values))
        methods = {r["method"] for r in runs.values() if r.get("method")}
        if methods:
            row.methods[role] = sorted(methods)[0]
    rows = [row for row in by_name.values() if row.section in ("baseline", "stronger") or row.ours]
    return sorted(rows, key=lambda r: (r.preset.table_row, r.preset.name))


def _cell(paper: Optional[float], ours: Optional[float], label: str = "", spread=None) -> str:
    p = "-" if paper is None else f"{paper:.1f}{label}"
    o = "-" if ours is None else f"{ours:.1f}" + (f" ± {spread[0]:.1f} (n={spread[1]})" if spread else "")
    delta = f" ({ours - paper:+.1f})" if paper is not None and ours is not None else ""
    return f"{p} / {o}{delta}"


HEADER = ("Student", "Teacher", "Base loss", "Student mAP", "Teacher mAP", "KD mAP", "AvatarKD mAP")
PAPER_SIGMA_COLUMN = "AvatarKD, paper's sigma"


def header(rows: List[Row]) -> Tuple[str, ...]:
    """The table's columns: the paper's, and ours with the paper's sigma when anything measured it."""
    return HEADER + ((PAPER_SIGMA_COLUMN,) if any("akd-paper" in r.ours for r in rows) else ())


def row_cells(row: Row, columns: Tuple[str, ...] = HEADER) -> List[str]:
    p = row.preset
    method = row.methods.get("akd") or row.methods.get("kd") or p.method
    avatars = f", {p.num_avatars} Avatar{'s' if p.num_avatars != 1 else ''}"
    cells = [p.student.name or p.name, p.teacher.name or "-", METHOD_NAMES.get(method, method) + avatars,
             _cell(p.student.reference_map, row.ours.get("baseline"), spread=row.spread.get("baseline")),
             _cell(p.teacher.reference_map, row.ours.get("teacher"), spread=row.spread.get("teacher")),
             _cell(row.kd_paper(method), row.ours.get("kd"), row.kd_label(method), spread=row.spread.get("kd")),
             _cell(p.reference_akd_map, row.ours.get("akd"), spread=row.spread.get("akd"))]
    if PAPER_SIGMA_COLUMN in columns:  # the paper's tables have no such column: ours alone
        cells.append(_cell(None, row.ours.get("akd-paper"), spread=row.spread.get("akd-paper")))
    return cells


def render_markdown(rows: List[Row]) -> str:
    lines = ["Each cell: paper / ours (ours - paper), COCO box mAP. '-': not measured. "
             "KD: the base loss without Avatars; where it is MasKD, the paper side is MasKD's own published "
             "number, labelled (MasKD). Ours: `akd eval` of the checkpoints `akd table` was given; several "
             "checkpoints of one cell (a study's seeds): their mean ± sd (n=runs)."]
    for key, title in SECTIONS:
        section = [r for r in rows if r.section == key]
        if not section:
            continue
        columns = header(section)
        lines += ["", f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "|".join(":---:" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row_cells(r, columns)) + " |" for r in section]
    return "\n".join(lines) + "\n"


def render_csv(rows: List[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", "preset", "student", "teacher", "method",
                     *[f"{role}_{src}" for role in ("student", "teacher", "kd", "akd") for src in ("paper", "ours")]])
    for r in rows:
        values = []
        for role in ("baseline", "teacher", "kd", "akd"):
            values += [_fmt(r.paper(role)), _fmt(r.ours.get(role))]
        writer.writerow([r.section, r.preset.name, r.preset.student.name, r.preset.teacher.name, r.preset.method, *values])
    return out.getvalue()


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1f}"


def render_json(rows: List[Row]) -> str:
    return json.dumps([{"table": r.section, "preset": r.preset.name, "student": r.preset.student.name,
                        "teacher": r.preset.teacher.name, "method": r.preset.method,
                        "paper": {role: r.paper(role) for role in ("baseline", "teacher", "kd", "akd")},
                        "ours": {role: round(v, 2) for role, v in r.ours.items()},
                        "ours_sd_n": {role: [round(sd, 2), n] for role, (sd, n) in r.spread.items()}}
                       for r in rows], indent=2) + "\n"


def splice(text: str, block: str, path: str = "README") -> str:
    """The text with ``block`` between the markers (added at the end if missing); nothing else changes."""
    starts, ends = text.count(START), text.count(END)
    if starts == 0 and ends == 0:
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{separator}{START}\n{block}{END}\n"
    if starts != 1 or ends != 1 or text.index(START) > text.index(END):
        raise UserError(f"{path}: expected one '{START}' followed by one '{END}', found {starts} and {ends}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def update_readme(path: Path, block: str, check: bool = False) -> bool:
    """Write the block between the markers. Returns True when the file changed (or, with ``check``,
    would change); with ``check`` nothing is written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--readme {path} is a directory, not a file")
    # A missing README is made (the demo's work dir starts without one), but a missing directory is
    # far likelier a mistyped path than a wish for new directories.
    if not path.exists() and not path.parent.exists():
        raise UserError(f"--readme {path}: no such file, and no directory {path.parent} to make it in")
    try:
        text = path.read_text() if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    new = splice(text, block, str(path))
    if new == text:
        return False
    if not check:
        fileio.write_text(path, new)
    return True
