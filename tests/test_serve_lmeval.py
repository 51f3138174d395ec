"""lm-evaluation-harness (`local-completions`) runs a loglikelihood task against the server.

Nothing is downloaded: the task is a YAML over a local JSONL file, the tokenizer is the model
folder's own (loaded by transformers inside lm-eval), and the HF libraries run offline. lm-eval
sends what it sends to vLLM for loglikelihood requests -- batched token-id prompts, echo=True,
logprobs=1, max_tokens=1 -- and reads token_logprobs / top_logprobs back. The scores it reports
for every (context, continuation) pair must equal the model's own log-likelihood computed here
with a full forward pass."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dsv3
from dsv3.tokenizer import Tokenizer
from test_serve_api import MODEL, ServerThread, build_model_dir, make_server

RUNNER = textwrap.dedent("""
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    url, folder, task_dir, out = sys.argv[1:5]
    res = simple_evaluate(
        model="local-completions",
        model_args={"model": "%s", "base_url": url, "tokenizer": folder, "tokenizer_backend": "huggingface",
                    "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "timeout": 120},
        tasks=["dsv3_tiny_choice"], task_manager=TaskManager(include_path=task_dir), batch_size=4, limit=6,
        log_samples=True, bootstrap_iters=0)
    samples = [{"arguments": [list(a) for a in s["arguments"]], "resps": s["resps"], "target": s["target"]}
               for s in res["samples"]["dsv3_tiny_choice"]]
    with open(out, "w") as f:
        json.dump({"results": res["results"]["dsv3_tiny_choice"], "samples": samples}, f, default=str)
""" % MODEL)

TASK = """
task: dsv3_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [
    ("First Citizen: Before we proceed any further, hear me", ["speak.", "sing.", "run."], 0),
    ("All: Speak,", ["speak.", "whisper.", "shout."], 0),
    ("You are all resolved rather to die than to", ["famish?", "feast?", "flee?"], 0),
    ("Let us kill him, and we'll have corn at our own", ["price.", "table.", "leisure."], 0),
    ("O Romeo, Romeo! wherefore art thou", ["Romeo?", "here?", "there?"], 0),
    ("Now is the winter of our", ["discontent", "content", "summer"], 0),
]


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood(tmp_path):
    folder = build_model_dir(tmp_path / "tiny")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in DOCS))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "dsv3_tiny_choice.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out.json"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", OPENAI_API_KEY="unused")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(make_server(folder)) as srv:
            p = subprocess.run([sys.executable, "-c", RUNNER, srv.url + "/v1/completions", str(folder),
                                str(task_dir), str(out)], env=env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-4000:]
            calls = srv.server.metrics.http.labels("/v1/completions", "200")._value.get()
    finally:
        torch.set_num_threads(n)
    got = json.loads(out.read_text())
    samples = got["samples"]
    assert len(samples) == len(DOCS) and 0.0 <= got["results"]["acc,none"] <= 1.0
    assert calls >= math.ceil(len(DOCS) * 3 / 4)  # batched requests reached the server

    # the reference: the model's log-likelihood of each continuation, full forward, fp32
    tok = Tokenizer.from_dir(folder)
    model = dsv3.load_model(folder, dtype=torch.float32).eval()
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ll, greedy = resp[0]
            ctx = tok.encode(context)  # lm-eval: encode the whole, split at the context's length
            whole = tok.encode(context + continuation)
            cont = whole[len(ctx):]
            with torch.no_grad():
                lp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
            pos = range(len(ctx) - 1, len(whole) - 1)
            want = sum(lp[i, t].item() for i, t in zip(pos, cont))
            want_greedy = all(lp[i].argmax().item() == t for i, t in zip(pos, cont))
            assert math.isclose(float(ll), want, abs_tol=1e-3), (context, continuation, ll, want)
            assert bool(greedy) == want_greedy
            checked += 1
    assert checked == 3 * len(DOCS)
