"""The benchmarks' handling of a configuration that fails: it is named in the tables and the goals'
verdicts, and the other configurations are still measured. A GPU session has minutes of device
time, and one configuration that failed to compile (MasKD, 1 Avatar, inductor's combo kernels) would
otherwise have ended every row after it. And the counts the benchmarks make without a GPU: a loss
call's memory traffic (bench/graph_loops.py --bytes), a profile's busy time (bench/profile_core.py)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import core_losses  # noqa: E402
import goals  # noqa: E402
import train_step  # noqa: E402

FAILED = "BackendCompilerFailed: Dynamic shape on reduction dimension is not supported"


def test_a_failing_configuration_gets_its_row_and_the_next_is_measured():
    # FGD's teacher side is not a weighted sum: the compiled passes refuse it when the loss is built
    rows = [core_losses.measure_or_fail("fgd", 2, "cpu", 1, "release", "compiled"),
            core_losses.measure_or_fail("cwd", 0, "cpu", 1, "release", "loop")]
    assert rows[0]["ms"] is None and rows[0]["peak_mib"] is None
    assert "ValueError" in rows[0]["error"] and "\n" not in rows[0]["error"]
    assert rows[1]["ms"] > 0 and "error" not in rows[1]


def test_core_table_and_goals_name_a_failure_without_judging_it(tmp_path):
    rows = [{"base": "cwd", "avatars": 0, "kernel": "compiled", "ms": 4.0, "peak_mib": 100.0},
            {"base": "cwd", "avatars": 8, "kernel": "compiled", "ms": 5.0, "peak_mib": 101.0},
            core_losses.failed("cwd", 8, "compiled+combo", "Traceback ...\n  ...\ntorch._inductor.exc.Inductor"
                               f"Error: {FAILED}\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n"),
            core_losses.failed("mse", 0, "compiled", "RuntimeError: out of memory"),
            {"base": "mse", "avatars": 8, "kernel": "compiled", "ms": 9.0, "peak_mib": 90.0}]
    assert rows[2]["error"] == f"torch._inductor.exc.InductorError: {FAILED}"
    table = core_losses.markdown(rows, ("cwd", "mse", "maskd"), (0, 8), ("compiled", "compiled+combo"))
    assert "| cwd (compiled) | 4.0 ms, 100 MiB | x1.25 time, x1.01 mem |" in table
    assert f"| cwd (compiled+combo) | 4.0 ms, 100 MiB | failed: {rows[2]['error'][:80]} |" in table
    assert "9.0 ms, 90 MiB (no plain row)" in table
    assert "| maskd (compiled) | not run | not run |" in table  # a run cut short
    (tmp_path / "core_release.json").write_text(json.dumps(rows))
    verdicts = {line.split(" | ")[0].strip("| "): line for line in goals.judge(str(tmp_path)).splitlines()}
    cwd = verdicts["core cwd, release factor, 8 Avatars at most x1.5 the plain loss"]
    assert "compiled x1.25" in cwd and "compiled+combo failed" in cwd and cwd.endswith("| met (compiled) |")
    mse = verdicts["core mse, release factor, 8 Avatars at most x1.5 the plain loss"]
    assert "plain failed: RuntimeError" in mse and mse.endswith("| not measured |")


def test_a_step_that_fails_its_warm_up_is_left_out_and_named():
    calls = []

    def good(name):
        return lambda: calls.append(name)

    def broken():
        # as inductor raises it: its advice after the message
        raise RuntimeError("Dynamic shape on reduction dimension is not supported\n\nSet TORCHDYNAMO_VERBOSE=1 for the "
                           "internal stack trace")

    steps = {train_step.BASE: good("base"), "AKD, 1 Avatar": broken, "AKD, 8 Avatars": good("eight")}
    errors = train_step.warmed_up(steps)
    assert errors == {"AKD, 1 Avatar": "RuntimeError: Dynamic shape on reduction dimension is not supported"}
    assert list(steps) == [train_step.BASE, "AKD, 8 Avatars"] and calls == ["base"] * 2 + ["eight"] * 2
    times = train_step.interleaved_times(steps, rounds=3)
    assert set(times) == set(steps) and all(len(t) == 3 for t in times.values())
    with pytest.raises(RuntimeError):  # every change is paired with the base loss: no run without it
        train_step.warmed_up({train_step.BASE: broken})


def test_step_goals_judge_the_measured_rows_and_name_the_failed(tmp_path):
    base = {"label": train_step.BASE, "avatars": 0, "kernel": "loop", "ms": 80.0, "peak_mib": 3000.0,
            "vs_base_pct": 0.0, "vs_base_ci": [0.0, 0.0]}
    rows = [base, {"label": "AKD, 1 Avatar", "avatars": 1, "kernel": "compiled+combo", "ms": None, "peak_mib": None,
                   "error": FAILED},
            {"label": "AKD, 8 Avatars", "avatars": 8, "kernel": "compiled+combo", "ms": 82.0, "peak_mib": 3030.0,
             "vs_base_pct": 2.5, "vs_base_ci": [3.5, 4.0]}]
    assert f"| AKD, 1 Avatar | failed: {FAILED} |" in train_step.markdown(rows)
    (tmp_path / "train_step.json").write_text(json.dumps(rows))
    lines = goals.judge(str(tmp_path)).splitlines()
    one = next(line for line in lines if line.startswith("| 1 Avatar"))
    eight = next(line for line in lines if line.startswith("| 8 Avatars"))
    memory = next(line for line in lines if line.startswith("| peak memory"))
    assert f"compiled+combo failed: {FAILED}" in one and one.endswith("| not measured |")
    assert eight.endswith("| not met |")  # the whole interval beyond +3%
    assert "+1.0% to +1.0%" in memory and memory.endswith("| met |")


def test_eager_traffic_counts_the_ops_outside_a_compiled_graph_and_not_those_inside():
    import graph_loops
    import torch

    x = torch.ones(1000)
    inside = torch.compile(lambda t: (t * 2).sin().cos(), dynamic=False)
    inside(x)
    moved, ops, small, ranked = graph_loops.eager_bytes(lambda: (inside(x) + x).sum().item())
    # outside the compiled graph: an add of two 1000-float tensors into a third, and their sum; the
    # graph's kernel, its output's allocation and the read of the sum to the host are no such ops
    assert ranked == [("add", 3 * 4000), ("sum", 4000 + 4)]
    assert moved == 3 * 4000 + 4004 and ops == 2 and small == 2


def test_launched_bytes_sums_each_launch_by_its_kernels_estimate():
    import graph_loops

    def kernel(name, loops, gb):
        meta = f"'kernel_name': '{name}', 'kernel_num_gb': {gb}, 'backend_hash': 'x'" if gb else f"'kernel_name': '{name}'"
        body = "".join("    for r0_offset in range(0, r0_numel, R0_BLOCK):\n        pass\n" for _ in range(loops))
        return f"{name} = async_compile.triton('{name}', '''\n@triton_heuristics.reduction(\n    inductor_meta={{{meta}}},\n)\n" \
               f"@triton.jit\ndef {name}(in_ptr0):\n{body}''', device_str='cuda')\n"

    code = (kernel("triton_red_a", 2, "0.25") + kernel("triton_poi_b", 0, "1e-3") + kernel("triton_poi_c", 0, None)
            + "def call(args):\n        triton_red_a.run(buf0, stream=stream0)\n        triton_red_a.run(buf1, stream=stream0)\n"
            + "        triton_poi_b.run(buf2, stream=stream0)\n        triton_poi_c.run(buf3, stream=stream0)\n")
    launched = graph_loops.launched_bytes(code)
    assert launched.bytes == pytest.approx(2 * 0.25e9 + 1e6)
    assert launched.reread == pytest.approx(2 * 2 * 0.25e9 + 1e6)
    assert launched.unestimated == 1 and launched.looped == 2
    assert launched.small == 0  # 1 MB is not under 1 MB
    assert graph_loops.launched_bytes(code.replace("1e-3", "9e-4")).small == 1
    assert graph_loops.units(code) == 4


def test_profile_sets_the_gpus_busy_time_beside_the_wall_time():
    from types import SimpleNamespace

    import profile_core

    # two kernels' events and a CPU op's (no device time of its own), over 4 steps of 10 ms wall each
    averages = [SimpleNamespace(self_device_time_total=6000.0), SimpleNamespace(self_device_time_total=2000.0),
                SimpleNamespace(self_device_time_total=0.0)]
    line = profile_core.busy_line(0.040, averages, 4, cuda=True)
    assert line == "per step: wall 10.00 ms under the profiler, GPU busy 2.00 ms (20% of the wall time)"
    assert profile_core.busy_line(0.040, averages, 4, cuda=False) == "per step: wall 10.00 ms under the profiler"


PROGRAM_TRAFFIC = '''
import sys
sys.path.insert(0, "bench")
import torch
import triton
import triton.language as tl

import graph_loops


@triton.jit
def copy(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)


@triton.jit
def row_sums(src, dst, BLOCK: tl.constexpr):
    row = tl.load(src + tl.arange(0, BLOCK))
    tl.store(dst + tl.program_id(0), tl.sum(row, 0))


x, y = torch.arange(1000.0), torch.empty(1000)
with graph_loops.ProgramTraffic() as copied:
    copy[(4,)](x, y, 1000, BLOCK=256)
sums = torch.empty(3)
with graph_loops.ProgramTraffic() as summed:
    row_sums[(3,)](x, sums, BLOCK=256)
assert torch.equal(y, x) and torch.allclose(sums, x[:256].sum().expand(3))
print(copied.bytes, summed.bytes)
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_program_traffic_counts_each_programs_reads_and_writes():
    from conftest import REPO, child_env

    result = subprocess.run([sys.executable, "-c", PROGRAM_TRAFFIC], cwd=REPO, env=child_env(TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    copied, summed = map(int, result.stdout.split())
    # four programs copy 1000 floats, the last one masked past the end: each byte read once, written once
    assert copied == 2 * 4000
    # three programs read the same 256 floats (no reuse between programs: three reads) and write a float each
    assert summed == 3 * 1024 + 3 * 4
