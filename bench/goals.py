"""Issue 15's goals, judged from the figures of one `bench/gpu_check.sh` call (or any run of
`bench/train_step.py --json` and `bench/core_losses.py --json` that measured the same configurations):

- training step, against the base loss: 1 Avatar at most +1% time, 8 Avatars at most +3% time,
  peak memory at most +2%;
- the core CWD, MSE and MasKD with 8 Avatars: at most 1.5x the plain loss's time.

    python bench/goals.py OUT_DIR        # reads OUT_DIR/train_step.json and OUT_DIR/core_*.json

Each goal is judged on medians, per Avatar kernel; a goal is met when some kernel meets it (a user
picks the kernel), and the table names which. The step's quartiles are shown beside it: a verdict
whose margin is inside them is the noise's as much as the code's, and says so (the limit, base
time plus the allowed percentage, within the best configuration's quartiles). Figures absent from
the folder are reported as not measured.
"""
from __future__ import annotations

import glob
import json
import os
import sys

STEP_GOALS = ((1, 1.0), (8, 3.0))   # (Avatars, at most +% step time)
MEMORY_GOAL = 2.0                   # at most +% peak memory, any Avatar count
CORE_GOAL = 1.5                     # at most this multiple of the plain loss's time, 8 Avatars
CORE_BASES = ("cwd", "mse", "maskd")


def step_rows(rows: list) -> list:
    """(goal, result, verdict) rows of the training step's goals."""
    base = next((r for r in rows if r["label"] == "base loss"), None)
    if base is None:
        return [("training step", "no base-loss row", "not measured")]
    out = []
    for avatars, limit in STEP_GOALS:
        found = [(r, 100 * (r["ms"] / base["ms"] - 1)) for r in rows if r["avatars"] == avatars]
        if not found:
            out.append((f"{avatars} Avatar(s) at most +{limit:g}% step time", "-", "not measured"))
            continue
        cells = []
        for r, change in found:
            q = r.get("ms_quartiles")
            spread = f", quartiles {q[0]:.0f}-{q[1]:.0f} ms" if q else ""
            cells.append(f"{r['kernel']} {change:+.1f}% ({r['ms']:.1f} ms{spread})")
        best = min(found, key=lambda item: item[1])
        q = base.get("ms_quartiles")
        cells.append(f"base {base['ms']:.1f} ms" + (f", quartiles {q[0]:.0f}-{q[1]:.0f} ms" if q else ""))
        verdict = f"met ({best[0]['kernel']})" if best[1] <= limit else "not met"
        best_q = best[0].get("ms_quartiles")
        if best_q and best_q[0] <= base["ms"] * (1 + limit / 100) <= best_q[1]:
            verdict += ", inside the noise (the limit lies within the quartiles)"
        out.append((f"{avatars} Avatar{'s' if avatars > 1 else ''} at most +{limit:g}% step time", "; ".join(cells),
                    verdict))
    changes = [(r, 100 * (r["peak_mib"] / base["peak_mib"] - 1)) for r in rows if r["avatars"] > 0]
    if changes:
        worst = max(changes, key=lambda item: item[1])
        out.append((f"peak memory at most +{MEMORY_GOAL:g}%",
                    f"{min(c for _, c in changes):+.1f}% to {worst[1]:+.1f}% (worst: {worst[0]['label']})",
                    "met" if worst[1] <= MEMORY_GOAL else "not met"))
    return out


def core_rows(factor: str, rows: list) -> list:
    """(goal, result, verdict) rows of the core's goal, for one factor's figures."""
    out = []
    for base in CORE_BASES:
        plain = next((r for r in rows if r["base"] == base and r["avatars"] == 0), None)
        eight = [r for r in rows if r["base"] == base and r["avatars"] == 8]
        goal = f"core {base}, {factor} factor, 8 Avatars at most x{CORE_GOAL:g} the plain loss"
        if plain is None or not eight:
            out.append((goal, "-", "not measured"))
            continue
        ratios = [(r.get("kernel", "loop"), r["ms"] / plain["ms"]) for r in eight]
        best = min(ratios, key=lambda item: item[1])
        result = "; ".join(f"{kernel} x{ratio:.2f}" for kernel, ratio in ratios) + f" (plain {plain['ms']:.1f} ms)"
        out.append((goal, result, f"met ({best[0]})" if best[1] <= CORE_GOAL else "not met"))
    return out


def judge(folder: str) -> str:
    lines = ["| goal | result | verdict |", "|---|---|---|"]
    rows = []
    step = os.path.join(folder, "train_step.json")
    if os.path.exists(step):
        with open(step) as f:
            rows += step_rows(json.load(f))
    else:
        rows.append(("training step goals", f"no {step}", "not measured"))
    cores = sorted(glob.glob(os.path.join(folder, "core_*.json")))
    for path in cores:
        with open(path) as f:
            rows += core_rows(os.path.basename(path)[len("core_"):-len(".json")], json.load(f))
    if not cores:
        rows.append(("core goals", f"no core_*.json in {folder}", "not measured"))
    lines += [f"| {goal} | {result} | {verdict} |" for goal, result, verdict in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit("usage: python bench/goals.py OUT_DIR (the folder of bench/gpu_check.sh's files)")
    try:
        print(judge(sys.argv[1]))
    except (ValueError, KeyError) as error:  # a file cut short by a time limit
        raise SystemExit(f"goals: cannot read the figures: {error}")


if __name__ == "__main__":
    main()
