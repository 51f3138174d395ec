"""Expert-Parallelism Load Balancer (EPLB): where to put redundant expert replicas.

DeepSeek-V3 (paper section 3.4, "redundant experts") serves hot experts from several GPUs at
once. Given per-expert load statistics, this module decides how many replicas each logical
expert gets and which GPU hosts each replica. It reproduces DeepSeek's open-source EPLB
(github.com/deepseek-ai/EPLB): same signature, same greedy rules, same tie-breaking, so a
placement computed here matches the published one.

Two policies, chosen as DeepSeek's entry point chooses them:
- hierarchical (num_groups % num_nodes == 0): pack whole expert groups onto nodes (so that
  group-limited routing keeps its traffic inside a node), replicate experts within each node,
  then pack the node's physical experts onto its GPUs;
- global (otherwise): the same procedure with one node and one group, i.e. replicate over the
  whole cluster and pack onto all GPUs.

Physical expert p lives on GPU p // (num_replicas // num_gpus); GPU g lives on node
g // (num_gpus // num_nodes).

The CLI (`dsv3 eplb`) reads load statistics from a file and prints the placement and the
max/mean GPU load before (identity placement) and after.
"""
import argparse
import json
import math
from pathlib import Path

import torch

__all__ = ["rebalance_experts", "gpu_loads", "identity_gpu_loads", "balance_report"]


# ----------------------------------------------------------------------------- algorithm

def _balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    # weight: (R, n) fp32, one independent packing problem per row. Every pack receives
    # exactly n / num_packs items. Greedy as in DeepSeek's EPLB: visit items by descending
    # weight and drop each into the currently lightest pack that still has room (lowest pack
    # index on equal load). Returns (pack index, slot within the pack), both (R, n).
    rows, n = weight.shape
    assert n % num_packs == 0
    per_pack = n // num_packs
    if per_pack == 1:
        # One item per pack: the reference keeps the input order (item i -> pack i).
        pack = torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
        return pack, torch.zeros(rows, n, dtype=torch.int64)
    # The reference orders items with torch.sort(descending=True) (not stable=True); for
    # more than 16 items the CPU sort then orders equal weights differently from a stable
    # sort, and that order decides where tied items land. Using the same call keeps our
    # placements identical to DeepSeek's on the same torch build, ties included.
    order = weight.sort(dim=-1, descending=True).indices  # (R, n)
    pack = torch.full((rows, n), -1, dtype=torch.int64)
    slot = torch.full((rows, n), -1, dtype=torch.int64)
    # fp32 accumulation like the reference, so near-ties between pack loads resolve the same.
    pack_load = torch.zeros(rows, num_packs, dtype=torch.float32)
    pack_count = torch.zeros(rows, num_packs, dtype=torch.int64)
    r = torch.arange(rows)
    # The greedy is sequential in the items but independent across rows: loop over the n
    # items, vectorised over the rows (layers, or layers x nodes).
    for j in range(n):
        item = order[:, j]
        open_load = pack_load.masked_fill(pack_count >= per_pack, math.inf)
        p = open_load.argmin(dim=-1)  # first minimum: lowest pack index wins ties
        pack[r, item] = p
        slot[r, item] = pack_count[r, p]
        pack_load[r, p] += weight[r, item]
        pack_count[r, p] += 1
    assert bool((pack_count == per_pack).all())
    return pack, slot


def _replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # weight: (R, num_log) fp32. Physical experts 0..num_log-1 are the logical experts
    # themselves; each extra replica goes to the expert whose per-replica load
    # weight / count is currently the largest (first index on ties). Greedy is optimal for
    # minimising the largest per-replica load. Returns phy2log (R, num_phy), the replica
    # rank of each physical expert (R, num_phy) and the replica count (R, num_log).
    rows, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    count = torch.ones(rows, num_log, dtype=torch.int64)
    r = torch.arange(rows)
    for p in range(num_log, num_phy):
        hot = (weight / count).argmax(dim=-1)
        phy2log[:, p] = hot
        rank[:, p] = count[r, hot]
        count[r, hot] += 1
    return phy2log, rank, count


