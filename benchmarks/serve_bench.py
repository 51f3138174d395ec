"""Serving benchmark: start `dsv3 serve` on a preset model and run `dsv3 bench-serve` against it at
several concurrency levels (vLLM `bench serve` definitions: TTFT, TPOT, ITL, throughput).

    python benchmarks/serve_bench.py --preset small --concurrency 1,4,16,64
    python benchmarks/serve_bench.py --model DIR            # an existing checkpoint folder

The preset's weights are random (the speed does not depend on them): `tiny` gets a small BPE
trained on the bundled corpus, `small` the released DeepSeek-V3 tokenizer (its 129,280-entry
vocabulary is the preset's). The figure the issue asks for is the ratio of aggregate output
tokens/s at concurrency 16 to concurrency 1 (target >= 6x on `small`), measured in the same run.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_folder(preset_name: str, folder: Path) -> Path:
    import torch

    import dsv3
    from dsv3.config import preset
    from dsv3.tokenizer import Tokenizer, train_bpe

    if preset_name == "tiny":
        text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
        tok = train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=512)
    else:
        tok = Tokenizer.deepseek_v3()
    cfg = preset(preset_name)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the {preset_name} preset {cfg.vocab_size}")
    cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg).init_weights(std=0.02)
    dsv3.save_model(model, folder)
    tok.save(folder)
    return folder


class OfflineReference:
    """The same requests run through the engine in this process (no HTTP, no detokenization),
    right after the server ran them (the server idles meanwhile): what the server's overhead is
    measured against, under the same machine load."""

    def __init__(self, folder: Path, args):
        import torch

        import dsv3

        if args.threads:
            torch.set_num_threads(args.threads)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        self.model = dsv3.load_model(folder, dtype=dtype).eval()
        self.args = args

    def __call__(self, c: int) -> float:
        import random

        from dsv3.infer.engine import Engine
        from dsv3.infer.params import SamplingParams

        a = self.args
        rng = random.Random(c)
        n = a.num_prompts or max(4 * c, 8)
        prompts = [[rng.randrange(10, self.model.config.vocab_size) for _ in range(a.input_len)] for _ in range(n)]
        engine = Engine(self.model, max_num_seqs=c, speculative=a.speculative, eos_token_id=None)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_new_tokens=a.output_len))
        return n * a.output_len / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="small", choices=["tiny", "small"], help="random model of this preset")
    g.add_argument("--model", default=None, help="an existing checkpoint folder instead of a preset")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 4 x concurrency)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    p.add_argument("--dtype", default="float32", help="server dtype (float32 or bfloat16; with the CPU decode kernels bfloat16 decodes faster, docs/engine.md)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="serve with MTP speculative decoding")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--no-offline", action="store_true",
                   help="skip the reference: the same load through Engine.generate, without HTTP")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all levels (interleaved: round 1 runs every level, then round 2, ...); "
                        "figures are the medians over rounds")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    from dsv3.serve.bench import benchmark, format_table

    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_folder(args.preset, Path(tmp) / args.preset)
        port = free_port()
        cmd = [sys.executable, "-m", "dsv3", "serve", "--model", str(folder), "--port", str(port), "--dtype",
               args.dtype, "--max-batch", str(args.max_batch), "--max-queue", "4096", "--log-level", "warning"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.speculative:
            cmd += ["--speculative", args.speculative]
        server = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(server, url)
            reference = None if args.no_offline else OfflineReference(folder, args)
            t0 = time.perf_counter()
            rounds = []   # per round: {concurrency: (server row, offline tok/s or None)}
            for r in range(args.repeat):
                if args.repeat > 1:
                    print(f"round {r + 1}/{args.repeat}", flush=True)
                got = {}
                for c in levels:  # interleaved: the machine's load drifts, the ratio should not
                    row = benchmark(url, [c], args.num_prompts, args.input_len, args.output_len)[0]
                    off = None
                    if reference is not None:
                        off = reference(c)
                        print(f"  offline (no HTTP): {off:.1f} output tok/s", flush=True)
                    got[c] = (row, off)
                rounds.append(got)
            took = time.perf_counter() - t0
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
    name = args.model or f"preset {args.preset} (random weights)"
    print(f"\n{name}, dtype {args.dtype}, input {args.input_len} / output {args.output_len} tokens, "
          f"{os.cpu_count()} CPUs, {args.repeat} round(s), {took:.0f} s\n")
    # the round whose concurrency-16 (else last level) throughput is the median one, as a full table
    key = 16 if 16 in levels else levels[-1]
    order = sorted(range(len(rounds)), key=lambda i: rounds[i][key][0]["output_throughput"])
    mid = order[len(order) // 2]
    print(format_table([rounds[mid][c][0] for c in levels]) + (
        f"\n(round {mid + 1}: the median round by output tok/s at concurrency {key})" if len(rounds) > 1 else ""))
    srv = {c: [g[c][0]["output_throughput"] for g in rounds] for c in levels}
    off = {c: [g[c][1] for g in rounds] for c in levels} if reference is not None else {}
    print("\noutput tok/s per level" + (", median over rounds (each round's figures in brackets)"
                                       if len(rounds) > 1 else "") + ":")
    for c in levels:
        line = f"  concurrency {c}: server {_fmt(srv[c])}"
        if off:
            line += (f"; the same load through Engine.generate without HTTP (run right after it) {_fmt(off[c])}; "
                     f"server / engine {_fmt([a / b for a, b in zip(srv[c], off[c])], 2)}")
        print(line)
    if 1 in levels:
        for c in levels:
            if c == 1:
                continue
            line = (f"aggregate output tok/s, concurrency {c} / concurrency 1: server "
                    f"{_fmt([a / b for a, b in zip(srv[c], srv[1])], 2, 'x')}")
            if off:
                line += f"; engine alone {_fmt([a / b for a, b in zip(off[c], off[1])], 2, 'x')}"
            print(line + ("  (target >= 6x)" if c == 16 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": name, "args": vars(args),
            "rounds": [[dict(g[c][0], offline_output_throughput=g[c][1]) for c in levels] for g in rounds]},
            indent=2))
    return 0


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _fmt(xs, digits=1, unit=""):
    m = f"{_median(xs):.{digits}f}{unit}"
    return m if len(xs) == 1 else m + " [" + ", ".join(f"{x:.{digits}f}" for x in xs) + "]"


def wait_ready(server, url: str, timeout: float = 600):
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not start within {timeout:.0f} s")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
