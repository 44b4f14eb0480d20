"""Training-step time and peak memory of a distilled student: no distillation, the base loss alone,
and AKD with 1, 4 and 8 Avatars. Random weights and a random batch (the cost does not depend on them).

    python bench/train_step.py                       # tiny preset, 128 px, batch 8, CPU
    python bench/train_step.py --preset fcos-r101-r50 --size 1333x800 --batch 2 --device cuda
    python bench/train_step.py ... --avatar-kernels loop,compiled    # both Avatar kernels, side by side
    python bench/train_step.py ... --avatar-kernels compiled:stacked,compiled:unrolled   # the passes' two layouts

Step times: all configurations built in one process and timed in rounds, one step each per round
in a fresh random order (drift of a shared machine then falls on all alike), medians after a warm-up
step. Against the base loss, each AKD row's change is paired by round: the median of the rounds'
changes, with a distribution-free 95% interval (akd_cli.stats.median_interval). A control, the base
loss built a second time and timed as a configuration of its own, shows what two identical
configurations differ by in this process (what each build's memory placement or compiled state
adds): a change inside the control's is not the code's. Peak memory, each configuration's
resident tensors (weights, buffers, optimizer state, batch) plus what one step after warm-up adds
over the memory in use before it: on CUDA in the same process (max_memory_allocated: cuda_peaks),
on the CPU in a fresh process per configuration (peak RSS reset after warm-up, with CPU_MEMORY_ENV:
bench/memory.py), so that neither counts a compiled kernel's compilation. An AKD configuration whose
warm-up fails (a compile error) is left out of the rounds and reported with its one-line ``error``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from memory import CPU_MEMORY_ENV, step_peak


AVATARS = (1, 4, 8)
BASE, CONTROL = "base loss", "base loss, again (control)"


def configurations(kernels=("loop",), avatars=AVATARS, control=True):
    """(label, method, Avatars, kernel): the plain configurations (and the base loss's control),
    then AKD per kernel."""
    rows = [("no distillation", "none", 0, "loop"), (BASE, None, 0, "loop")]
    rows += [(CONTROL, None, 0, "loop")] if control else []
    for kernel in kernels:
        suffix = "" if len(kernels) == 1 else f" ({kernel})"
        rows += [(f"AKD, {k} Avatar{'s' if k > 1 else ''}{suffix}", None, k, kernel) for k in avatars]
    return rows


def build_step(preset_name: str, method, avatars: int, width: int, height: int, batch: int, device: str,
               kernel: str = "loop"):
    """A closure running one optimizer step of the distilled student (random weights and batch)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from akd_cli.mm import compat

    compat.apply()
    import torch

    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.core import fused
    from akd_cli.mm.config import build_config
    from akd_cli.options import TrainOptions
    from akd_cli.presets import load_preset
    from core_losses import with_layout
    from mmdet.models import build_detector

    kernel = with_layout(kernel)
    layout = fused.LAYOUT  # the configurations share a process, and take turns: each sets its own
    torch.manual_seed(0)
    preset = load_preset(preset_name)
    # the baseline has no Avatars to set (TrainOptions refuses the option there)
    cfg = build_config(preset, TrainOptions(preset=preset_name, method=method,
                                            num_avatars=None if method == "none" else avatars,
                                            teacher_checkpoint="unused",
                                            avatar_kernel=None if kernel == "loop" else kernel))
    if cfg.model.get("options"):
        # MasKD's released tokens are a download; random tokens of the same shape cost the same.
        cfg.model.options.pop("token_file", None)
    model = build_detector(cfg.model).to(device)
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("teacher.") and p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, height, width, generator=gen).to(device)
    metas = [dict(img_shape=(height, width, 3), ori_shape=(height, width, 3), pad_shape=(height, width, 3),
                  scale_factor=1.0, flip=False, batch_input_shape=(height, width)) for _ in range(batch)]
    boxes, labels = [], []
    num_classes = 80 if not preset.tiny else int(preset.data.get("num_classes", 6))
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.05 + torch.rand(6, 2, generator=gen) * 0.25) * torch.tensor([width, height])
        boxes.append(torch.cat([xy, xy + wh], dim=1).to(device))
        labels.append(torch.randint(0, num_classes, (6,), generator=gen).to(device))

    def step():
        fused.LAYOUT = layout
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model._parse_losses(model.forward_train(img, metas, boxes, labels))
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step.resident = lambda: _resident_bytes(model, optimizer, img, boxes, labels)
    return step


