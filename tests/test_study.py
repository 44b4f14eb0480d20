"""Issue 14: `akd study` (grid x seeds, resumable), its statistics, plots, `akd plot`, loggers."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, child_env, refused, run_akd

PNG = b"\x89PNG\r\n\x1a\n"


# --- statistics against hand-computed values ---------------------------------------------------------

def test_summary_of_four_values():
    from akd_cli.stats import summarise

    s = summarise([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)                # sum of squares 5 over n - 1 = 3
    half = 3.182446305284263 * sd / 2    # t(0.975, 3) x sd / sqrt(4)
    assert (s.n, s.mean) == (4, 2.5) and s.sd == pytest.approx(sd, rel=1e-12)
    assert s.ci == pytest.approx((2.5 - half, 2.5 + half), rel=1e-9)


def test_one_value_and_identical_values():
    from akd_cli.stats import format_mean_sd, paired, summarise

    one = summarise([0.3])
    assert (one.n, one.mean, one.sd, one.ci) == (1, 0.3, None, None)
    assert format_mean_sd(one) == "30.0 (n=1)"
    same = summarise([0.2, 0.2, 0.2])
    assert same.sd == 0.0 and same.ci == (pytest.approx(0.2), pytest.approx(0.2))
    # all differences equal: the t-test is undefined, said as None (not 0 or 1)
    p = paired([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert p.mean == pytest.approx(0.1) and p.sd == pytest.approx(0.0, abs=1e-15) and p.p is None and p.wins == 3
    lone = paired([0.5], [0.4])
    assert lone.n == 1 and lone.p is None and lone.ci is None


def test_paired_t_test_by_hand():
    from akd_cli.stats import paired

    # differences 1, 2, 2: mean 5/3, sd sqrt(1/3), t = 5; df 2: P(T > 5) = 1/2 - 5 / (2 sqrt(27))
    result = paired([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert result.mean == pytest.approx(5 / 3) and result.sd == pytest.approx(math.sqrt(1 / 3))
    assert result.p == pytest.approx(2 * (0.5 - 5 / (2 * math.sqrt(27))), rel=1e-9)
    half = 4.302652729911275 * math.sqrt(1 / 3) / math.sqrt(3)  # t(0.975, 2)
    assert result.ci == pytest.approx((5 / 3 - half, 5 / 3 + half), rel=1e-9)
    assert (result.wins, result.losses) == (3, 0)


# --- definition ----------------------------------------------------------------------------------------

def test_grid_and_variants_make_the_configurations():
    from akd_cli.mm.study import configurations, parse_grid, parse_variant

    grid = parse_grid(["num_avatars=0,2", "drop_rate=0.1,0.2"])
    assert grid == {"num_avatars": [0, 2], "drop_rate": [0.1, 0.2]}
    configs = configurations([parse_variant("paper:uncertainty=paper"), parse_variant("release")], grid)
    assert len(configs) == 8
    assert configs[0].label == "paper,num_avatars=0,drop_rate=0.1"
    assert configs[0].settings == {"uncertainty": "paper", "num_avatars": 0, "drop_rate": 0.1}
    assert configs[-1].settings == {"num_avatars": 2, "drop_rate": 0.2}


def test_median_interval_takes_the_order_statistics_of_its_coverage():
    from scipy import stats as scipy_stats

    from akd_cli.stats import median_interval

    # n = 20: P(B <= 5) = 0.0207, P(B <= 6) = 0.0577, so x_(6) and x_(15), coverage 95.9%
    assert median_interval(list(range(20, 0, -1))) == (6.0, 15.0)
    assert 1 - 2 * scipy_stats.binom.cdf(5, 20, 0.5) >= 0.95 > 1 - 2 * scipy_stats.binom.cdf(6, 20, 0.5)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 6.0]) == (1.0, 6.0)   # n = 6: the range, coverage 96.9%
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None               # n = 5: the range covers 93.8% only
    assert median_interval([1.0] * 10, confidence=0.5) == (1.0, 1.0)


def test_a_grid_key_that_is_no_option_is_refused_before_anything(tmp_path):
    message = refused("study", "--preset", TINY, "--out", tmp_path / "s", "--grid", "num_avatar=1,2")
    assert "did you mean num_avatars?" in message and "valid keys: method, num_avatars, drop_rate" in message
    assert "--num-avatars must be in [0, 64]" in refused("study", "--preset", TINY, "--out", tmp_path / "s",
                                                         "--grid", "num_avatars=1,100")
    assert "--baseline 'nope'" in refused("study", "--preset", TINY, "--out", tmp_path / "s", "--variant", "a",
                                          "--baseline", "nope")
    # a baseline crossed with an Avatar grid would train the same baseline under several labels
    message = refused("study", "--preset", TINY, "--out", tmp_path / "s", "--variant", "baseline:method=none",
                      "--variant", "akd", "--grid", "num_avatars=1,4")
    assert "configuration 'baseline,num_avatars=1': --num-avatars: this run trains the student without" in message
    assert "no Avatars to set" in refused("train", "--preset", TINY, "--method", "none", "--num-avatars", "4",
                                          "--work-dir", tmp_path / "w")
    assert not (tmp_path / "s").exists()


def test_a_half_finished_run_resumes(tmp_path):
    from akd_cli.mm.study import StudySpec, plan_runs

    spec = StudySpec(preset=TINY, out=str(tmp_path), seeds=(0, 1), grid={"num_avatars": [1]}, teacher_checkpoint="t.pth")
    (tmp_path / "runs" / "num_avatars=1" / "seed1").mkdir(parents=True)
    (tmp_path / "runs" / "num_avatars=1" / "seed1" / "epoch_1.pth").write_bytes(b"")
    runs = plan_runs(spec)
    assert [(r.seed, r.state, r.options.resume) for r in runs] == [(0, "todo", False), (1, "resume", True)]
    assert runs[1].options.seed == 1 and runs[1].options.num_avatars == 1


# --- a study, killed and continued ---------------------------------------------------------------------

def test_a_killed_study_continues_and_skips_finished_runs(synth_root, teacher_checkpoint, tmp_path):
    out = tmp_path / "study"
    args = ["study", "--preset", TINY, "--out", out, "--data-root", synth_root, "--teacher-checkpoint",
            teacher_checkpoint, "--variant", "kd:num_avatars=0", "--variant", "akd:num_avatars=1", "--seeds", 1,
            "--epochs", 1, "--batch-size", 8]
    process = subprocess.Popen([sys.executable, "-m", "akd_cli.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True, cwd=tmp_path)
    first = out / "runs" / "kd" / "seed0" / "metrics.json"
    deadline = time.time() + 300  # bounds the wait; nothing is asserted about time
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.exists()
    os.killpg(process.pid, signal.SIGKILL)  # the whole study, mid-way through the second run
    process.wait()
    stamp = first.stat().st_mtime_ns
    result = run_akd(*args, cwd=tmp_path)
    assert "1 of 2 runs already done: skipped" in result.stdout
    assert first.stat().st_mtime_ns == stamp
    saved = json.loads((out / "results.json").read_text())
    assert [(r["configuration"], r["AP"]["n"]) for r in saved["rows"]] == [("kd", 1), ("akd", 1)]
    assert saved["baseline"] == "kd" and "AP_vs_baseline" in saved["rows"][1]
    assert (out / "results.md").read_text().startswith("| configuration |")
    assert (out / "results.csv").read_text().splitlines()[0].startswith("configuration,metric,n,mean,sd")
    assert (out / "AP_vs_num_avatars.png").read_bytes().startswith(PNG)  # the variants differ in num_avatars alone


# --- plots ---------------------------------------------------------------------------------------------

def _valid_png(path):
    from PIL import Image

    assert path.read_bytes().startswith(PNG)
    with Image.open(path) as image:
        image.verify()


def test_ap_against_grid_axes_with_error_bars(tmp_path):
    from akd_cli.mm.study import Configuration, Run, results
    from akd_cli.plots import study_plots

    runs = []
    for uncertainty in ("paper", "release"):
        for k in (0, 1, 2):
            for seed in (0, 1, 2):
                config = Configuration(f"{uncertainty},num_avatars={k}", {"uncertainty": uncertainty, "num_avatars": k})
                ap = 0.3 + 0.01 * k + 0.002 * seed
                runs.append(Run(config, seed, tmp_path, None, "done", {"AP": ap, "AP50": ap + 0.2, "AP75": ap}))
    written = study_plots(results(runs, "paper,num_avatars=0", (0, 1, 2)), tmp_path)
    assert [p.name for p in written] == ["AP_vs_num_avatars.png"]
    _valid_png(written[0])


def test_akd_plot_draws_runs_training_curves(akd_run, teacher_run, tmp_path):
    work, _ = akd_run
    out = tmp_path / "curves.png"
    run_akd("plot", work, teacher_run, "--out", out)
    _valid_png(out)
    from akd_cli.plots import read_log

    log = read_log(work)
    assert any(k.startswith("loss_akd_cwd") for k in log["train"]) and "akd_fpn_l0" in log["train"]
    assert "none of" in refused("plot", work, "--key", "nonsense", "--out", out)
    assert "no training log" in refused("plot", tmp_path, "--out", out)


# --- loggers -------------------------------------------------------------------------------------------

def test_tensorboard_holds_the_akd_scalars(synth_root, teacher_checkpoint, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_akd("train", "--preset", TINY, "--data-root", synth_root, "--teacher-checkpoint", teacher_checkpoint,
            "--work-dir", tmp_path, "--epochs", 1, "--batch-size", 8, "--uncertainty", "paper", "--no-validate",
            "--logger", "tensorboard", "--cfg-options", "log_config.interval=1", cwd=tmp_path)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss_akd_cwd_fpn", "train/akd_fpn_l0", "train/akd_fpn_l4", "train/sigma_fpn_l0"} <= tags, tags
    sigma = accumulator.Scalars("train/sigma_fpn_l0")
    assert sigma and all(math.isfinite(e.value) and e.value > 0 for e in sigma)


# --- the paper's figure ----------------------------------------------------------------------------------

def test_visualize_several_students_side_by_side_with_legible_detections(akd_run, teacher_checkpoint, synth_root,
                                                                          tmp_path):
    from PIL import Image

    work, _ = akd_run
    result = run_akd("visualize", "--preset", TINY, "--teacher-checkpoint", teacher_checkpoint,
                     "--checkpoint", work / "latest.pth", "--checkpoint", work / "student.pth",
                     "--label", "other", "--label", "akd", "--data-root", synth_root, "--levels", "0,1",
                     "--image", synth_root / "val" / "000001.png", "--out", tmp_path / "vis", cwd=tmp_path)
    assert "wrote 5 image(s)" in result.stdout
    names = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert names == ["compare_fpn_level0.png", "compare_fpn_level1.png", "detections_akd.png", "detections_other.png",
                     "detections_teacher.png"]
    with Image.open(tmp_path / "vis" / "detections_akd.png") as drawn:
        assert min(drawn.size) >= 512  # a 128 px image, drawn four times larger
    with Image.open(tmp_path / "vis" / "compare_fpn_level0.png") as figure:
        assert figure.size[0] > figure.size[1]  # image, teacher and two students side by side, over two rows
    assert "2 label(s) for 1 checkpoint(s)" in refused(
        "visualize", "--preset", TINY, "--teacher-checkpoint", teacher_checkpoint, "--checkpoint", work / "student.pth",
        "--label", "a", "--label", "b", "--image", synth_root / "val" / "000001.png", "--out", tmp_path / "v2")


def test_table_cells_of_several_seeds_show_mean_sd_and_n(tmp_path):
    from akd_cli import results

    for seed, ap in enumerate((0.30, 0.32, 0.34)):
        work = tmp_path / "runs" / "akd" / f"seed{seed}"
        work.mkdir(parents=True)
        record = {"preset": TINY, "role": "akd", "method": "cwd", "checkpoint": str(work / "student.pth"),
                  "metrics": {"AP": ap}, "date": f"2026-11-26T00:00:0{seed}+00:00"}
        (work / "metrics.json").write_text(json.dumps(record))
    # the same checkpoint evaluated twice: its latest evaluation counts, once
    again = dict(record, metrics={"AP": 0.36}, date="2026-11-27T00:00:00+00:00")
    (tmp_path / "again.json").write_text(json.dumps(again))
    records, problems = results.collect([tmp_path / "runs", tmp_path / "again.json"])
    assert not problems and len(records) == 4
    row = [r for r in results.build_rows(records) if r.preset.name == TINY][0]
    assert row.ours["akd"] == pytest.approx(100 * (0.30 + 0.32 + 0.36) / 3)
    sd, n = row.spread["akd"]
    assert n == 3 and sd == pytest.approx(100 * 0.030550504633, rel=1e-6)  # sd of 30, 32, 36
    assert "32.7 ± 3.1 (n=3)" in results.render_markdown([row])
