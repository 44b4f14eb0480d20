"""Figures (matplotlib, written as PNG; no display needed): a study's AP against each of its grid
axes with 95% intervals, and training curves of runs from their mmcv JSON logs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from akd_cli import fileio
from akd_cli.errors import UserError


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display wanted or needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return fileio.atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def study_plots(result: Dict[str, Any], out: Path, metric: str = "AP") -> List[Path]:
    """AP (mean, 95% interval of the mean; a lone seed: its point) against each numeric setting the
    configurations vary, one line per combination of the others; without such an axis, one point
    per configuration."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r.get(metric)]
    if not rows:
        return []
    keys = sorted({k for r in rows for k in r["settings"]})
    varying = [k for k in keys if len({json.dumps(r["settings"].get(k)) for r in rows}) > 1]
    axes = [k for k in varying if _numeric([r["settings"].get(k) for r in rows if k in r["settings"]])
            and all(k in r["settings"] for r in rows)]
    written = []

    def point(row):
        s = row[metric]
        low, high = (s["ci"] if s["ci"] else (s["mean"], s["mean"]))
        return 100 * s["mean"], 100 * (s["mean"] - low), 100 * (high - s["mean"])

    for axis in axes:
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: Dict[str, list] = {}
        for row in rows:
            rest = ", ".join(f"{k}={row['settings'][k]}" for k in sorted(row["settings"]) if k != axis)
            groups.setdefault(rest or "all", []).append(row)
        for label, members in groups.items():
            members.sort(key=lambda r: r["settings"][axis])
            xs = [r["settings"][axis] for r in members]
            ys, lows, highs = zip(*(point(r) for r in members))
            ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=4, label=label)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{metric} (mean, 95% CI over seeds)")
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
        written.append(_save(fig, out / f"{metric}_vs_{axis}.png"))
        plt.close(fig)
    if not axes:
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 4))
        ys, lows, highs = zip(*(point(r) for r in rows))
        xs = range(len(rows))
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=5)
        for i, row in enumerate(rows):  # every seed's value beside its mean
            seeds = list(row.get(f"{metric}_by_seed", {}).values())
            ax.scatter([i + 0.12] * len(seeds), [100 * v for v in seeds], s=10, color="grey", zorder=3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["configuration"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} (mean, 95% CI; grey: seeds)")
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, out / f"{metric}_by_configuration.png"))
        plt.close(fig)
    return written


# --- training curves ---------------------------------------------------------------------------------

def read_log(work_dir: Path) -> Dict[str, Any]:
    """The newest mmcv JSON log of a work dir: training scalars by iteration, validation by epoch."""
    logs = sorted(Path(work_dir).glob("*.log.json"))
    if not logs:
        raise UserError(f"no training log (*.log.json) in {work_dir}")
    raw: Dict[str, List] = {}
    val: Dict[str, List] = {}
    for path in logs:  # a resumed run continues in a new log: read them in order
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or "mode" not in record:
                continue
            if record["mode"] == "train":
                where = (record.get("epoch", 1), record.get("iter", 0))
                for key, value in record.items():
                    if isinstance(value, (int, float)) and (key.startswith(("loss", "akd_", "sigma_")) or key == "lr"):
                        raw.setdefault(key, []).append((*where, float(value)))
            elif record["mode"] == "val":
                for key, value in record.items():
                    if key.startswith("bbox_mAP") and isinstance(value, (int, float)):
                        val.setdefault(key, []).append((record.get("epoch", len(val.get(key, [])) + 1), float(value)))
    # mmcv logs the iteration within the epoch: the longest epoch seen sets the scale
    per_epoch = max((it for points in raw.values() for _, it, _ in points), default=0)
    train = {key: [((epoch - 1) * per_epoch + it, value) for epoch, it, value in points] for key, points in raw.items()}
    return {"train": train, "val": val}


def curves(work_dirs: Sequence[Path], out: Path, keys: Sequence[str] = ()) -> Path:
    """One figure: a panel per scalar (task losses, each AKD term and level, the running sigma,
    validation AP per epoch), one line per run."""
    plt = pyplot()
    logs = {str(w): read_log(Path(w)) for w in work_dirs}
    found = sorted({k for log in logs.values() for k in log["train"]})
    wanted = [k for k in found if not keys or k in keys or any(k.startswith(p) for p in keys)]
    if keys and not wanted:
        raise UserError(f"none of {', '.join(keys)} is in the logs; they have {', '.join(found)}")
    panels = [("train", k) for k in wanted] + [("val", "bbox_mAP")] * any(log["val"] for log in logs.values())
    if not panels:
        raise UserError("the logs hold no training scalars")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (mode, key) in zip(axes.flat, panels):
        for name, log in logs.items():
            points = log[mode].get(key, [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [100 * y for y in ys] if mode == "val" else ys, marker="o" if mode == "val" else None,
                        linewidth=1, label=Path(name).name or name)
        ax.set_title(("val " if mode == "val" else "") + key, fontsize=9)
        ax.set_xlabel("epoch" if mode == "val" else "iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, Path(out))
    plt.close(fig)
    return path
