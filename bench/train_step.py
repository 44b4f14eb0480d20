"""Training-step time and peak memory of a distilled student: no distillation, the base loss alone,
and AKD with 1, 4 and 8 Avatars. Random weights and a random batch (the cost does not depend on them).

    python bench/train_step.py                       # tiny preset, 128 px, batch 8, CPU
    python bench/train_step.py --preset fcos-r101-r50 --size 1333x800 --batch 2 --device cuda

Each configuration runs in a fresh process: median step time after warm-up steps, and peak memory
(CPU: growth of peak RSS once the model and batch exist; CUDA: max_memory_allocated over that).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# glibc raises its mmap threshold after large frees and keeps later large buffers on the heap, so a
# process's peak RSS would count freed memory. A fixed threshold returns large buffers to the OS on
# free: peak RSS then follows the live tensors (CPU only; CUDA uses max_memory_allocated).
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

CONFIGS = (("no distillation", "none", 0), ("base loss", None, 0), ("AKD, 1 Avatar", None, 1),
           ("AKD, 4 Avatars", None, 4), ("AKD, 8 Avatars", None, 8))


def measure(preset_name: str, method, avatars: int, width: int, height: int, batch: int, device: str,
            warmup: int, repeats: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from akd_cli.mm import compat

    compat.apply()
    import torch

    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from akd_cli.presets import load_preset
    from mmdet.models import build_detector

    torch.manual_seed(0)
    preset = load_preset(preset_name)
    cfg = build_config(preset, method=method, num_avatars=avatars, teacher_checkpoint="unused")
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
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model._parse_losses(model.forward_train(img, metas, boxes, labels))
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    import resource

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(warmup):
        step()
    after = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times) if times else None, "peak_mib": (after - before) / 2 ** 20}


def _measure_in_subprocesses(args, repeats: int, device: str) -> dict:
    """Time in one fresh process (the default allocator), peak memory in another (on CPU with
    CPU_MEMORY_ENV, which makes large allocations slower and so must not be timed)."""
    def run(extra, env):
        out = subprocess.run([sys.executable, *args, *extra], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed = run(["--repeats", str(repeats)], dict(os.environ))
    if device == "cuda":
        return timed
    return dict(timed, peak_mib=run(["--repeats", "0"], dict(os.environ, **CPU_MEMORY_ENV))["peak_mib"])


def run_all(preset: str, size: str, batch: int, device: str, warmup: int, repeats: int) -> list:
    rows = []
    for label, method, avatars in CONFIGS:
        args = [__file__, "--preset", preset, "--size", size, "--batch", str(batch), "--device", device,
                "--warmup", str(warmup), "--one", method or "preset", str(avatars)]
        row = dict(_measure_in_subprocesses(args, repeats, device), label=label)
        rows.append(row)
        print(f"  {label:>16}: {row['ms']:8.1f} ms  {row['peak_mib']:8.1f} MiB", file=sys.stderr)
    return rows


def markdown(rows: list) -> str:
    base = next(r for r in rows if r["label"] == "base loss")
    lines = ["| configuration | step time | vs base loss | peak memory | vs base loss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ms']:.0f} ms | {100 * (r['ms'] / base['ms'] - 1):+.1f}% | "
                     f"{r['peak_mib']:.0f} MiB | {100 * (r['peak_mib'] / max(base['peak_mib'], 1e-9) - 1):+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-fcos-r34-r18")
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT of the (padded) input")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.size == "1333x800":
        width, height = 1344, 800  # what mmdet pads 1333x800 to (size_divisor 32)
    if args.one:
        method = None if args.one[0] == "preset" else args.one[0]
        print(json.dumps(measure(args.preset, method, int(args.one[1]), width, height, args.batch, args.device,
                                 args.warmup, args.repeats)))
        return
    rows = run_all(args.preset, args.size, args.batch, args.device, args.warmup, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
