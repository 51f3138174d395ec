"""`dsv3 bench-serve --url URL [--concurrency 1,4,16,64]`: load-test a running OpenAI-compatible
server (dsv3's, vLLM's, SGLang's) the way vLLM's `bench serve` does.

Each level sends --num-prompts streamed /v1/completions requests (random token-id prompts of
--input-len tokens, --output-len tokens each with ignore_eos, greedy) with at most `concurrency`
in flight and no arrival delay (vLLM's --request-rate inf with --max-concurrency). Definitions
(vLLM benchmarks/serve.py):
- TTFT: request sent -> first streamed chunk with text;
- ITL: gaps between consecutive streamed chunks (pooled over all requests);
- TPOT: per request (latency - TTFT) / (output tokens - 1);
- E2EL: request sent -> last chunk;
- request throughput = completed requests / wall time of the level; output throughput = generated
  tokens / wall time (tokens counted from the server's usage chunk).
Medians and 99th percentiles in milliseconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    # linear interpolation between closest ranks (numpy's default, which vLLM's figures use)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    itl = [x * 1e3 for r in ok for x in r.itl]
    e2el = [r.latency * 1e3 for r in ok]
    s = {"concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
         "duration_s": duration, "input_tokens": in_tok, "output_tokens": out_tok,
         "request_throughput": len(ok) / duration, "output_throughput": out_tok / duration,
         "total_token_throughput": (in_tok + out_tok) / duration}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        s[f"mean_{name}_ms"], s[f"median_{name}_ms"], s[f"p99_{name}_ms"] = _mean(xs), _pct(xs, 50), _pct(xs, 99)
    errs = [r.error for r in results if not r.ok]
    if errs:
        s["first_error"] = errs[0]
    return s


async def one_request(session, url: str, body: dict, headers: dict) -> RequestResult:
    res = RequestResult(ok=False)
    st = time.perf_counter()
    last = st
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}"
                return res
            async for raw in r.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = json.dumps(msg["error"])[:300]
                    return res
                now = time.perf_counter()
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                    res.prompt_tokens = msg["usage"]["prompt_tokens"]
                if any(c.get("text") for c in msg.get("choices") or []):
                    if res.ttft == 0.0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = last - st
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "no text was streamed"
    except Exception as e:  # a benchmark reports failures, it does not stop at the first one
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                    headers: dict, timeout: float) -> dict:
    # aiohttp, as vLLM's bench serve: the client shares the machine with the server here, and
    # httpx's streaming costs several times more CPU per chunk (it slowed the server it measured)
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency + 4, force_close=False)
    # SSE lines longer than aiohttp's default 64 KiB read limit (big logprobs) must not fail the request
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout),
                                     read_bufsize=1 << 20) as session:
        async def go(p):
            body = {"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            async with sem:
                return await one_request(session, url, body, headers)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[go(p) for p in prompts])
        duration = time.perf_counter() - t0
    return summarize(results, duration, concurrency)


def format_table(rows: list[dict]) -> str:
    head = ("| concurrency | requests | req/s | output tok/s | TTFT median / p99 (ms) | TPOT median / p99 (ms) "
            "| ITL median / p99 (ms) |")
    lines = [head, "|" + "---|" * 7]
    for s in rows:
        lines.append(f"| {s['concurrency']} | {s['completed']}/{s['completed'] + s['failed']} | "
                     f"{s['request_throughput']:.2f} | {s['output_throughput']:.1f} | "
                     f"{s['median_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} | "
                     f"{s['median_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} | "
                     f"{s['median_itl_ms']:.1f} / {s['p99_itl_ms']:.1f} |")
    return "\n".join(lines)


def _get_json(url: str, headers: dict) -> tuple[int, object]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _server_info(base: str, headers: dict, model: str | None) -> tuple[str, int]:
    status, body = _get_json(base + "/v1/models", headers)
    if status != 200:
        raise ValueError(f"GET {base}/v1/models answered {status}: {str(body)[:200]}")
    models = [m["id"] for m in body["data"]]
    if model is None:
        model = models[0]
    vocab = None
    status, info = _get_json(base + "/tokenizer_info", headers)
    if status == 200:
        vocab = info.get("vocab_size")
    return model, vocab


def benchmark(url: str, concurrency: list[int], num_prompts: int | None = None, input_len: int = 128,
              output_len: int = 64, model: str | None = None, api_key: str | None = None, seed: int = 0,
              vocab_size: int | None = None, timeout: float = 3600.0, log=print) -> list[dict]:
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model, served_vocab = _server_info(base, headers, model)
    vocab = vocab_size or served_vocab
    if not vocab:
        raise ValueError("the server does not report its vocabulary size (/tokenizer_info); pass --vocab-size")
    rng = random.Random(seed)
    endpoint = base + "/v1/completions"

    def prompts(n):
        # ids above the first 10 skip BOS/EOS/PAD and other low specials
        return [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(n)]

    # warm-up (first-call allocations, lazy imports) outside the measurements, as vLLM's test run
    asyncio.run(run_level(endpoint, model, prompts(1), min(output_len, 4), 1, headers, timeout))
    rows = []
    for c in concurrency:
        n = num_prompts or max(4 * c, 8)
        s = asyncio.run(run_level(endpoint, model, prompts(n), output_len, c, headers, timeout))
        rows.append(s)
        log(f"concurrency {c}: {s['completed']}/{n} ok in {s['duration_s']:.1f} s, "
            f"{s['output_throughput']:.1f} output tok/s, TTFT median {s['median_ttft_ms']:.0f} ms, "
            f"TPOT median {s['median_tpot_ms']:.1f} ms" + (f" [first error: {s['first_error']}]"
                                                           if s.get("first_error") else ""))
    return rows


def configure(p: argparse.ArgumentParser):
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per level (default: 4 x concurrency, at least 8)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request (ignore_eos)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary for random prompt ids (default: the server's /tokenizer_info)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request at most")
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def run(args):
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError("--concurrency levels must be >= 1")
    if args.input_len < 1 or args.output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    rows = benchmark(args.url, levels, args.num_prompts, args.input_len, args.output_len, args.model, args.api_key,
                     args.seed, args.vocab_size, args.timeout)
    print()
    print(format_table(rows))
    if len(rows) > 1 and rows[0]["output_throughput"] > 0:
        base = rows[0]
        for s in rows[1:]:
            print(f"output tok/s at concurrency {s['concurrency']} = "
                  f"{s['output_throughput'] / base['output_throughput']:.2f}x concurrency {base['concurrency']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "results": rows}, f,
                      indent=2)
    return 0 if all(s["failed"] == 0 for s in rows) else 1
