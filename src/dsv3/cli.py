"""`dsv3 <command>`: each command lives in its own module, which provides
`configure(parser)` (argparse flags with help text) and `run(args) -> int | None`.
Modules are imported lazily so `dsv3 --help` stays fast and a missing optional
dependency only affects its own command."""
import argparse
import importlib
import importlib.util
import sys

# command -> (module, one-line help)
COMMANDS = {
    "info": ("dsv3.commands.info", "print the config and parameter counts of a checkpoint folder"),
    "train": ("dsv3.train.cli", "pre-train a model with the DeepSeek-V3 recipe"),
    "distill-mtp": ("dsv3.train.distill_mtp", "train a checkpoint's MTP modules to draft its own main model's tokens"),
    "plot": ("dsv3.train.plot", "draw loss curves and an expert-load heatmap from a training run"),
    "generate": ("dsv3.infer.cli_generate", "generate text from a prompt"),
    "chat": ("dsv3.infer.cli_chat", "interactive chat with streaming"),
    "serve": ("dsv3.serve.app", "OpenAI-compatible HTTP server"),
    "bench": ("dsv3.commands.bench", "benchmark prefill/decode against transformers"),
    "bench-serve": ("dsv3.serve.bench", "benchmark a running server (TTFT, TPOT, ITL, throughput)"),
    "convert": ("dsv3.fp8.convert", "convert checkpoints between FP8 and BF16"),
    "eplb": ("dsv3.parallel.eplb", "expert placement with DeepSeek's EPLB"),
}


def _available():
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is None:
            continue
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:
            continue
        out[name] = (mod, help_)
    return out


def build_parser(commands=None):
    commands = commands if commands is not None else _available()
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (mod, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=mod)
        # configure() is imported only for the command being run (or for --help of it);
        # the top-level --help lists commands without importing them.
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    parser = build_parser(commands)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in commands:
        parser.error(f"unknown command {name!r}; choose from {', '.join(commands)}")
    mod_name, help_ = commands[name]
    mod = importlib.import_module(mod_name)
    p = argparse.ArgumentParser(prog=f"dsv3 {name}", description=help_)
    mod.configure(p)
    args = p.parse_args(argv[1:])
    try:
        rc = mod.run(args)
    except ValueError as e:  # bad user input: a clear message, no traceback
        print(f"dsv3 {name}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
