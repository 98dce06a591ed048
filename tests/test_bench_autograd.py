"""benchmarks/bench_autograd.py compares like with like: its implementations compute the same
gradient and the same losses before anything is timed (no timing is asserted)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_autograd",
                                                  ROOT / "benchmarks" / "bench_autograd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_autograd_benchmark_implementations_agree(bench):
    assert bench.check_agreement() == ["tinymoe", "NumPy by hand"]


def test_autograd_benchmark_catches_a_wrong_gradient(bench, monkeypatch):
    real = bench.chain_numpy

    def wrong(*args):
        run = real(*args)
        return lambda: 1.01 * run()

    monkeypatch.setattr(bench, "chain_numpy", wrong)
    with pytest.raises(AssertionError, match="NumPy by hand disagrees with tinymoe on chain"):
        bench.check_agreement()


@pytest.mark.torch
def test_autograd_benchmark_torch_agrees(bench):
    torch = pytest.importorskip("torch")
    assert bench.check_agreement(torch)[-1] == "PyTorch eager"
