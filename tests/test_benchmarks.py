"""The benchmark scripts run end to end at tiny sizes (their dry modes) and refuse clearly where they cannot
measure. Nothing here asserts on a time."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with this interpreter on one thread (PYTHONPATH is inherited)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_paired_times_rotates_and_pairs_rounds() -> None:
    """Each round runs every variant once per step, starting one further along; a deadline stops new rounds."""
    sys.path.insert(0, str(BENCH))
    try:
        from _timing import median_ratio, paired_times
    finally:
        sys.path.remove(str(BENCH))
    calls: list[str] = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    ticks = iter(range(1000))
    times = paired_times(steps, rounds=3, per_round=2, warmup=1, clock=lambda: float(next(ticks)))
    assert calls == list("abc") + list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert all(len(v) == 3 and all(t == 0.5 for t in v) for v in times.values())  # one tick over two steps
    assert median_ratio(times, "b", "a") == 1.0
    calls.clear()
    short = paired_times(steps, rounds=50, warmup=0, deadline=0.0)  # past already: only the first round runs
    assert calls == list("abc") and all(len(v) == 1 for v in short.values())


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row below a header separator."""
    rows, in_table = [], False
    for line in text.splitlines():
        if line.startswith("|---"):
            in_table = True
        elif in_table and line.startswith("| "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        else:
            in_table = False
    return rows


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "perf_gpu.md"
    done = run_script("gpu.py", "--device", "cpu", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "python benchmarks/gpu.py --device cpu --tiny" in text
    rows = table_rows(text)
    variants = ["native", "backprop", "usf", "fa", "brsf", "kp", "dfa"]
    assert [(r[0], r[1]) for r in rows] == [(m, v) for m in ("resnet18_tiny", "mlp_tiny") for v in variants]
    for row in rows:
        assert float(row[2].replace(",", "")) > 0  # images/s
        assert row[4].startswith("1.000") if row[1] == "native" else float(row[4].split()[0]) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_benchmark_refuses_without_cuda_in_one_line() -> None:
    for args in ((), ("--device", "cpu")):
        done = run_script("gpu.py", *args, timeout=120)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu.py: ") and "--tiny" in lines[0], done.stderr


@pytest.mark.slow
def test_scaling_dry_run_writes_table_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "perf_scaling.md"
    done = run_script("scaling.py", "--tiny", "--rules", "usf", "fa", "dfa", "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "python benchmarks/scaling.py --tiny" in text and "![cost curves](perf_scaling.png)" in text
    assert (tmp_path / "perf_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table_rows(text)
    ratios = rows[:len(rows) // 2]
    assert {(r[0], r[1]) for r in ratios} == {(layer, axis) for layer in ("linear", "conv")
                                              for axis in ("width", "batch", "depth")}
    assert all(len(r) == 4 + 3 and all(float(v) > 0 for v in r[3:]) for r in ratios)


@pytest.mark.slow
def test_memory_dry_run_rewrites_only_its_section(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nkept above\n")
    for _ in range(2):  # the second run replaces the section written by the first
        done = run_script("memory.py", "--tiny", "--models", "mlp", "--rules", "fa", "usf", "--out", str(out))
        assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("# Performance\n\nkept above\n") and text.count("memory table: begin") == 1
    rows = table_rows(text)
    assert [r[1] for r in rows] == ["native", "fa", "usf"]
    native, fa, usf = (float(r[2]) for r in rows)
    params_mib = sum(p.numel() for p in torch.nn.Linear(784, 800).parameters()) * 4 / 2**20
    assert native > 3 * params_mib  # parameters, momentum and gradients are resident
    assert float(rows[1][5]) > 0 and rows[1][6] == "1.00"  # fa's B: as large as the model's weights
    assert float(rows[2][5]) == 0.0  # usf keeps no state


def test_step_time_compile_mode_refuses_in_one_line_where_compile_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import step_time
    finally:
        sys.path.remove(str(BENCH))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Compiler: cl is not found\nmore detail")

    monkeypatch.setattr(step_time.torch, "compile", broken)
    with pytest.raises(SystemExit) as stop:
        step_time.main(["--compile", "--out", "-"])
    message = str(stop.value.code)
    assert "\n" not in message and "torch.compile does not work on this build" in message
    assert "RuntimeError: Compiler: cl is not found" in message and "without --compile" in message


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sign_ideas.py", "update_ideas.py"])
def test_micro_benchmarks_run(script: str) -> None:
    """One round each; sign_ideas first checks every variant's dx and dW against bioprop's usf in float64."""
    done = run_script(script, "--rounds", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr
    names = [row[0] for row in table_rows(done.stdout)]
    expected = (["native", "bioprop_usf", "minimal", "scale_out", "buffer", "cached", "post_step", "backward_build"]
                if script == "sign_ideas.py" else
                ["redraw", "eight_levels_per_word", "random_words_only", "levels_to_magnitudes_only",
                 "kp_two_updates", "kp_apply_w_update"])
    assert names == expected


def test_gpu_benchmark_measures_what_issue_16_asks() -> None:
    """ResNet-18 at 224x224, batch 128, bf16 autocast, channels_last; the 3x800 MLP; BP, usf, fa, brsf, kp, dfa."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    resnet, mlp = gpu.FULL
    assert (resnet.sample_shape, resnet.batch, resnet.bf16, resnet.channels_last) == ((3, 224, 224), 128, True, True)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in resnet.build().modules()) == 20  # ResNet-18: 17 + 3 shortcuts
    widths = [m.out_features for m in mlp.build().modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [800, 800, 800, 10] and mlp.batch == 128
    assert gpu.RULES == ("backprop", "usf", "fa", "brsf", "kp", "dfa")


def test_build_site_benchmark_compares_the_two_builds() -> None:
    """benchmarks/build_site.py times each sign rule with B built in the backward and in the forward."""
    done = run_script("build_site.py", "--rounds", "1", "--steps", "1", "--rules", "usf", "brsf")
    assert done.returncode == 0, done.stderr
    assert [row[0] for row in table_rows(done.stdout)] == ["usf", "brsf"]
