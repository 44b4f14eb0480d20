"""Issue 13, items 3 to 5: no option silently ignored, one line for every bad input, logs per run,
Ctrl-C, piped help, shell completion, a plain install log."""
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, child_env, refused, run_akd


def _prepare(**kwargs):
    from akd_cli.mm.runs import prepare
    from akd_cli.options import TrainOptions

    return prepare(TrainOptions(**kwargs))


@pytest.fixture(scope="module")
def configs(synth_root, tmp_path_factory):
    """Config files as `akd config` writes them: a teacher's (no distillation) and a distiller's."""
    from akd_cli.mm.config import dump_config

    out = tmp_path_factory.mktemp("configs")
    dump_config(_prepare(preset=TINY, kind="teacher", data_root=str(synth_root)).config, out / "teacher.py")
    dump_config(_prepare(preset=TINY, data_root=str(synth_root), teacher_checkpoint="t.pth").config, out / "akd.py")
    return out


# --- --config: every option applies or is refused ---------------------------------------------------

def test_config_file_takes_epochs_batch_size_and_avatar_options(configs, own_root):
    run = _prepare(config=str(configs / "akd.py"), epochs=3, batch_size=2, num_avatars=4, drop_rate=0.3,
                   uncertainty="paper", weighting="inverse_variance", teacher_checkpoint="other.pth",
                   data_root=str(own_root))
    cfg = run.config
    assert cfg.runner.max_epochs == 3 and cfg.lr_config.step == [2, 3] and cfg.evaluation.interval == 3
    assert cfg.data.samples_per_gpu == 2
    assert dict(cfg.model.avatars, sigma_momentum=None) == dict(
        num_avatars=4, drop_rate=0.3, uncertainty="paper", weighting="inverse_variance", perturbation="dropout",
        sigma_momentum=None)
    assert cfg.model.teacher_checkpoint == "other.pth"
    assert cfg.model.student.bbox_head.num_classes == 3 and cfg.model.teacher.bbox_head.num_classes == 3
    assert cfg.data.train.classes == ("wheel", "crate", "sail")
    assert run.student_config is None  # a changed run: the generated student config would not describe it


@pytest.mark.parametrize("option, value, expected", [
    ("num_avatars", 2, "--num-avatars: this config distils nothing"),
    ("drop_rate", 0.2, "--drop-rate: this config distils nothing"),
    ("uncertainty", "paper", "--uncertainty: this config distils nothing"),
    ("teacher_checkpoint", "t.pth", "--teacher-checkpoint: this config has no teacher"),
    ("method", "mgd", "--method picks a preset's base loss"),
    ("token_file", "tokens.pth", "--token-file: receptive tokens are for a MasKD distillation"),
])
def test_config_file_refuses_what_it_has_no_place_for(configs, option, value, expected):
    from akd_cli.errors import UserError

    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        _prepare(config=str(configs / "teacher.py"), **{option: value})


def test_cfg_options_keys_are_checked_with_the_closest_suggested(configs):
    from akd_cli.errors import UserError

    with pytest.raises(UserError, match=r"optimizer\.lrr: the config has no such key; did you mean optimizer\.lr\?"):
        _prepare(preset=TINY, kind="teacher", cfg_options={"optimizer.lrr": 0.1})
    with pytest.raises(UserError, match="model.x: the config has no such key"):
        _prepare(config=str(configs / "teacher.py"), cfg_options={"model.x": 1})
    with pytest.raises(UserError, match=r"pipeline\.99\.type: .*a list of 8"):
        _prepare(preset=TINY, kind="teacher", cfg_options={"data.train.pipeline.99.type": "X"})
    good = _prepare(preset=TINY, kind="teacher", cfg_options={"optimizer.lr": 0.05, "data.train.pipeline.2.img_scale": (64, 64)})
    assert good.config.optimizer.lr == 0.05 and tuple(good.config.data.train.pipeline[2].img_scale) == (64, 64)


@pytest.mark.parametrize("item", ["a==b", "=b", "novalue"])
def test_cfg_options_syntax(item):
    assert "key=value" in refused("config", "--preset", TINY, "--train-teacher", "--cfg-options", item)


# --- --resume ---------------------------------------------------------------------------------------

def test_resume_with_epochs_extends_the_run(synth_root, tmp_path):
    work = tmp_path / "run"
    base = ("train", "--preset", TINY, "--train-teacher", "--work-dir", work, "--no-validate")
    run_akd(*base, "--data-root", synth_root, "--epochs", 1, "--batch-size", 8, cwd=tmp_path)
    result = run_akd(*base, "--resume", "--epochs", 2, "--cfg-options", "log_config.interval=1", cwd=tmp_path)
    assert "extended from 1 to 2 epochs" in result.stdout
    assert (work / "epoch_2.pth").is_file()
    text = (work / "config.py").read_text()
    assert "max_epochs=2" in text and "interval=1" in text
    assert "already trained 2 epochs" in refused(*base, "--resume", "--epochs", 1, cwd=tmp_path)
    # options equal to what the run has change nothing, so they are not refused (a study resumes so)
    run_akd(*base, "--resume", "--epochs", 2, "--batch-size", 8, "--data-root", synth_root, cwd=tmp_path)
    message = refused(*base, "--resume", "--data-root", tmp_path, "--batch-size", 4, cwd=tmp_path)
    assert "--data-root, --batch-size would make it another run" in message
    # a teacher run has no Avatars: their options are refused as such, resumed or not
    assert "--drop-rate: this run trains the teacher alone" in refused(*base, "--resume", "--drop-rate", 0.3,
                                                                        cwd=tmp_path)


# --- one line for bad input -------------------------------------------------------------------------

