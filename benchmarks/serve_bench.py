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

import httpx

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
    p.add_argument("--dtype", default="float32", help="server dtype (float32 is the fast one on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="serve with MTP speculative decoding")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--no-offline", action="store_true",
                   help="skip the reference: the same load through Engine.generate, without HTTP")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from dsv3.serve.bench import benchmark, format_table

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
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    raise SystemExit("the server exited during start-up")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start within 10 minutes")
                time.sleep(0.5)
            levels = [int(x) for x in args.concurrency.split(",")]
            reference = None if args.no_offline else OfflineReference(folder, args)
            t0 = time.perf_counter()
            rows, offline = [], {}
            for c in levels:  # interleaved: the machine's load drifts, the ratio should not
                rows += benchmark(url, [c], args.num_prompts, args.input_len, args.output_len)
                if reference is not None:
                    offline[c] = reference(c)
                    print(f"  offline (no HTTP): {offline[c]:.1f} output tok/s", flush=True)
            took = time.perf_counter() - t0
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
    name = args.model or f"preset {args.preset} (random weights)"
    print(f"\n{name}, dtype {args.dtype}, input {args.input_len} / output {args.output_len} tokens, "
          f"{os.cpu_count()} CPUs, {took:.0f} s\n")
    print(format_table(rows))
    if offline:
        print("\nthe same load without HTTP (Engine.generate, max_num_seqs = concurrency), run right after each "
              "level:")
        for s in rows:
            o = offline[s["concurrency"]]
            print(f"  concurrency {s['concurrency']}: offline {o:.1f} output tok/s; server / offline = "
                  f"{s['output_throughput'] / o:.2f}")
    by_c = {s["concurrency"]: s for s in rows}
    if 1 in by_c and by_c[1]["output_throughput"] > 0:
        for c, s in by_c.items():
            if c != 1:
                print(f"aggregate output tok/s, concurrency {c} / concurrency 1: "
                      f"{s['output_throughput'] / by_c[1]['output_throughput']:.2f}x" + (
                          "  (target >= 6x)" if c == 16 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "args": vars(args), "results": rows,
                                               "offline_output_throughput": offline}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
