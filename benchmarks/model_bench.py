"""Issue 2's benchmark: dsv3 against transformers' DeepseekV3ForCausalLM with identical random
weights on the `small` preset (prefill and batch-1 decode tokens/s, KV-cache bytes per token per
layer). The code lives in dsv3.commands.bench; this script is `dsv3 bench` with the same flags:

    .venv/bin/python benchmarks/model_bench.py --preset small --dtype both --repeats 5 --profile

Results and how to read them: docs/benchmarks.md.
"""
import sys

from dsv3.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