def _invert(perm: torch.Tensor) -> torch.Tensor:
    # Row-wise inverse of permutations: out[i, perm[i, j]] = j.
    out = torch.empty_like(perm)
    out.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand_as(perm))
    return out


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus
    gpus_per_node = num_gpus // num_nodes

    # Step 1: balance whole groups over nodes by their summed load.
    group_load = weight.view(layers, num_groups, group_size).sum(-1)  # (L, G)
    group_node, group_slot = _balanced_packing(group_load, num_nodes)
    # "Node-major" order of the logical experts: node 0's groups (in their slot order), then
    # node 1's, ...; experts keep their order inside a group. log2nm[l, e] is expert e's
    # position in that order; the first log_per_node positions belong to node 0, etc.
    group_base = (group_node * groups_per_node + group_slot) * group_size  # (L, G)
    log2nm = (group_base.unsqueeze(-1) + torch.arange(group_size)).flatten(1)  # (L, E)
    nm2log = _invert(log2nm)

    # Step 2: replicate inside each node (rows are (layer, node) pairs).
    nm_load = weight.gather(1, nm2log).view(layers * num_nodes, log_per_node)
    phy2nm, phy_rank, nm_count = _replicate(nm_load, phy_per_node)  # local indices per node

    # Step 3: balance each node's physical experts over its GPUs, a replica carrying an equal
    # share of its expert's load.
    replica_load = (nm_load / nm_count).gather(1, phy2nm)  # (L*N, phy_per_node)
    gpu, gpu_slot = _balanced_packing(replica_load, gpus_per_node)
    # Final position of node-local physical expert i: its GPU's block, then its slot.
    final_pos = gpu * phy_per_gpu + gpu_slot
    pos2phy = _invert(final_pos)

    # Compose back to global logical ids: node-local index -> node-major -> logical.
    pos2nm = phy2nm.gather(1, pos2phy).view(layers, num_nodes, phy_per_node)
    pos2nm = (pos2nm + (torch.arange(num_nodes) * log_per_node).view(1, -1, 1)).flatten(1)
    phy2log = nm2log.gather(1, pos2nm)  # (L, num_phy)
    rank = phy_rank.gather(1, pos2phy).view(layers, num_phy)
    logcnt = nm_count.view(layers, num_log).gather(1, log2nm)  # (L, E)
    return phy2log, rank, logcnt


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _as_loads(weight) -> torch.Tensor:
    w = torch.as_tensor(weight)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor [num_layers, num_logical_experts], "
                         f"got shape {tuple(w.shape)}")
    if w.dtype == torch.bool or w.is_complex():
        raise ValueError(f"weight must hold real-valued loads, got dtype {w.dtype}")
    # fp32 on CPU: the reference computes in fp32 and its tie-breaking depends on it.
    w = w.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinite loads")
    if bool((w < 0).any()):
        raise ValueError("weight contains negative loads (loads are token counts)")
    return w


def _check_args(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int,
                num_gpus: int) -> None:
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                    ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        _check_int(name, v)
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}): "
                         f"every GPU hosts the same number of physical experts")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_experts % num_groups:
        raise ValueError(f"the number of logical experts ({num_experts}) must be a multiple of "
                         f"num_groups ({num_groups})")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be at least the number of logical "
                         f"experts ({num_experts}): every expert needs a replica")


