"""`akd demo`: the whole method on the embedded default, on a CPU, in minutes.

Generates the synthetic dataset, trains the tiny teacher, then the same tiny student four ways from
the same seed (no distillation; the base loss; Avatars with the release's factor; Avatars with the
paper's sigma), evaluates all five and writes the table. Nothing is tuned to make AKD win: the
numbers are whatever they are.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List

from akd_cli.errors import UserError

MANIFEST = "akd-demo.json"
STUDENTS = (("baseline", "no distillation", dict(method="none")),
            ("kd", "base loss", dict(num_avatars=0)),
            ("akd", "Avatars, the release's factor", dict(uncertainty="release")),
            ("akd-paper", "Avatars, the paper's sigma", dict(uncertainty="paper")))


@dataclass
class DemoSpec:
    out: str = "work_dirs/demo"
    preset: str = "tiny-fcos-r34-r18"
    train_images: int = 256
    val_images: int = 64
    image_size: int = 128
    teacher_epochs: int = 12
    student_epochs: int = 10
    seed: int = 0
    device: str = "auto"


def run_demo(spec: DemoSpec, *, force: bool = False, say: Callable[[str], None] = print) -> Dict[str, dict]:
    from akd_cli import synth
    from akd_cli.mm.evaluate import launch_eval
    from akd_cli.mm.runs import launch_training
    from akd_cli.options import EvalOptions, LaunchPlan, TrainOptions
    from akd_cli.presets import load_preset

    preset = load_preset(spec.preset)
    if not preset.tiny:
        raise UserError(f"the demo runs tiny presets on synthetic data; {preset.name} is a COCO preset")
    out = Path(spec.out)
    manifest = out / MANIFEST
    stages = ["teacher"] + [name for name, _, _ in STUDENTS]
    if any((out / s).exists() for s in stages):
        if not manifest.exists():
            raise UserError(f"{out} holds other files; choose another --out")
        if not force:
            raise UserError(f"{out} holds an earlier demo: pass --force to run it again (its runs are replaced)")
        for stage in stages:
            shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    started = time.time()
    total = 2 + len(STUDENTS) + 1

    say(f"[1/{total}] synthetic dataset: {spec.train_images} train + {spec.val_images} val images, "
        f"{spec.image_size}px, {preset.data.get('num_classes', 6)} classes")
    data = out / "data"
    synth.generate(synth.SynthSpec(train_images=spec.train_images, val_images=spec.val_images,
                                   image_size=spec.image_size, num_classes=int(preset.data.get("num_classes", 6)),
                                   seed=spec.seed), data)
    plan = LaunchPlan(device=spec.device)
    common = dict(preset=preset.name, data_root=str(data), seed=spec.seed, validate=False, launch=plan)

    say(f"[2/{total}] teacher: {preset.teacher.name}, {spec.teacher_epochs} epochs")
    teacher = launch_training(TrainOptions(**common, kind="teacher", epochs=spec.teacher_epochs,
                                           work_dir=str(out / "teacher")))
    records: Dict[str, dict] = {"teacher": launch_eval(EvalOptions(checkpoint=teacher, preset=preset.name,
                                                                   data_root=str(data), role="teacher", launch=plan))}
    for i, (name, label, options) in enumerate(STUDENTS):
        say(f"[{3 + i}/{total}] student {preset.student.name}: {label}, {spec.student_epochs} epochs")
        student = launch_training(TrainOptions(**common, **options, teacher_checkpoint=teacher,
                                               epochs=spec.student_epochs, work_dir=str(out / name)))
        records[name] = launch_eval(EvalOptions(checkpoint=student, data_root=str(data), role=name, launch=plan))
    say(f"[{total}/{total}] table")
    records["_minutes"] = {"value": round((time.time() - started) / 60, 1)}
    return records


def write_table(out: Path):
    """The demo's table into OUT/RESULTS.md (between akd-table markers); returns (path, rows)."""
    from akd_cli import results

    rows = [r for r in results.build_rows(results.collect([out])[0]) if r.preset.tiny]
    path = Path(out) / "RESULTS.md"
    results.update_readme(path, results.render_markdown(rows))
    return path, rows


def summary_lines(records: Dict[str, dict]) -> List[str]:
    lines = []
    for name in ("teacher",) + tuple(name for name, _, _ in STUDENTS):
        metrics = records[name]["metrics"]
        lines.append(f"{name:>9}: AP {100 * metrics['AP']:.1f}  AP50 {100 * metrics['AP50']:.1f}  "
                     f"AP75 {100 * metrics['AP75']:.1f}")
    return lines

