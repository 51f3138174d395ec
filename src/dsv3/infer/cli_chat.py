"""`dsv3 chat --model DIR`: an interactive chat that streams the reply token by token and keeps the
history (rendered with the model's chat template each turn; the engine's prefix cache finds the
earlier turns' latents again). Commands: /clear forgets the history, /exit (or end of input) quits."""
import argparse
import sys

from dsv3.infer.cli_generate import add_model_flags, add_sampling_flags, load_engine, load_tokenizer, \
    print_stats, sampling_params, stream_text


def configure(p: argparse.ArgumentParser):
    add_model_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(p, max_new_tokens=512)


def run(args, stdin=None, stdout=None):
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    tok = load_tokenizer(args.model)
    if tok.chat_template is None:
        raise ValueError(f"the tokenizer in {args.model} has no chat template")
    engine = load_engine(args)
    interactive = stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("dsv3 chat: /clear forgets the conversation, /exit quits", file=stdout, flush=True)
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/clear":
            history = []
            print("[history cleared]", file=stdout, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(system + history, add_generation_prompt=True, tokenize=True)
        reply, n, dt = stream_text(engine, tok, ids, sampling_params(args), args.stop, out=stdout)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
        if args.stats:
            print_stats(engine, n, dt)
    return 0
