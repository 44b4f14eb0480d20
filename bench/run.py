"""The benchmark suite: one command, one report (bench/RESULTS.md).

    python bench/run.py                 # everything this machine can run (CUDA parts when present)
    python bench/run.py --only startup,eval

Every figure in the report comes with the machine, the date and the command that produced it.
Measured against these goals: AKD with 1 Avatar adds at most 2% to a real training step, with 8
Avatars at most 10% time and 5% peak memory; `akd --help` under 0.3 s; `akd eval` no slower than
mmdet's own test path.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # akd_cli from this checkout, also without the editable install
PY = sys.executable
AKD = [PY, "-m", "akd_cli.cli"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2 ** 20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def timed(cmd, cwd=None, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def commit() -> str:
    """The checkout's commit, and whether its files differ from it (figures of uncommitted code say so)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "akd_cli", "bench", "presets",
                ":!bench/RESULTS.md").stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def section(title: str, command: str, body: str, note: str = "") -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nCommit: {commit()}  \n"
            f"Date: {stamp}\n\n{body}\n")
    return text + (f"\n{note}\n" if note else "")


def bench_startup(repeats: int = 10) -> str:
    akd_bin = Path(PY).parent / "akd"
    cmd = [str(akd_bin), "--help"] if akd_bin.exists() else AKD + ["--help"]
    timed(cmd)  # warm the file cache
    times = [timed(cmd) for _ in range(repeats)]
    med = statistics.median(times)
    body = (f"| | median | min | max |\n|---|---|---|---|\n"
            f"| `akd --help` ({repeats} runs) | {med:.3f} s | {min(times):.3f} s | {max(times):.3f} s |")
    verdict = f"Goal: under 0.3 s: {'met' if med < 0.3 else 'NOT met'}."
    return section("`akd --help` start-up", " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), body, verdict)


def bench_core(device: str, uncertainty: str = "release", bases: str = "", avatars: str = "") -> str:
    # A GPU step takes milliseconds: more repeats for a stable median at no real cost.
    cmd = [PY, str(BENCH / "core_losses.py"), "--device", device, "--repeats", "20" if device == "cuda" else "5",
           "--uncertainty", uncertainty] + (["--bases", bases] if bases else []) + (["--avatars", avatars] if avatars else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    from akd_cli.core.losses import BASE_LOSSES

    fused = [name for name, cls in BASE_LOSSES.items() if cls.fusable]
    looped = [name for name, cls in BASE_LOSSES.items() if not cls.fusable]
    note = ("Cells: the plain base loss's forward+backward time and peak memory, then AKD's as multiples of it. "
            f"From 2 Avatars, {', '.join(fused)} fuse the Avatars before the student-side term"
            + (f"; {', '.join(looped)} loop{'s' if len(looped) == 1 else ''} over them" if looped else "")
            + ". " + {"release": "The release's factor standardises the student (and MGD's, MasKD's, FGD's, PKD's, "
                                 "MSE's Avatars) with batch statistics.",
                      "paper": "The paper's factor draws the Avatars twice (once for sigma, once for the loss) "
                               "and divides Avatars and student by sigma.",
                      "none": "No factor: one Avatar is the base loss on it."}[uncertainty])
    return section(f"AKD core, {uncertainty} factor: loss forward+backward, ResNet-50 FPN shapes at 1333x800, batch 2 "
                   f"({device})",
                   " ".join(["python bench/core_losses.py"] + cmd[2:]), out.strip(), note)


def bench_train_step(preset: str, size: str, batch: int, device: str, repeats: int) -> str:
    import json

    from goals import judged

    with tempfile.TemporaryDirectory(prefix="akd-bench-step-") as scratch:
        figures = os.path.join(scratch, "train_step.json")
        cmd = [PY, str(BENCH / "train_step.py"), "--preset", preset, "--size", size, "--batch", str(batch),
               "--device", device, "--repeats", str(repeats)]
        out = subprocess.run(cmd + ["--json", figures], check=True, capture_output=True, text=True, cwd=REPO).stdout.strip()
        with open(figures) as f:
            rows = {r["label"]: r for r in json.load(f)}
    base = rows["base loss"]

    def change(label, limit):
        pct, ci = rows[label]["vs_base_pct"], rows[label]["vs_base_ci"]
        spread = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
        return f"{pct:+.1f}%{spread} time (goal <= +{limit}%: {judged(pct, ci, limit)})"

    memory = 100 * (rows["AKD, 8 Avatars"]["peak_mib"] / base["peak_mib"] - 1)
    verdict = (f"Against the base loss, paired by round (median, 95% interval): 1 Avatar {change('AKD, 1 Avatar', 2)}; "
               f"8 Avatars {change('AKD, 8 Avatars', 10)}, {memory:+.1f}% peak memory "
               f"(goal <= +5%: {'met' if memory <= 5 else 'not met'}).")
    return section(f"Training step: {preset}, {size}, batch {batch} ({device})",
                   " ".join(["python bench/train_step.py"] + cmd[2:]), out, verdict)


def bench_eval(repeats: int = 3) -> str:
    """`akd eval` against mmdet's tools/test.py: whole commands, same checkpoint and data."""
    import mmdet

    scratch = Path(tempfile.mkdtemp(prefix="akd-bench-eval-"))
    try:
        data = scratch / "synth"
        subprocess.run(AKD + ["data", "synth", "--out", str(data), "--train-images", "16", "--val-images", "64"],
                       check=True, capture_output=True)
        work = scratch / "run"
        subprocess.run(AKD + ["train", "--preset", "tiny-fcos-r34-r18", "--method", "none", "--data-root", str(data),
                              "--work-dir", str(work), "--epochs", "1", "--no-validate"], check=True, capture_output=True)
        tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "test.py"
        ours = AKD + ["eval", str(work / "student.pth"), "--out", str(scratch / "m.json")]
        theirs = [PY, str(tool), str(work / "student_config.py"), str(work / "student.pth"), "--eval", "bbox"]
        timed(ours)
        timed(theirs)
        t_ours = statistics.median(timed(ours) for _ in range(repeats))
        t_theirs = statistics.median(timed(theirs) for _ in range(repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = ("| command (64 images, 128 px, tiny FCOS-R18, 1 worker) | median wall time |\n|---|---|\n"
            f"| `akd eval student.pth` | {t_ours:.2f} s |\n"
            f"| `python mmdet/.mim/tools/test.py student_config.py student.pth --eval bbox` | {t_theirs:.2f} s |")
    verdict = (f"`akd eval` / mmdet: x{t_ours / t_theirs:.2f} "
               f"(goal: no slower: {'met' if t_ours <= t_theirs * 1.02 else 'not met'}; whole commands, start-up included).")
    return section("`akd eval` against mmdet's own test path", "python bench/run.py --only eval", body, verdict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="startup,core,train,eval", help="comma-separated: startup,core,train,eval")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated: cpu,cuda (the core and train parts; cuda where present)")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--factors", default="release,paper", help="the core part's uncertainty factors")
    parser.add_argument("--core-bases", default="", help="the core part's base losses (default: all)")
    parser.add_argument("--core-avatars", default="", help="the core part's Avatar counts, 0 first (default: 0,1,2,4,8)")
    args = parser.parse_args()
    import torch

    parts = args.only.split(",")
    devices = args.devices.split(",")
    cpu = "cpu" in devices
    cuda = "cuda" in devices and torch.cuda.is_available()
    sections = []
    if "startup" in parts:
        sections.append(bench_startup())
    if "core" in parts:
        sections += [bench_core(device, factor, args.core_bases, args.core_avatars)
                     for device, wanted in (("cpu", cpu), ("cuda", cuda)) if wanted
                     for factor in args.factors.split(",")]
    if "train" in parts:
        if cpu:
            sections.append(bench_train_step("tiny-fcos-r34-r18", "128x128", 8, "cpu", 20))
        if cuda:
            sections.append(bench_train_step("fcos-r101-r50", "1333x800", 2, "cuda", 20))
    if "eval" in parts:
        sections.append(bench_eval())
    header = ("# Benchmark results\n\nWritten by `python bench/run.py` (see bench/README.md). "
              "Each section says which machine, date and command produced it.\n")
    out = Path(args.out)
    merged = merge_sections(out.read_text() if out.exists() else "", sections)
    if not any("(cuda)" in sec.split("\n", 1)[0] for sec in merged):
        header += ("\nNo CUDA device on the machines that wrote this file: the CUDA sections (core losses on GPU, "
                   "FCOS R101 -> R50 at 1333x800) are absent; run `python bench/run.py` on a CUDA machine to add them.\n")
    out.write_text(header + "\n" + "\n".join(merged))
    print(f"wrote {args.out}")


def merge_sections(previous: str, new: list) -> list:
    """The report's sections: those just measured, and the earlier ones that were not re-run
    (matched by their '## ' title), in their earlier order."""
    def title(section: str) -> str:
        return section.split("\n", 1)[0]

    old = ["## " + part for part in previous.split("\n## ")[1:]]
    fresh = {title(sec): sec for sec in new}
    merged = [fresh.pop(title(sec), sec) for sec in old]
    return [sec if sec.endswith("\n") else sec + "\n" for sec in merged + list(fresh.values())]


if __name__ == "__main__":
    main()
