"""The end-to-end and busy-machine benchmarks: agreement before timing, and their arithmetic
(slowdowns, fair shares, the Markdown they render). No timing is asserted anywhere.

The LM step runs a Switch layer (capacity positions, the balancing loss, the z-loss) and
KV-cache generation (cached attention), so its test carries those tasks' markers.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent




@pytest.fixture(scope="module")
def lm_bench(load_benchmark):
    return load_benchmark("lm_step")


@pytest.fixture(scope="module")
def busy_bench(load_benchmark):
    return load_benchmark("busy")


@pytest.mark.torch
@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
@pytest.mark.task8_3
def test_lm_step_torch_model_matches_tinymoe(lm_bench):
    torch = pytest.importorskip("torch")
    agreement = lm_bench.check_agreement(torch, batch=1, new=8)  # raises on a difference
    assert agreement["max_rel_grad_diff"] < 2e-4
    assert abs(agreement["loss_tinymoe"] - agreement["loss_torch"]) < 1e-4


@pytest.mark.torch
def test_lm_step_matmul_flops_match_pytorchs_count(lm_bench):
    """The floor's FLOP count, checked against PyTorch's own counter on the same model's
    forward and backward. Its counter does not count the CPU attention kernel, so the
    score and value products (4 T L d per layer, times 3) are added for it."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    cfg = lm_bench.make_config()
    lm, _ = lm_bench.torch_model(torch, lm_bench.tinymoe_model(cfg)[0])
    ids, targets = lm_bench.make_batch(cfg, 2)
    with FlopCounterMode(display=False) as counter:
        loss = lm.loss(torch.from_numpy(ids), torch.from_numpy(targets))
        (loss[0] if isinstance(loss, tuple) else loss).backward()
    T, L, d = 2 * cfg.block_size, cfg.block_size, cfg.d_model
    attention = 3 * cfg.n_layers * 4 * T * L * d
    assert counter.get_total_flops() + attention == lm_bench.matmul_flops(cfg, 2)


def test_lm_step_matmul_floor_arithmetic(lm_bench):
    tr = {"seconds": {"tinymoe": 0.3, "torch-1t": 0.2, "torch-2t": 0.15},
          "fastest_torch": "torch-2t", "matmul_flops": 10e9,
          "sgemm_gflops": {"numpy": 125.0, "torch-2t": 100.0}}
    fl = lm_bench.matmul_floor(tr)
    assert fl["peak_gflops"] == 125.0 and fl["floor_s"] == pytest.approx(0.08)
    assert fl["room_s"] == pytest.approx(0.07) and fl["rest_s"] == pytest.approx(0.22)
    assert fl["gflops"]["tinymoe"] == pytest.approx(10e9 / 0.3 / 1e9)


def test_lm_step_render_reads_a_record(lm_bench):
    times = {"tinymoe": 0.2, "torch-1t": 0.25, "torch-2t": 0.18}
    training = {"batch": 16, "tokens_per_step": 2048, "seconds": times,
                "tokens_per_s": {n: 2048 / s for n, s in times.items()},
                **lm_bench.summarise(times)}
    assert training["fastest_torch"] == "torch-2t"
    gen = {"batch": 1, "prompt": 16, "new_tokens": 64, "seconds": times,
           "tokens_per_s": {n: 64 / s for n, s in times.items()}, **lm_bench.summarise(times)}
    record = {"command": "python benchmarks/bench_lm_step.py", "machine": "x86_64, 2 cores",
              "load_average": {"start": 0.1}, "settings": {"repeats": 9},
              "results": {"training": training, "generation": [gen],
                          "memory": {"tinymoe": {"peak_mib": 100.0},
                                     "torch": {"peak_mib": 80.0}}}}
    page = lm_bench.render(record)
    assert "torch-2t" in page and "1.11" in page and "NOT met" in page


def test_busy_fair_share_and_slowdowns(busy_bench):
    assert busy_bench.fair_share(0, 2, 2) == 1.0
    assert busy_bench.fair_share(2, 2, 2) == 2.0
    assert busy_bench.fair_share(4, 2, 2) == 3.0
    runs = [{"busy": 0, "times": {"a": {"seconds": 1.0, "cores_used": 1.8}}},
            {"busy": 2, "times": {"a": {"seconds": 2.2, "cores_used": 0.9}}},
            {"busy": 0, "times": {"a": {"seconds": 1.1, "cores_used": 1.8}}}]
    s = busy_bench.summarise(runs, cores=2)["a"]
    assert s["idle_seconds"] == 1.0 and s["idle_spread"] == pytest.approx(1.1)
    assert s["loads"]["2"]["slowdown"] == pytest.approx(2.2)
    assert s["loads"]["2"]["vs_fair_share"] == pytest.approx(1.1)


def test_busy_load_starts_and_stops_its_processes(busy_bench):
    with busy_bench.BusyLoad(1, settle=0.0) as load:
        (proc,) = load.procs
        assert proc.poll() is None  # spinning
    assert proc.poll() is not None  # stopped on exit
    assert load.procs == []


def test_busy_tour_stage_table(busy_bench, tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# tinymoe tour (fast mode, 9 s)\n\n| stage | paper | s |\n|---|---|---|\n"
                      "| 0 · autograd | - | 1.5 |\n| 1 · vowels | Jacobs 1991 | 7.5 |\n")
    assert busy_bench.tour_stage_seconds(report) == {"0 · autograd": 1.5, "1 · vowels": 7.5}


def test_busy_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_busy.py"),
                          "--help", "--no-torch"], capture_output=True, text=True, check=True)
    assert "--busy" in out.stdout and "--threads" in out.stdout