def _resident_bytes(model, optimizer, *batch) -> int:
    """Bytes a configuration keeps between steps: weights, buffers, optimizer state and the batch."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for item in batch:
        tensors += item if isinstance(item, list) else [item]
    return sum(t.numel() * t.element_size() for t in tensors)


def cuda_peaks(steps: dict) -> dict:
    """MiB of each configuration's peak on CUDA, measured in the process that holds them all: its
    resident tensors plus what one step allocates on top (max_memory_allocated after a reset counts
    live tensors only, so the other configurations' resident tensors cancel out). This is what a
    process of its own would reach, less the CUDA context, without building every model again."""
    return {name: (step.resident() + step_peak(step, "cuda")) / 2 ** 20 for name, step in steps.items()}


def peak_memory(step, warmup: int, device: str) -> float:
    """MiB of a configuration's peak in a process of its own (the CPU's measure; CUDA's is
    cuda_peaks, which it mirrors): its resident tensors plus what one step after warm-up adds to
    the memory in use before it. Compilation in the warm-up steps is not counted (bench/memory.py)."""
    for _ in range(max(warmup, 1)):
        step()
    return (step.resident() + step_peak(step, device)) / 2 ** 20


def warmed_up(steps: dict) -> dict:
    """Each configuration's warm-up (twice, as a compiled kernel may compile again for dynamic
    shapes); one that fails there (a compile error) is left out of ``steps`` and its one-line error
    returned by label, so that it does not end the others' run (on a GPU, minutes of device time).
    The base loss every change is paired with is not left out: its failure ends the run."""
    errors = {}
    for name, step in list(steps.items()):
        try:
            step()
            step()
        except Exception as error:  # noqa: BLE001 - this configuration's own failure
            if name == BASE:
                raise
            import traceback

            from core_losses import one_line

            traceback.print_exc()
            errors[name] = one_line(error)
            del steps[name]
    return errors


def interleaved_times(steps: dict, rounds: int, seed: int = 0) -> dict:
    """Milliseconds of each configuration's step, one per round, the configurations in a fresh
    random order each round: drift of a shared machine falls on all alike, and no configuration
    always follows the same other one (whose memory or caches it would inherit). The steps come
    warmed up (``warmed_up``)."""
    import random

    order = random.Random(seed)
    times = {name: [] for name in steps}
    names = list(steps)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            steps[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def against_base(times: dict, base: str = BASE) -> dict:
    """Each configuration's change over the base loss in percent, paired by round: the median of
    the rounds' changes and its 95% interval (None with fewer than 6 rounds)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from akd_cli.stats import median_interval

    out = {}
    for name, values in times.items():
        changes = [100 * (t / b - 1) for t, b in zip(values, times[base])]
        interval = median_interval(changes)
        out[name] = {"pct": statistics.median(changes), "ci": list(interval) if interval else None}
    return out


