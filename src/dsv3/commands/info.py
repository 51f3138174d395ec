import json

from dsv3.config import ModelConfig, preset


def configure(p):
    p.add_argument("path", nargs="?", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--preset", help="describe a built-in preset instead (tiny, small, v2-lite, v3)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def run(args):
    if (args.path is None) == (args.preset is None):
        raise ValueError("give a checkpoint folder or --preset NAME")
    cfg = preset(args.preset) if args.preset else ModelConfig.from_hf(args.path)
    counts = cfg.num_params()
    if args.json:
        print(json.dumps({"config": cfg.to_hf(), "params": counts}, indent=2))
        return 0
    print(json.dumps(cfg.to_hf(), indent=2))
    print(f"parameters: total {_human(counts['total'])} ({counts['total']:,}), "
          f"activated per token {_human(counts['active'])} ({counts['active']:,}), "
          f"MTP {_human(counts['mtp'])} ({counts['mtp']:,})")
    print(f"latent KV cache: {cfg.kv_cache_dim} values per token per layer")
    return 0