def policy_name(num_groups: int, num_nodes: int) -> str:
    return "hierarchical" if num_groups % num_nodes == 0 else "global"


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place `num_replicas` physical experts for the loads `weight` [layers, num_logical_experts].

    Returns (phy2log [layers, num_replicas]: logical expert of each physical slot,
    log2phy [layers, num_logical_experts, max replicas]: physical slots of each expert by
    replica rank, padded with -1, logcnt [layers, num_logical_experts]: replica counts).
    All int64 on the CPU.
    """
    w = _as_loads(weight)
    layers, num_experts = w.shape
    _check_args(num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        # DeepSeek's global policy is the hierarchical one with a single node and group.
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max())
    log2phy = torch.full((layers, num_experts, max_cnt), -1, dtype=torch.int64)
    # Replica `rank` of expert e sits at flat index e * max_cnt + rank of the layer's row.
    log2phy.view(layers, -1).scatter_(
        1, phy2log * max_cnt + rank, torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1))
    return phy2log, log2phy, logcnt


# ----------------------------------------------------------------------------- diagnostics

def gpu_loads(weight, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU, (layers, num_gpus), when each expert's tokens are spread evenly over its
    replicas (the dispatch assumed by EPLB's step 3)."""
    w = torch.as_tensor(weight).detach().cpu().to(torch.float64)  # fp64: exact sums for reports
    layers, num_phy = phy2log.shape
    if num_phy % num_gpus:
        raise ValueError(f"{num_phy} physical experts cannot be split evenly over {num_gpus} GPUs")
    per_replica = (w / logcnt.to(torch.float64)).gather(1, phy2log)  # (L, num_phy)
    return per_replica.view(layers, num_gpus, num_phy // num_gpus).sum(-1)


def identity_gpu_loads(weight, num_gpus: int) -> torch.Tensor:
    """Load per GPU, (layers, num_gpus), with no redundancy: the logical experts are split
    in order into num_gpus contiguous chunks (sizes differ by at most one)."""
    w = torch.as_tensor(weight).detach().cpu().to(torch.float64)
    chunks = torch.tensor_split(w, num_gpus, dim=1)
    return torch.stack([c.sum(1) for c in chunks], dim=1)


def _imbalance(loads: torch.Tensor) -> list[float]:
    # max / mean over GPUs per layer; 1.0 is perfect. An all-zero layer counts as balanced.
    mean = loads.mean(1)
    ratio = torch.where(mean > 0, loads.max(1).values / mean.clamp_min(1e-300), torch.ones_like(mean))
    return ratio.tolist()


def balance_report(weight, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> dict:
    """max/mean GPU load per layer before (identity placement) and after (EPLB placement),
    with the mean and worst over layers."""
    before = _imbalance(identity_gpu_loads(weight, num_gpus))
    after = _imbalance(gpu_loads(weight, phy2log, logcnt, num_gpus))

    def summary(per_layer):
        return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "worst": max(per_layer)}

    return {"metric": "max/mean GPU load", "before": summary(before), "after": summary(after)}


# ----------------------------------------------------------------------------- CLI

def _parse_loads(data, source: str) -> torch.Tensor:
    # JSON: a list of per-layer lists of loads, a single flat list (one layer), or
    # {"loads": ...} wrapping either.
    if isinstance(data, dict):
        if "loads" not in data:
            raise ValueError(f"{source}: a JSON object must have a 'loads' key "
                             f"(found keys: {sorted(data)[:10]})")
        data = data["loads"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source}: loads must be a non-empty list of per-layer lists of numbers, "
                         f"got {type(data).__name__}")
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        data = [data]
    rows = []
    for i, layer in enumerate(data):
        if not isinstance(layer, list) or not layer:
            raise ValueError(f"{source}: layer {i} must be a non-empty list of numbers, "
                             f"got {type(layer).__name__ if not isinstance(layer, list) else 'an empty list'}")
        for j, x in enumerate(layer):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ValueError(f"{source}: layer {i}, expert {j}: {x!r} is not a number")
        if len(layer) != len(data[0]):
            raise ValueError(f"{source}: layer {i} has {len(layer)} expert loads but layer 0 has "
                             f"{len(data[0])}; every layer needs the same number of experts")
        rows.append([float(x) for x in layer])
    return torch.tensor(rows, dtype=torch.float64)