def _fuzzed_checkpoints(directory: Path, good: Path) -> list:
    import random

    import torch

    data = good.read_bytes()
    rng = random.Random(0)
    files = {"empty.pth": b"", "text.pth": b"model weights, honestly\n", "random.pth": rng.randbytes(4096),
             "json.pth": json.dumps({"state_dict": {}}).encode()}
    for fraction in (0.01, 0.3, 0.7, 0.999):
        files[f"truncated-{fraction}.pth"] = data[: int(len(data) * fraction)]
    for name, payload in files.items():
        (directory / name).write_bytes(payload)
    with zipfile.ZipFile(directory / "zip.pth", "w") as archive:
        archive.writestr("weights.txt", "0 1 2")
    with zipfile.ZipFile(directory / "torch-like-zip.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x04garbage")
    (directory / "pickle-dict.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    (directory / "pickle-class.pth").write_bytes(pickle.dumps(zipfile.ZipInfo("x")))
    torch.save([1, 2, 3], directory / "torch-list.pth")
    torch.save({"state_dict": {}}, directory / "torch-empty.pth")
    torch.save(torch.zeros(3), directory / "torch-tensor.pth")
    return sorted(directory.glob("*.pth"))


def test_fuzzed_checkpoints_are_refused_in_one_line(teacher_checkpoint, synth_root, tmp_path):
    from akd_cli.errors import UserError
    from akd_cli.mm.checkpoints import load_state_dict

    files = _fuzzed_checkpoints(tmp_path, teacher_checkpoint)
    assert len(files) == 15
    for path in files:
        with pytest.raises(UserError) as caught:
            load_state_dict(str(path))
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), path
    for name in ("text.pth", "zip.pth", "truncated-0.7.pth"):  # and through the command line, no traceback
        assert f"cannot read checkpoint {tmp_path / name}" in refused("eval", tmp_path / name, "--preset", TINY,
                                                                            "--data-root", synth_root)


def test_work_dirs_that_cannot_be_made_are_refused(synth_root, tmp_path):
    (tmp_path / "file").write_text("x")
    base = ("train", "--preset", TINY, "--train-teacher", "--data-root", synth_root)
    message = refused(*base, "--work-dir", tmp_path / "file" / "run")
    assert f"cannot create work dir {tmp_path}/file/run: Not a directory" in message
    assert "cannot create work dir /sys/akd-run" in refused(*base, "--work-dir", "/sys/akd-run")


def test_table_readme_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a directory" in refused("table", "--readme", tmp_path)
    assert "a file of that name exists" in refused("table", "--readme", tmp_path / "file" / "README.md")
    assert "cannot write /proc/akd-README.md" in refused("table", "--readme", "/proc/akd-README.md")


def test_synth_out_at_a_file(tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert "is a file" in refused("data", "synth", "--out", tmp_path / "file", "--train-images", 1, "--val-images", 1)
    assert (tmp_path / "file").read_text() == "keep me"


# --- logs, Ctrl-C, help, completion, install --------------------------------------------------------

def test_runs_in_one_process_log_into_their_own_directories(synth_root, tmp_path):
    from akd_cli.mm.runs import launch_training
    from akd_cli.options import TrainOptions

    for name in ("first", "second"):
        launch_training(TrainOptions(preset=TINY, kind="teacher", data_root=str(synth_root), epochs=1,
                                     work_dir=str(tmp_path / name), validate=False))
    for name, other in (("first", "second"), ("second", "first")):
        logs = list((tmp_path / name).glob("*.log"))
        assert len(logs) == 1
        text = logs[0].read_text()
        assert f"{tmp_path / name}/config.py" in text and f"{tmp_path / other}/" not in text


def test_ctrl_c_ends_the_run_with_its_message(synth_root, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "akd_cli.cli", "train", "--preset", TINY, "--train-teacher", "--data-root", synth_root,
         "--work-dir", tmp_path / "run", "--epochs", "50", "--batch-size", "2", "--no-validate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True, cwd=tmp_path)
    for line in process.stdout:  # a terminal's Ctrl-C: SIGINT to the foreground group, once training runs
        if "train epoch" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


def test_piped_help_keeps_whole_option_names():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    out = subprocess.run([sys.executable, "-m", "akd_cli.cli", "train", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "…" not in out
    for name in ("--token-file", "--teacher-checkpoint", "--trust-checkpoint", "--num-avatars"):
        assert name in out


def test_shell_completion():
    # what `akd --install-completion` writes into the shell's start-up (shell detection aside)
    script = subprocess.run([sys.executable, "-c", "from akd_cli.cli import main; main()"], capture_output=True,
                            text=True, env=dict(os.environ, _AKD_COMPLETE="source_bash")).stdout
    assert "_AKD_COMPLETE=complete_bash" in script
    env = {"_AKD_COMPLETE": "complete_bash", "COMP_WORDS": "akd train --preset tiny-f", "COMP_CWORD": "3"}
    result = subprocess.run([sys.executable, "-c", "from akd_cli.cli import main; main()"], capture_output=True,
                            text=True, env=dict(os.environ, **env))
    assert set(result.stdout.split()) == {"tiny-fcos-r34-r18", "tiny-faster-rcnn-r34-r18"}
    words = subprocess.run([sys.executable, "-c", "from akd_cli.cli import main; main()"], capture_output=True, text=True,
                           env=dict(os.environ, _AKD_COMPLETE="complete_bash", COMP_WORDS="akd tr", COMP_CWORD="1"))
    assert words.stdout.split() == ["train"]


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the installed checkout")
def test_install_log_has_no_colour_codes_when_redirected():
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[akd install]" in result.stdout and "\x1b[" not in result.stdout + result.stderr
