"""The compiled training step with torch.compile's default backend (inductor: generated C++ kernels
around the routed experts' dsv3::grouped_mm custom op) against the eager step. Slow on a cold
inductor cache (tens of seconds of C++ compilation), hence its own file."""
import shutil

import pytest

from test_train_perf_compile import compiled_step_against_eager


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="no C++ compiler")
def test_compiled_step_equals_eager_inductor():
    # one MoE block (and the final norm) keep the compile short; the MTP module and dense blocks
    # go through the same compile_model code, covered with aot_eager in test_train_perf_compile.py
    compiled_step_against_eager("inductor", num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
