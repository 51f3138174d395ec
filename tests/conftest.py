import os

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and other test modules import it
# early (transformers' FP8 integration does): set it here, before any test module is imported, so the
# FP8 Triton kernel runs in Triton's interpreter on machines without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores shared by two xdist workers (and often by other jobs): one thread per test process.
# OpenMP threads spinning against a descheduled peer made the tiny ops of these tests ~10x slower.
torch.set_num_threads(1)


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


@pytest.fixture
def load_benchmark():
    """A loader of benchmarks/<name>.py as a module (the benchmarks are scripts, not a package); the torch thread
    count their main() sets is put back after the test."""
    import importlib.util

    threads = torch.get_num_threads()

    def load(name: str):
        path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    yield load
    torch.set_num_threads(threads)