def load_loads(path: str) -> torch.Tensor:
    """Read expert loads (layers, experts) from a JSON file or a torch .pt/.pth file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or not a torch file: report it as bad input
            raise ValueError(f"{path}: cannot read as a torch file ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict):
            if "loads" not in obj:
                raise ValueError(f"{path}: a saved dict must have a 'loads' entry")
            obj = obj["loads"]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor of loads, got {type(obj).__name__}")
        if obj.dim() == 1:
            obj = obj.unsqueeze(0)
        if obj.dim() != 2 or obj.numel() == 0:
            raise ValueError(f"{path}: loads tensor must have shape (layers, experts), "
                             f"got {tuple(obj.shape)}")
        if obj.dtype == torch.bool or obj.is_complex():
            raise ValueError(f"{path}: loads tensor has unsupported dtype {obj.dtype}")
        loads = obj.to(torch.float64)
    else:
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        loads = _parse_loads(data, path)
    if not bool(torch.isfinite(loads).all()):
        raise ValueError(f"{path}: loads contain NaN or infinite values")
    if bool((loads < 0).any()):
        i, j = (loads < 0).nonzero()[0].tolist()
        raise ValueError(f"{path}: layer {i}, expert {j}: negative load {loads[i, j].item():g}")
    return loads


def _metrics_loads(path: Path) -> torch.Tensor | None:
    # `dsv3 train` metrics: every eval record carries the cumulative training loads per MoE layer
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and isinstance(rec.get("train_loads"), dict):
            last = rec["train_loads"]
    if not last:
        return None
    return _parse_loads(list(last.values()), str(path))


def load_run_loads(path: str) -> tuple[torch.Tensor, str]:
    """Loads recorded by `dsv3 train` (cumulative tokens per expert over the training steps, every
    MoE layer incl. the MTP block, global batch), from a run folder, a checkpoint folder or a
    metrics.jsonl; any other file goes to load_loads. Returns (loads, the file they came from)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        loads = _metrics_loads(p)
        if loads is None:
            raise ValueError(f"{path}: no record with 'train_loads' (dsv3 train writes them with each evaluation)")
        return loads, str(p)
    if p.is_dir():
        # a run folder's loads.json is rewritten at each checkpoint; a checkpoint folder holds its own
        for f in (p / "loads.json", p / "latest" / "loads.json"):
            if f.is_file():
                return load_loads(str(f)), str(f)
        state = p / "latest" / "trainer_state.pt" if (p / "latest").exists() else p / "trainer_state.pt"
        if state.is_file():
            st = torch.load(state, map_location="cpu", weights_only=False)
            tracker = st.get("tracker") if isinstance(st, dict) else None
            if tracker and "total" in tracker:
                return torch.as_tensor(tracker["total"]).to(torch.float64), f"{state} (tracker)"
        if (p / "metrics.jsonl").is_file():
            loads = _metrics_loads(p / "metrics.jsonl")
            if loads is not None:
                return loads, str(p / "metrics.jsonl")
        raise ValueError(f"{path}: a folder without recorded expert loads (loads.json, latest/loads.json, "
                         f"a trainer_state.pt or metrics.jsonl records with 'train_loads')")
    return load_loads(path), str(p)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE_OR_RUN",
                        help="expert load statistics: JSON (a list of per-layer lists of loads, or "
                             "{\"loads\": [[...]]}), a torch .pt/.pth file holding a (layers, experts) "
                             "tensor, or what `dsv3 train` recorded: its run folder (loads.json), a "
                             "checkpoint folder, or its metrics.jsonl")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="number of physical experts (replicas) in total; a multiple of --gpus "
                             "(default: the number of logical experts, i.e. no redundant experts)")
    parser.add_argument("--groups", type=int, default=1, metavar="G",
                        help="number of expert groups (n_group of the model; default 1)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="number of server nodes; the hierarchical policy is used when it divides "
                             "--groups (default 1)")
    parser.add_argument("--gpus", type=int, required=True, metavar="N",
                        help="number of GPUs in total, a multiple of --nodes")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="write phy2log, log2phy, logcnt and the balance figures as JSON")
    parser.add_argument("--no-placement", action="store_true",
                        help="print only the balance figures, not the per-layer placement")


def run(args) -> int:
    loads, source = load_run_loads(args.loads)
    if source != str(Path(args.loads)):
        print(f"loads from {source}")
    layers, num_experts = loads.shape
    replicas = args.replicas if args.replicas is not None else num_experts
    try:
        phy2log, log2phy, logcnt = rebalance_experts(loads, replicas, args.groups, args.nodes, args.gpus)
    except ValueError as e:  # name the flags: the library speaks of num_replicas etc.
        raise ValueError(f"--replicas {replicas} --groups {args.groups} --nodes {args.nodes} "
                         f"--gpus {args.gpus} for {num_experts} experts in {args.loads}: {e}") from None
    report = balance_report(loads, phy2log, logcnt, args.gpus)
    policy = policy_name(args.groups, args.nodes)
    per_gpu = replicas // args.gpus
    gpus_per_node = args.gpus // args.nodes

    print(f"EPLB ({policy} policy): {layers} layer(s), {num_experts} logical experts, "
          f"{replicas} physical experts, {args.nodes} node(s) x {gpus_per_node} GPU(s), "
          f"{per_gpu} expert(s) per GPU")
    width = len(str(args.gpus - 1))
    for layer in range(layers):
        before = report["before"]["per_layer"][layer]
        after = report["after"]["per_layer"][layer]
        if not args.no_placement:
            print(f"layer {layer}:")
            row = phy2log[layer].view(args.gpus, per_gpu).tolist()
            for g, experts in enumerate(row):
                print(f"  node {g // gpus_per_node} gpu {g:>{width}}: {' '.join(map(str, experts))}")
            print(f"  max/mean GPU load: before {before:.3f}  after {after:.3f}")
        else:
            print(f"layer {layer}: max/mean GPU load before {before:.3f}  after {after:.3f}")
    b, a = report["before"], report["after"]
    print(f"max/mean GPU load over layers (1.0 = perfect): "
          f"before mean {b['mean']:.3f} worst {b['worst']:.3f} | "
          f"after mean {a['mean']:.3f} worst {a['worst']:.3f}")

    if args.out:
        out = {
            "policy": policy, "num_replicas": replicas, "num_groups": args.groups,
            "num_nodes": args.nodes, "num_gpus": args.gpus,
            "phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
            "balance": report,
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