def run_all(preset: str, size: str, batch: int, device: str, warmup: int, repeats: int, kernels=("loop",),
            avatars=AVATARS, control: bool = True) -> list:
    """Times: all configurations in one process, interleaved. Peak memory: on CUDA in that process
    (cuda_peaks), on the CPU one fresh process each (with CPU_MEMORY_ENV; see bench/README.md)."""
    common = [__file__, "--preset", preset, "--size", size, "--batch", str(batch), "--device", device,
              "--warmup", str(warmup), "--avatar-kernels", ",".join(kernels), "--avatars", ",".join(map(str, avatars)),
              *([] if control else ["--no-control"])]
    out = subprocess.run([sys.executable, *common, "--repeats", str(repeats), "--time-all"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    times = measured["times"]
    paired = against_base(times)
    rows = []
    for label, method, count, kernel in configurations(kernels, avatars, control):
        if label in measured.get("errors", {}):
            rows.append({"label": label, "avatars": count, "kernel": kernel, "ms": None, "peak_mib": None,
                         "error": measured["errors"][label]})
            print(f"  {label:>28}: failed: {rows[-1]['error']}", file=sys.stderr)
            continue
        peak = measured["peaks"][label] if device == "cuda" else _peak_in_fresh_process(common, method, count, kernel,
                                                                                        device)
        rows.append({"label": label, "avatars": count, "kernel": kernel, "ms": statistics.median(times[label]),
                     "ms_quartiles": statistics.quantiles(times[label], n=4)[::2], "peak_mib": peak,
                     "vs_base_pct": paired[label]["pct"], "vs_base_ci": paired[label]["ci"], "rounds_ms": times[label]})
        print(f"  {label:>28}: {rows[-1]['ms']:8.1f} ms  {rows[-1]['peak_mib']:8.1f} MiB", file=sys.stderr)
    return rows


def _peak_in_fresh_process(common: list, method, avatars: int, kernel: str, device: str) -> float:
    env = dict(os.environ, **(CPU_MEMORY_ENV if device == "cpu" else {}))
    out = subprocess.run([sys.executable, *common, "--memory", method or "preset", str(avatars), kernel],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list) -> str:
    base = next(r for r in rows if r["label"] == BASE)
    lines = ["| configuration | step time (quartiles) | vs base loss, by round (95% interval) | peak memory | vs base loss |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:80]} | - | - | - |")
            continue
        spread = f" ({r['ms_quartiles'][0]:.0f}-{r['ms_quartiles'][1]:.0f})" if r.get("ms_quartiles") else ""
        ci = r.get("vs_base_ci")
        change = "-" if r["label"] == BASE else f"{r['vs_base_pct']:+.1f}%" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
        lines.append(f"| {r['label']} | {r['ms']:.0f} ms{spread} | {change} | "
                     f"{r['peak_mib']:.0f} MiB | {100 * (r['peak_mib'] / max(base['peak_mib'], 1e-9) - 1):+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-fcos-r34-r18")
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT of the (padded) input")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="rounds: timed steps per configuration")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="no second build of the base loss (the control row)")
    parser.add_argument("--json")
    parser.add_argument("--avatar-kernels", default="loop",
                        help="comma-separated: loop, compiled, compiled:stacked, compiled:unrolled")
    parser.add_argument("--avatars", default=",".join(map(str, AVATARS)), help="comma-separated Avatar counts of the AKD rows")
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--time-all", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kernels = tuple(args.avatar_kernels.split(","))
    avatars = tuple(int(k) for k in args.avatars.split(","))
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.size == "1333x800":
        width, height = 1344, 800  # what mmdet pads 1333x800 to (size_divisor 32)
    if args.memory:
        method = None if args.memory[0] == "preset" else args.memory[0]
        step = build_step(args.preset, method, int(args.memory[1]), width, height, args.batch, args.device,
                          args.memory[2])
        print(json.dumps(peak_memory(step, args.warmup, args.device)))
        return
    if args.time_all:
        steps = {label: build_step(args.preset, method, count, width, height, args.batch, args.device, kernel)
                 for label, method, count, kernel in configurations(kernels, avatars, args.control)}
        errors = warmed_up(steps)
        times = interleaved_times(steps, rounds=max(args.repeats, 2))  # quartiles need two
        print(json.dumps({"times": times, "peaks": cuda_peaks(steps) if args.device == "cuda" else None,
                          "errors": errors}))
        return
    rows = run_all(args.preset, args.size, args.batch, args.device, args.warmup, args.repeats, kernels, avatars,
                   args.control)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
