"""Micro-benchmark of the AKD core: forward + backward time and peak memory of each base loss,
plain (no Avatars) and with 1, 2, 4 and 8 Avatars, on the FPN feature shapes of a ResNet-50
detector at 1333x800 (padded to 1344x800), batch 2: P3-P7, 256 channels.

On CPU each configuration runs in a fresh process, so peak memory is that configuration's own
(the growth of the process's peak RSS during one step after warm-up, over its size before the step;
Linux resets the peak through /proc/self/clear_refs, so a compiled kernel's compilation is not
counted); on CUDA all run in one process, each measured by torch.cuda.max_memory_allocated over the
memory allocated before the step, after a reset.

    python bench/core_losses.py [--device cpu|cuda] [--repeats 5] [--json out.json]
                                [--uncertainty release|paper|none] [--bases cwd,mse] [--avatars 0,1,8]
                                [--avatar-kernels loop,compiled] [--root OTHER_CHECKOUT]

With several --avatar-kernels, each base loss gets one row per kernel, measured in the same run
against the same plain loss (the kernels differ only with Avatars). ``compiled`` holds the Avatars
in each base loss's own layout (``akd_cli.core.fused.PASS_LAYOUTS``); ``compiled:stacked`` and
``compiled:unrolled`` put every pass in that layout (``fused.LAYOUT``); ``+combo`` after either
compiles the passes with inductor's combo kernels (``fused.COMBO_KERNELS``: ``compiled+combo``,
``compiled:unrolled+combo``). The compiled kernel's first two steps (its compilation) are warm-up.
A configuration that fails (a compile error, say) gets a row with its one-line ``error`` and no
figures, and the others are still measured; bench/goals.py names such rows and judges the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Optional

from memory import CPU_MEMORY_ENV, step_peak

SHAPES = [(2, 256, 100, 168), (2, 256, 50, 84), (2, 256, 25, 42), (2, 256, 13, 21), (2, 256, 7, 11)]
BASES = ("cwd", "mse", "pkd", "mgd", "maskd", "fgd")
AVATARS = (0, 1, 2, 4, 8)
ROOT = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]  # where akd_cli is imported from (--root)


def with_layout(kernel: str) -> str:
    """The avatar kernel of ``KERNEL[:LAYOUT][+combo]``, with the passes' layout set for this process
    (each base loss's own without one), and with ``+combo`` inductor's combo kernels
    (``fused.COMBO_KERNELS``; each setting its own compilation, in one process too)."""
    from akd_cli.core import fused

    kernel, plus, option = kernel.partition("+")
    if plus and option != "combo":
        raise SystemExit(f"unknown kernel option {option!r}; expected +combo")
    if hasattr(fused, "COMBO_KERNELS"):
        fused.COMBO_KERNELS = bool(plus)
    elif plus:
        raise SystemExit("this checkout's passes have no combo kernels (fused.COMBO_KERNELS)")
    name, _, layout = kernel.partition(":")
    layouts = getattr(fused, "LAYOUTS", ())  # none in a checkout older than the layouts (--root)
    if layout and layout not in layouts:
        raise SystemExit(f"unknown layout {layout!r}; expected one of {', '.join(layouts) or 'none here'}")
    if layouts:
        # a checkout from before the per-base layouts (--root) had a layout string as its default
        fused.LAYOUT = layout or (None if hasattr(fused, "PASS_LAYOUTS") else layouts[0])
    return name


def measure(base: str, avatars: int, device: str, repeats: int, uncertainty: str = "release",
            kernel: str = "loop") -> dict:
    """One configuration, in this process."""
    import torch

    sys.path.insert(0, ROOT[0])
    from akd_cli import AKDLoss
    from akd_cli.core import BASE_LOSSES

    torch.manual_seed(0)
    kwargs = {"channels": 256, "num_levels": len(SHAPES)} if BASE_LOSSES[base].needs_channels else {}
    loss_fn = AKDLoss(base=base, num_avatars=avatars, uncertainty=uncertainty, avatar_kernel=with_layout(kernel),
                      **kwargs).to(device)
    student = [torch.randn(s, device=device, requires_grad=True) for s in SHAPES]
    teacher = [torch.randn(s, device=device) for s in SHAPES]
    context = {}
    if base == "fgd":
        boxes = torch.tensor([[100.0, 80.0, 400.0, 360.0], [600.0, 300.0, 900.0, 700.0], [50, 500, 300, 780]], device=device)
        context = {"gt_bboxes": [boxes, boxes[:2]], "img_shape": (800, 1344)}

    def step():
        loss = loss_fn(student, teacher, **context)
        loss.backward()
        for s in student:
            s.grad = None

    step()  # warm-up
    if kernel != "loop":
        step()  # compilation may take two calls (a dynamic-shape recompile)
    peak = step_peak(step, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"base": base, "avatars": avatars, "kernel": kernel, "ms": 1000 * statistics.median(times) if times else None,
            "peak_mib": peak / 2 ** 20}


def one_line(error) -> str:
    """An error in one line: an exception's type and the first line of its message (dynamo's and
    inductor's add advice lines after it), or, of a traceback's text, the line of the exception it
    ended with (the last ``Name: message`` line, else its last line)."""
    if isinstance(error, BaseException):
        head = next((line for line in str(error).splitlines() if line.strip()), "")
        return f"{type(error).__name__}: {head}"[:300]
    lines = [line for line in error.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit|Failed)\b", line)]
    return ((raised or lines or ["failed"])[-1])[:300]


def failed(base: str, avatars: int, kernel: str, error) -> dict:
    """The row of a configuration that could not be measured (``error``: the exception, or its
    traceback's text): the others still are. On an H100 one configuration that failed to compile
    (MasKD, 1 Avatar, combo kernels) would otherwise end the one-process CUDA run and every row
    after it, out of a device call of minutes."""
    return {"base": base, "avatars": avatars, "kernel": kernel, "ms": None, "peak_mib": None, "error": one_line(error)}


def measure_or_fail(base: str, avatars: int, device: str, repeats: int, uncertainty: str, kernel: str) -> dict:
    """``measure``, or the configuration's ``failed`` row (its traceback on stderr)."""
    try:
        return measure(base, avatars, device, repeats, uncertainty, kernel)
    except SystemExit:  # with_layout's refusal of a kernel name: the command's mistake, for every row
        raise
    except Exception as error:  # noqa: BLE001 - a compile or CUDA error of this configuration alone
        import traceback

        traceback.print_exc()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()  # a failed step's buffers must not count in the next row's peak
        return failed(base, avatars, kernel, error)


def _measure_in_subprocesses(base: str, avatars: int, kernel: str, common: list, repeats: int, device: str) -> dict:
    """Time in one fresh process (the default allocator), peak memory in another (on CPU with
    CPU_MEMORY_ENV, which makes large allocations slower and so must not be timed); a configuration
    whose process fails gets its ``failed`` row."""
    args = [__file__, "--one", base, str(avatars), kernel, "--device", device, *common]

    def run(extra, env):
        out = subprocess.run([sys.executable, *args, *extra], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return failed(base, avatars, kernel, out.stderr or f"exit {out.returncode}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed = run(["--repeats", str(repeats)], dict(os.environ))
    if device == "cuda" or "error" in timed:
        return timed
    peak = run(["--repeats", "0"], dict(os.environ, **CPU_MEMORY_ENV))
    return peak if "error" in peak else dict(timed, peak_mib=peak["peak_mib"])


def run_all(device: str, repeats: int, uncertainty: str = "release", bases=BASES, avatar_counts=AVATARS,
            kernels=("loop",), json_path: Optional[str] = None) -> list:
    common = ["--uncertainty", uncertainty, "--bases", ",".join(bases), "--avatars", ",".join(map(str, avatar_counts)),
              "--avatar-kernels", ",".join(kernels), "--root", ROOT[0]]
    if device == "cuda":
        # max_memory_allocated counts live tensors only (not the caching allocator's reserve), and
        # measure() resets it, so on CUDA one process serves every configuration.
        # its stderr passes through: each row as it is measured, or the error that stopped it
        out = subprocess.run([sys.executable, __file__, "--all-here", "--device", device, "--repeats", str(repeats),
                              *common, *(["--json", json_path] if json_path else [])], stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            raise SystemExit(f"the measuring process exited {out.returncode} (its error is above)")
        return json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for base, avatars, kernel in _configurations(bases, avatar_counts, kernels):
        rows.append(_measure_in_subprocesses(base, avatars, kernel, common, repeats, device))
        row = rows[-1]
        print(f"  {base:>6} x{avatars} {kernel}: " + (f"failed: {row['error']}" if "error" in row else
                                                       f"{row['ms']:8.1f} ms  {row['peak_mib']:8.1f} MiB"), file=sys.stderr)
    return rows


def _configurations(bases, avatar_counts, kernels):
    """(base, Avatars, kernel): the plain loss once per base, each Avatar count once per kernel."""
    for base in bases:
        for avatars in avatar_counts:
            for kernel in (kernels[:1] if avatars == 0 else kernels):
                yield base, avatars, kernel


def markdown(rows: list, bases=BASES, avatar_counts=AVATARS, kernels=("loop",)) -> str:
    lines = ["| base loss | " + " | ".join(f"{k} Avatar{'s' if k > 1 else ''}" if k else "plain" for k in avatar_counts)
             + " |", "|---|" + "---|" * len(avatar_counts)]
    for base in bases:
        plain = next((r for r in rows if r["base"] == base and r["avatars"] == 0), None)
        for kernel in kernels:
            cells = []
            for k in avatar_counts:
                r = next((r for r in rows if r["base"] == base and r["avatars"] == k
                          and (k == 0 or r.get("kernel", "loop") == kernel)), None)
                if r is None:  # a run cut short by its time limit
                    cells.append("not run")
                elif "error" in r:
                    cells.append(f"failed: {r['error'][:80]}")
                elif k == 0:
                    cells.append(f"{r['ms']:.1f} ms, {r['peak_mib']:.0f} MiB")
                elif plain is None or "error" in plain:
                    cells.append(f"{r['ms']:.1f} ms, {r['peak_mib']:.0f} MiB (no plain row)")
                else:
                    cells.append(f"x{r['ms'] / plain['ms']:.2f} time, "
                                 f"x{r['peak_mib'] / max(plain['peak_mib'], 1e-9):.2f} mem")
            label = base if len(kernels) == 1 else f"{base} ({kernel})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_json(path: str, rows: list) -> None:
    """Whole or not at all: written beside, then renamed over, so a kill mid-write leaves the last rows."""
    with open(path + ".partial", "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(path + ".partial", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--uncertainty", default="release", help="the factor: release, paper or none")
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated base losses")
    parser.add_argument("--avatars", default=",".join(map(str, AVATARS)), help="comma-separated counts; 0 first")
    parser.add_argument("--avatar-kernels", default="loop",
                        help="comma-separated: loop, compiled, compiled:stacked, compiled:unrolled")
    parser.add_argument("--one", nargs=3, metavar=("BASE", "AVATARS", "KERNEL"), help=argparse.SUPPRESS)
    parser.add_argument("--all-here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=ROOT[0], help="import akd_cli from this checkout (another commit's worktree)")
    args = parser.parse_args()
    ROOT[0] = os.path.abspath(args.root)
    bases = tuple(args.bases.split(","))
    counts = tuple(int(k) for k in args.avatars.split(","))
    kernels = tuple(args.avatar_kernels.split(","))
    if counts[0] != 0:
        raise SystemExit("--avatars must start with 0 (the plain loss every other count is compared with)")
    if args.all_here:
        rows = []
        for base, avatars, kernel in _configurations(bases, counts, kernels):
            rows.append(measure_or_fail(base, avatars, args.device, args.repeats, args.uncertainty, kernel))
            # progress on stderr, and the rows so far in the JSON file: a run cut short by a time
            # limit still leaves what it measured (on an H100, one call lost a whole factor's rows)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:
                _write_json(args.json, rows)
        print(json.dumps(rows))
        return
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.device, args.repeats, args.uncertainty,
                                 args.one[2])))
        return
    rows = run_all(args.device, args.repeats, args.uncertainty, bases, counts, kernels, args.json)
    if args.json:
        _write_json(args.json, rows)
    print(markdown(rows, bases, counts, kernels))


if __name__ == "__main__":
    main()
