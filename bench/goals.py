"""Issue 15's goals, judged from the figures of one `bench/gpu_check.sh` call (or any run of
`bench/train_step.py --json` and `bench/core_losses.py --json` that measured the same configurations):

- training step, against the base loss: 1 Avatar at most +1% time, 8 Avatars at most +3% time,
  peak memory at most +2%;
- the core CWD, MSE and MasKD with 8 Avatars: at most 1.5x the plain loss's time.

    python bench/goals.py OUT_DIR        # reads OUT_DIR/train_step.json and OUT_DIR/core_*.json

Each goal is judged per Avatar kernel; a goal is met when some kernel meets it (a user picks the
kernel), and the table names which. The step's changes are paired by round (bench/train_step.py),
each with its 95% interval: met when the whole interval is within the limit, not met when it is all
beyond, undecided when it holds the limit. The control row (the base loss built twice) says what two
identical configurations differ by in that run. The core's goals are judged on medians. Figures
absent from the folder are reported as not measured.
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


def judged(pct: float, ci, limit: float) -> str:
    """A change (percent) against its limit: met when the whole 95% interval is within it, not met
    when the whole interval is beyond it, and undecided when the interval holds the limit (the run
    cannot tell; more rounds or a quieter machine can)."""
    if ci is None:  # the result cell says so
        return "met" if pct <= limit else "not met"
    if ci[1] <= limit:
        return "met"
    if ci[0] > limit:
        return "not met"
    return f"undecided: the interval holds the limit (+{limit:g}%)"


def _change(row: dict, base: dict):
    """(percent, 95% interval or None): paired by round where train_step.py measured that, else the
    medians' ratio alone."""
    if row.get("vs_base_pct") is not None:
        return row["vs_base_pct"], row.get("vs_base_ci")
    return 100 * (row["ms"] / base["ms"] - 1), None


def _cell(label: str, pct: float, ci) -> str:
    return f"{label} {pct:+.1f}%" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else " (no interval: too few rounds)")


def _failure(row: dict) -> str:
    """A configuration the benchmark could not measure (its ``error``): named, not judged."""
    return f"{row.get('kernel', 'loop')} failed: {row['error'][:80]}"


def step_rows(rows: list) -> list:
    """(goal, result, verdict) rows of the training step's goals."""
    base = next((r for r in rows if r["label"] == "base loss"), None)
    if base is None:
        return [("training step", "no base-loss row", "not measured")]
    out = []
    control = next((r for r in rows if r["label"].endswith("(control)")), None)
    if control is not None:
        pct, ci = _change(control, base)
        apart = ci is not None and (ci[0] > 0 or ci[1] < 0)
        out.append(("control: the base loss built twice (what identical configurations differ by)",
                    _cell("control", pct, ci),
                    "they differ: a change of this size is the configurations', not the code's" if apart
                    else "no difference found" if ci is not None else "cannot tell"))
    for avatars, limit in STEP_GOALS:
        found = [(r, *_change(r, base)) for r in rows if r["avatars"] == avatars and "error" not in r]
        errors = [_failure(r) for r in rows if r["avatars"] == avatars and "error" in r]  # failed warm-ups
        if not found:
            out.append((f"{avatars} Avatar(s) at most +{limit:g}% step time", "; ".join(errors) or "-", "not measured"))
            continue
        cells = [_cell(r["kernel"], pct, ci) for r, pct, ci in found] + errors + [f"base {base['ms']:.1f} ms"]
        verdicts = [(r["kernel"], judged(pct, ci, limit)) for r, pct, ci in found]
        met = [kernel for kernel, verdict in verdicts if verdict.startswith("met")]
        verdict = f"met ({', '.join(met)})" if met else "; ".join(
            verdict if len(verdicts) == 1 else f"{kernel}: {verdict}" for kernel, verdict in verdicts)
        out.append((f"{avatars} Avatar{'s' if avatars > 1 else ''} at most +{limit:g}% step time", "; ".join(cells),
                    verdict))
    changes = [(r, 100 * (r["peak_mib"] / base["peak_mib"] - 1)) for r in rows if r["avatars"] > 0 and "error" not in r]
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
        every = [r for r in rows if r["base"] == base and r["avatars"] == 8]
        eight = [r for r in every if "error" not in r]
        errors = "; ".join(_failure(r) for r in every if "error" in r)
        goal = f"core {base}, {factor} factor, 8 Avatars at most x{CORE_GOAL:g} the plain loss"
        if plain is None or "error" in plain or not eight:
            cause = f"plain failed: {plain['error'][:80]}" if plain is not None and "error" in plain else errors
            out.append((goal, cause or "-", "not measured"))
            continue
        ratios = [(r.get("kernel", "loop"), r["ms"] / plain["ms"]) for r in eight]
        best = min(ratios, key=lambda item: item[1])
        result = "; ".join([f"{kernel} x{ratio:.2f}" for kernel, ratio in ratios] + ([errors] if errors else [])) \
            + f" (plain {plain['ms']:.1f} ms)"
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
