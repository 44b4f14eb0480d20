"""`akd study`: configurations x seeds, each one run through `akd train`'s own path, then statistics.

A study is named configurations (``--variant NAME:key=value,...``), each crossed with a grid
(``--grid key=v1,v2``), each trained and evaluated once per seed. A run is one process
(``python -m akd_cli.mm.study RUN.json``) that calls ``launch_training`` and ``launch_eval``,
exactly what `akd train` and `akd eval` call; its work dir is ``OUT/runs/<configuration>/seed<k>``.

A study killed at any point continues where it stopped when started again with the same command:
a run whose ``metrics.json`` is there is skipped, a run with checkpoints resumes (``--resume``), a
trained run without metrics is evaluated. ``OUT/study.json`` records the study's definition; the
same OUT with another definition is refused. Runs go in parallel over ``jobs`` processes (CPU
threads shared among them) or over GPUs, ``gpus_per_run`` each.

Seeds pair the runs: with seed k every configuration trains on the same data in the same order
from the same initialisation, so configuration minus baseline is a paired difference.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from akd_cli import fileio, names
from akd_cli.errors import UserError
from akd_cli.options import EvalOptions, LaunchPlan, TrainOptions

STUDY_FILE = "study.json"
RUN_FILE = "run.json"
RUN_LOG = "run.log"
_TYPES = {"num_avatars": int, "epochs": int, "batch_size": int, "drop_rate": float}


def _typed(key: str, text: str):
    cast = _TYPES.get(key, str)
    try:
        return cast(text)
    except ValueError:
        raise UserError(f"{key} takes {'integers' if cast is int else 'numbers'}, got {text!r}") from None


def _check_key(key: str, where: str) -> None:
    if key not in names.STUDY_KEYS:
        import difflib

        close = difflib.get_close_matches(key, names.STUDY_KEYS, n=1)
        raise UserError(f"{where}: {key!r} is not an option a study can vary"
                        + (f" (did you mean {close[0]}?)" if close else "")
                        + f"; valid keys: {', '.join(names.STUDY_KEYS)}")


def parse_grid(items: Sequence[str]) -> Dict[str, list]:
    """``key=v1,v2,...`` items: the axes of the grid, in the order given."""
    grid: Dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise UserError(f"--grid takes key=v1,v2,..., got {item!r}")
        _check_key(key, "--grid")
        if key in grid:
            raise UserError(f"--grid {key} is given twice")
        grid[key] = [_typed(key, v.strip()) for v in values.split(",") if v.strip()]
    return grid


def parse_variant(item: str) -> Tuple[str, Dict[str, Any]]:
    """``NAME:key=value,key=value`` (``NAME`` alone: the preset as it is)."""
    name, _, rest = item.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name or ""):
        raise UserError(f"--variant takes NAME:key=value,..., with a NAME of letters, digits and -_.+; got {item!r}")
    settings: Dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--variant {name}: {part!r} is not key=value")
        _check_key(key.strip(), f"--variant {name}")
        settings[key.strip()] = _typed(key.strip(), value.strip())
    return name, settings


@dataclass(frozen=True)
class Configuration:
    label: str                   # how tables and plots name it
    settings: Dict[str, Any]     # TrainOptions fields it sets

    @property
    def slug(self) -> str:
        return re.sub(r"[^\w.+=-]+", "_", self.label.replace(" ", ""))


def configurations(variants: Sequence[Tuple[str, Dict[str, Any]]], grid: Dict[str, list]) -> List[Configuration]:
    """Each variant (or the preset as it is) crossed with every point of the grid."""
    if not variants:
        variants = [("", {})]
    seen, result = set(), []
    for name, settings in variants:
        for point in itertools.product(*grid.values()) if grid else [()]:
            values = dict(zip(grid, point))
            clash = set(values) & set(settings)
            if clash:
                raise UserError(f"--variant {name} sets {', '.join(sorted(clash))}, which --grid varies")
            label = ",".join([name] * bool(name) + [f"{k}={v}" for k, v in values.items()]) or "preset"
            if label in seen:
                raise UserError(f"configuration {label!r} appears twice")
            seen.add(label)
            result.append(Configuration(label, {**settings, **values}))
    return result


@dataclass(frozen=True)
class StudySpec:
    """What `akd study` is told (validated on construction, before any run starts)."""
    preset: str
    out: str
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: Tuple[Tuple[str, Dict[str, Any]], ...] = ()
    grid: Dict[str, list] = field(default_factory=dict)
    baseline: Optional[str] = None          # a configuration label; default: the first
    data_root: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_epochs: Optional[int] = None    # tiny presets without a teacher: the study trains one
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    jobs: int = 1
    gpus_per_run: int = 0                   # 0: CPU runs
    loggers: Tuple[str, ...] = ()

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise UserError("--seeds: distinct non-negative seeds, at least one")
        if self.jobs < 1 or self.gpus_per_run < 0:
            raise UserError("--jobs must be at least 1 and --gpus-per-run at least 0")
        configs = self.configurations()
        labels = [c.label for c in configs]
        if self.baseline is not None and self.baseline not in labels:
            import difflib

            close = difflib.get_close_matches(self.baseline, labels, n=1)
            raise UserError(f"--baseline {self.baseline!r} is none of the configurations"
                            + (f" (did you mean {close[0]!r}?)" if close else f": {', '.join(labels)}"))
        for config in configs:  # every option value checked as `akd train` checks it
            try:
                self.train_options(config, self.seeds[0], "x")
            except UserError as error:
                raise UserError(f"configuration {config.label!r}: {error}") from None

    def configurations(self) -> List[Configuration]:
        return configurations(self.variants, self.grid)

    @property
    def baseline_label(self) -> str:
        return self.baseline or self.configurations()[0].label

    def plan(self) -> LaunchPlan:
        return LaunchPlan(nproc_per_node=max(1, self.gpus_per_run), device="cuda" if self.gpus_per_run else "cpu")

    def train_options(self, config: Configuration, seed: int, work_dir: str, **extra) -> TrainOptions:
        settings = dict(epochs=self.epochs, batch_size=self.batch_size, **config.settings)
        return TrainOptions(preset=self.preset, data_root=self.data_root, work_dir=work_dir,
                            teacher_checkpoint=self.teacher_checkpoint, cfg_options=dict(self.cfg_options),
                            seed=seed, validate=False, loggers=tuple(self.loggers), launch=self.plan(),
                            **settings, **extra)

    def definition(self) -> Dict[str, Any]:
        """What makes two studies the same study (not jobs, GPUs or loggers: how, not what)."""
        keep = ("preset", "variants", "grid", "data_root", "teacher_checkpoint", "teacher_epochs", "epochs",
                "batch_size", "cfg_options")
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k in keep}))


@dataclass
class Run:
    config: Configuration
    seed: int
    work_dir: Path
    options: TrainOptions
    state: str = "todo"          # todo | resume | evaluate | done | failed
    metrics: Optional[Dict[str, float]] = None
    error: Optional[str] = None


def run_state(work: Path) -> str:
    if (work / "metrics.json").is_file():
        return "done"
    if (work / "student.pth").is_file():
        return "evaluate"
    if any(work.glob("epoch_*.pth")) or any(work.glob("iter_*.pth")):
        return "resume"
    return "todo"


def _teacher_and_data(spec: StudySpec, say: Callable[[str], None]) -> StudySpec:
    """A tiny preset needs data and a teacher; the study makes what it is not given, once, in OUT."""
    from akd_cli.presets import load_preset

    preset = load_preset(spec.preset)
    out = Path(spec.out)
    if spec.data_root is None and preset.tiny:
        from akd_cli import synth

        data = out / "data"
        if synth.generate(synth.SynthSpec(num_classes=int(preset.data.get("num_classes", 6)), seed=0), data):
            say(f"synthetic data: {data}")
        spec = replace(spec, data_root=str(data))
    needs_teacher = any(c.settings.get("method", preset.method) != "none" for c in spec.configurations())
    if needs_teacher and not spec.teacher_checkpoint and not preset.teacher.checkpoint:
        if not preset.tiny:
            raise UserError(f"preset {preset.name} has no teacher checkpoint: pass --teacher-checkpoint")
        work = out / "teacher"
        checkpoint = work / "student.pth"
        if not checkpoint.is_file():
            say(f"teacher: {preset.teacher.name}, trained once for the study in {work}")
            options = TrainOptions(preset=spec.preset, data_root=spec.data_root, work_dir=str(work), kind="teacher",
                                   epochs=spec.teacher_epochs, seed=0, validate=False, launch=spec.plan(),
                                   resume=run_state(work) == "resume")
            code, tail = _subprocess(options, work, evaluate=False, env=_job_env(spec, None))
            if code != 0 or not checkpoint.is_file():
                raise UserError(f"the study's teacher failed ({tail}); see {work / RUN_LOG}")
        spec = replace(spec, teacher_checkpoint=str(checkpoint))
    return spec


def _job_env(spec: StudySpec, gpus: Optional[str]) -> Dict[str, str]:
    from akd_cli.mm.worker import LAUNCHER_PID_ENV

    env = dict(os.environ, PYTHONUNBUFFERED="1", **{LAUNCHER_PID_ENV: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.jobs)))
    env["CUDA_VISIBLE_DEVICES"] = gpus if gpus is not None else ""
    return env


def _subprocess(options: TrainOptions, work: Path, evaluate: bool, env: Dict[str, str]) -> Tuple[int, str]:
    """One run in its own process, its console output in WORK/run.log; (exit code, last line)."""
    fileio.ensure_dir(work, "run dir")
    fileio.write_json(work / RUN_FILE, {"options": asdict(options), "evaluate": evaluate})
    with open(work / RUN_LOG, "a") as log:
        code = subprocess.call([sys.executable, "-m", "akd_cli.mm.study", str(work / RUN_FILE)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    lines = [line.strip() for line in (work / RUN_LOG).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    return code, (errors or lines or ["no output"])[-1][:300]


def _metrics(work: Path) -> Dict[str, float]:
    return json.loads((work / "metrics.json").read_text())["metrics"]


def plan_runs(spec: StudySpec) -> List[Run]:
    runs = []
    for config in spec.configurations():
        for seed in spec.seeds:
            work = Path(spec.out) / "runs" / config.slug / f"seed{seed}"
            state = run_state(work)
            options = spec.train_options(config, seed, str(work), resume=state == "resume")
            run = Run(config, seed, work, options, state)
            if state == "done":
                run.metrics = _metrics(work)
            runs.append(run)
    return runs


def _check_same_study(spec: StudySpec) -> None:
    path = Path(spec.out) / STUDY_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is damaged; move it away to start this study afresh") from None
        if saved.get("definition") != spec.definition():
            raise UserError(f"{spec.out} holds another study (see {path}); choose another --out, or run that "
                            "study's command to continue it")
    elif Path(spec.out).is_dir() and any(Path(spec.out).iterdir()):
        raise UserError(f"{spec.out} holds other files; choose another --out")
    fileio.write_json(path, {"definition": spec.definition(), "seeds": list(spec.seeds),
                             "baseline": spec.baseline_label})


def run_study(spec: StudySpec, *, say: Callable[[str], None] = print, progress=None) -> List[Run]:
    """Run (or continue) the study; returns every run with its metrics or its error.
    ``progress(done, total, running)`` hears each change."""
    from concurrent.futures import ThreadPoolExecutor

    from akd_cli.mm.launch import cuda_device_count

    if spec.gpus_per_run:
        visible = cuda_device_count()
        if visible < spec.gpus_per_run:
            raise UserError(f"--gpus-per-run {spec.gpus_per_run}: this machine has {visible} GPU(s)")
        slots = [",".join(map(str, range(i, i + spec.gpus_per_run)))
                 for i in range(0, visible - spec.gpus_per_run + 1, spec.gpus_per_run)]
        spec = replace(spec, jobs=min(spec.jobs, len(slots)) if spec.jobs > 1 else len(slots))
        slots = slots[:spec.jobs]  # the pool has one worker a slot: --jobs bounds GPU runs too
    else:
        slots = [None] * spec.jobs
    _check_same_study(spec)
    spec = _teacher_and_data(spec, say)
    runs = plan_runs(spec)
    pending = [r for r in runs if r.state != "done"]
    skipped = len(runs) - len(pending)
    if skipped:
        say(f"{skipped} of {len(runs)} runs already done: skipped")
    free = list(slots)
    lock = threading.Lock()
    done = [skipped]
    running = [0]

    def report():
        if progress:
            progress(done[0], len(runs), running[0])

    def execute(run: Run) -> None:
        with lock:
            slot = free.pop()
            running[0] += 1
            report()
        try:
            code, tail = _subprocess(run.options, run.work_dir, evaluate=True, env=_job_env(spec, slot))
            if code == 0 and (run.work_dir / "metrics.json").is_file():
                run.metrics = _metrics(run.work_dir)
                run.state = "done"
            else:
                run.state, run.error = "failed", tail
        finally:
            with lock:
                free.append(slot)
                running[0] -= 1
                done[0] += 1
                report()

    report()
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        list(pool.map(execute, pending))
    return runs


# --- one run (the subprocess) ------------------------------------------------------------------------

def _main(path: str) -> int:
    from akd_cli.mm.worker import end_with_parent

    end_with_parent()  # a study killed by any signal takes its runs with it
    raw = json.loads(Path(path).read_text())
    opts = dict(raw["options"])
    opts["launch"] = LaunchPlan(**opts["launch"])
    opts["loggers"] = tuple(opts.get("loggers") or ())
    options = TrainOptions(**opts)
    from akd_cli.mm.checks import friendly_message
    from akd_cli.mm.evaluate import launch_eval
    from akd_cli.mm.runs import launch_training

    work = Path(options.work_dir)
    try:
        student = str(work / "student.pth")
        if run_state(work) != "evaluate":
            student = launch_training(options, say=print)
        if raw.get("evaluate"):
            launch_eval(EvalOptions(checkpoint=student, data_root=options.data_root, launch=options.launch))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 (the study reports the run's error line and goes on)
        message = friendly_message(exc)
        if message is None:
            raise
        print(f"error: {message}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))


# --- results ---------------------------------------------------------------------------------------

def results(runs: Sequence[Run], baseline: str, seeds: Sequence[int]) -> Dict[str, Any]:
    """Per configuration: each metric's summary over its finished seeds; against the baseline: the
    paired differences over the seeds both finished. Fractions as COCO gives them (x100 to print)."""
    from akd_cli import stats

    by_config: Dict[str, Dict[int, Dict[str, float]]] = {}
    settings: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        settings[run.config.label] = run.config.settings
        if run.metrics is not None:
            by_config.setdefault(run.config.label, {})[run.seed] = run.metrics
        else:
            by_config.setdefault(run.config.label, {})
    base = by_config.get(baseline, {})
    rows = []
    for label, per_seed in by_config.items():
        row: Dict[str, Any] = {"configuration": label, "settings": settings[label],
                               "seeds": sorted(per_seed), "missing": [s for s in seeds if s not in per_seed]}
        for metric in names.STUDY_METRICS:
            values = [per_seed[s][metric] for s in sorted(per_seed)]
            row[metric] = stats.summarise(values).as_dict() if values else None
            row[f"{metric}_by_seed"] = {str(s): per_seed[s][metric] for s in sorted(per_seed)}
            common = [s for s in sorted(per_seed) if s in base]
            if label != baseline and common:
                row[f"{metric}_vs_baseline"] = stats.paired([per_seed[s][metric] for s in common],
                                                            [base[s][metric] for s in common]).as_dict()
        rows.append(row)
    return {"baseline": baseline, "seeds": list(seeds), "metrics": list(names.STUDY_METRICS), "rows": rows}


def _cells(row: Dict[str, Any], metric: str) -> Tuple[str, str, str, str]:
    from akd_cli import stats

    summary = row.get(metric)
    if not summary:
        return "-", "-", "-", "-"
    s = stats.Summary(summary["n"], summary["mean"], summary["sd"], tuple(summary["ci"]) if summary["ci"] else None)
    vs = row.get(f"{metric}_vs_baseline")
    if not vs:
        return stats.format_mean_sd(s), stats.format_ci(s.ci), "-", "-"
    diff = f"{100 * vs['mean']:+.2f} {stats.format_ci(tuple(vs['ci']) if vs['ci'] else None, digits=2, signed=True)}"
    return (stats.format_mean_sd(s), stats.format_ci(s.ci), diff,
            f"{stats.format_p(vs['p'])} ({vs['wins']}/{vs['n']})")


HEADER = ("configuration", "AP mean ± sd (n)", "AP 95% CI", "ΔAP vs baseline [95% CI]", "paired t p (wins/n)",
          "AP50 mean ± sd", "AP75 mean ± sd")


def table_rows(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for row in result["rows"]:
        ap = _cells(row, "AP")
        label = row["configuration"] + (" (baseline)" if row["configuration"] == result["baseline"] else "")
        rows.append([label, *ap, _cells(row, "AP50")[0], _cells(row, "AP75")[0]])
    return rows


def render_markdown(result: Dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    return "\n".join(lines) + "\n"


def render_csv(result: Dict[str, Any]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    fields = ["n", "mean", "sd", "ci_low", "ci_high"]
    writer.writerow(["configuration", "metric", *fields, "diff_mean", "diff_sd", "diff_ci_low", "diff_ci_high", "p",
                     "wins", "pairs", *[f"seed{s}" for s in result["seeds"]]])
    for row in result["rows"]:
        for metric in result["metrics"]:
            s = row.get(metric) or {}
            vs = row.get(f"{metric}_vs_baseline") or {}
            ci, dci = s.get("ci") or (None, None), vs.get("ci") or (None, None)
            by_seed = row.get(f"{metric}_by_seed", {})
            writer.writerow([row["configuration"], metric, s.get("n"), s.get("mean"), s.get("sd"), *ci,
                             vs.get("mean"), vs.get("sd"), *dci, vs.get("p"), vs.get("wins"), vs.get("n"),
                             *[by_seed.get(str(seed)) for seed in result["seeds"]]])
    return out.getvalue()


def write_results(out: Path, result: Dict[str, Any]) -> List[Path]:
    written = [fileio.write_json(out / "results.json", result),
               fileio.write_text(out / "results.md", render_markdown(result)),
               fileio.write_text(out / "results.csv", render_csv(result))]
    from akd_cli import plots

    written += plots.study_plots(result, out)
    return written
