"""EPLB: DeepSeek's published example, the invariants of a placement, the optimality of the
replication rule, balance figures, argument checks and the `dsv3 eplb` command."""
import itertools
import json
import random

import pytest
import torch

from dsv3.cli import main
from dsv3.parallel.eplb import balance_report, gpu_loads, identity_gpu_loads, rebalance_experts

# The example of github.com/deepseek-ai/EPLB (README / example.py): 2 layers, 12 experts in
# 4 groups, 16 physical experts on 2 nodes x 4 GPUs, and the output printed there.
EXAMPLE_W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
             [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EXAMPLE_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                   [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
# Replica counts for the same example as asserted by vLLM's test of its port of DeepSeek's
# code (tests/distributed/test_eplb_algo.py::test_basic_rebalance).
EXAMPLE_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                  [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(EXAMPLE_W), 16, 4, 2, 8)
    assert phy2log.tolist() == EXAMPLE_PHY2LOG
    assert logcnt.tolist() == EXAMPLE_LOGCNT
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert log2phy.shape == (2, 12, 2)
    check_placement(torch.tensor(EXAMPLE_W), phy2log, log2phy, logcnt, 16, 4, 2, 8)


def test_published_example_input_types():
    # Same answer from a python list, an int tensor and an fp64 tensor (the loads are fp32 inside).
    ref = rebalance_experts(torch.tensor(EXAMPLE_W), 16, 4, 2, 8)
    for w in (EXAMPLE_W, torch.tensor(EXAMPLE_W, dtype=torch.float64), torch.tensor(EXAMPLE_W).int()):
        out = rebalance_experts(w, 16, 4, 2, 8)
        assert all(torch.equal(a, b) for a, b in zip(ref, out))


def check_placement(w, phy2log, log2phy, logcnt, R, G, N, gpus):
    w = torch.as_tensor(w)
    L, E = w.shape
    assert phy2log.shape == (L, R) and logcnt.shape == (L, E)
    assert log2phy.shape == (L, E, int(logcnt.max()))
    # every logical expert has at least one replica and the replicas add up to R
    assert bool((logcnt >= 1).all())
    assert logcnt.sum(1).tolist() == [R] * L
    # logcnt counts the occurrences of each expert in phy2log
    counted = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    # log2phy inverts phy2log: expert e's first logcnt[e] entries are exactly the physical slots
    # holding e, the rest is -1 padding
    for layer in range(L):
        for e in range(E):
            c = int(logcnt[layer, e])
            slots = log2phy[layer, e, :c].tolist()
            assert sorted(slots) == sorted((phy2log[layer] == e).nonzero().flatten().tolist())
            assert log2phy[layer, e, c:].tolist() == [-1] * (log2phy.shape[2] - c)
    # each GPU holds R / gpus physical experts: slot p lives on GPU p // (R / gpus)
    assert R % gpus == 0 and phy2log.view(L, gpus, R // gpus).shape[2] == R // gpus
    if G % N == 0:
        # hierarchical: the replicas on a node all belong to whole groups assigned to that node,
        # each node gets G / N groups, and a group never spans two nodes
        group = phy2log // (E // G)  # (L, R) group of each physical expert
        per_node = R // N
        for layer in range(L):
            owner = {}
            for p in range(R):
                node = p // per_node
                assert owner.setdefault(int(group[layer, p]), node) == node
            assert sorted(owner) == list(range(G))
            for node in range(N):
                assert sum(1 for n in owner.values() if n == node) == G // N


def random_configs(seed, count):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        nodes = rng.choice([1, 2, 4])
        gpus = nodes * rng.choice([1, 2, 4])
        groups = rng.choice([1, 2, 3, 4, 8])
        E = groups * rng.choice([1, 2, 4, 8])
        if groups % nodes == 0 and E % nodes:
            continue
        R = (-(-E // gpus) + rng.choice([0, 1, 2])) * gpus
        L = rng.choice([1, 2, 3])
        kind = rng.choice(["uniform", "skewed", "ties"])
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        if kind == "uniform":
            w = torch.randint(0, 1000, (L, E), generator=g)
        elif kind == "skewed":  # Zipf-like popularity, shuffled over experts
            w = 1e4 / torch.arange(1, E + 1, dtype=torch.float32) ** 1.3
            w = torch.stack([w[torch.randperm(E, generator=g)] for _ in range(L)])
        else:  # many exact ties, the hard case for tie-breaking
            w = torch.randint(0, 3, (L, E), generator=g)
        out.append((w, R, groups, nodes, gpus))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_invariants_random(seed):
    policies = set()
    for w, R, G, N, gpus in random_configs(seed, 40):
        phy2log, log2phy, logcnt = rebalance_experts(w, R, G, N, gpus)
        check_placement(w, phy2log, log2phy, logcnt, R, G, N, gpus)
        # tokens are conserved: the GPUs together carry the whole layer's load
        loads = gpu_loads(w, phy2log, logcnt, gpus)
        assert torch.allclose(loads.sum(1), w.double().sum(1))
        policies.add(G % N == 0)
    assert policies == {True, False}  # both policies were exercised


def test_global_policy_is_one_node_one_group():
    # DeepSeek's entry point falls back to the hierarchical procedure with one node and one
    # group when the groups cannot be split evenly over the nodes.
    w = torch.tensor(EXAMPLE_W)
    a = rebalance_experts(w, 16, 4, 8, 8)  # 4 groups on 8 nodes: global policy
    b = rebalance_experts(w, 16, 1, 1, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # and it differs from the hierarchical placement on the same example
    assert a[0].tolist() != EXAMPLE_PHY2LOG


def test_replication_minimises_the_largest_replica_load():
    # The replica counts minimise max_e w_e / c_e subject to c_e >= 1, sum c_e = R: check
    # against exhaustive search on small cases (global policy, one GPU so packing is trivial).
    rng = random.Random(0)
    for _ in range(60):
        E = rng.randint(2, 5)
        R = E + rng.randint(0, 4)
        w = [rng.choice([0, 1, 5, 17, 40, 100, rng.randint(0, 300)]) for _ in range(E)]
        _, _, logcnt = rebalance_experts([w], R, 1, 1, 1)
        best = min(max(wi / ci for wi, ci in zip(w, c))
                   for c in itertools.product(range(1, R - E + 2), repeat=E) if sum(c) == R)
        got = max(wi / ci for wi, ci in zip(w, logcnt[0].tolist()))
        assert got == pytest.approx(best)


def test_gpu_packing_is_greedy_by_descending_load():
    # One layer, one node, no redundancy, 2 GPUs with 3 slots each. Greedy by descending load
    # into the lightest GPU with room: 9->g0, 8->g1, 7->g1 (8<9), 6->g0 (9<15), 5->g0 (15=15,
    # lowest index), 1->g1 (g0 full). GPU loads 20 and 16.
    w = [[5, 9, 1, 7, 6, 8]]
    phy2log, _, logcnt = rebalance_experts(w, 6, 1, 1, 2)
    assert sorted(phy2log[0, :3].tolist()) == [0, 1, 4]
    assert sorted(phy2log[0, 3:].tolist()) == [2, 3, 5]
    # within a GPU, experts sit in the order they were placed
    assert phy2log[0].tolist() == [1, 4, 0, 5, 3, 2]
    assert gpu_loads(w, phy2log, logcnt, 2).tolist() == [[20.0, 16.0]]


def test_gpu_loads_on_published_example():
    w = torch.tensor(EXAMPLE_W)
    phy2log, _, logcnt = rebalance_experts(w, 16, 4, 2, 8)
    loads = gpu_loads(w, phy2log, logcnt, 8)
    # layer 0, GPU 0 holds experts 5 and 6; expert 5 has 2 replicas: 165/2 + 39
    assert loads[0, 0].item() == pytest.approx(165 / 2 + 39)
    # layer 1, GPU 7 holds experts 3 and 1; expert 1 has 2 replicas: 64 + 107/2
    assert loads[1, 7].item() == pytest.approx(64 + 107 / 2)
    # identity: 12 experts over 8 GPUs in order -> chunks of 2,2,2,2,1,1,1,1
    ident = identity_gpu_loads(w, 8)
    assert ident[0].tolist() == [222.0, 101.0, 269.0, 43.0, 73.0, 56.0, 183.0, 86.0]


def test_balance_improves_on_skewed_loads():
    # DeepSeek-V3-like layout: 256 experts in 8 groups, 4 nodes x 8 GPUs, 32 redundant experts;
    # Zipf-like expert popularity (a few hot experts), different per layer.
    g = torch.Generator().manual_seed(0)
    base = 1e5 / torch.arange(1, 257, dtype=torch.float32) ** 1.2
    w = torch.stack([base[torch.randperm(256, generator=g)] for _ in range(4)])
    for G, N in ((8, 4), (8, 3)):  # hierarchical, then global
        gpus = 32 if N == 4 else 36
        R = 288
        phy2log, log2phy, logcnt = rebalance_experts(w, R, G, N, gpus)
        check_placement(w, phy2log, log2phy, logcnt, R, G, N, gpus)
        rep = balance_report(w, phy2log, logcnt, gpus)
        for before, after in zip(rep["before"]["per_layer"], rep["after"]["per_layer"]):
            assert after < before
        # the hottest expert alone is far above the mean GPU load without replication
        assert rep["before"]["worst"] > 2.0
        assert rep["after"]["worst"] < rep["before"]["worst"] / 3
        # a GPU can never carry less than the largest single replica load
        per_gpu = gpu_loads(w, phy2log, logcnt, gpus)
        biggest = (w.double() / logcnt).max(1).values
        assert bool((per_gpu.max(1).values >= biggest - 1e-6).all())


@pytest.mark.parametrize("args, msg", [
    ((16, 4, 2, 6), "multiple of num_gpus"),        # replicas not divisible by gpus
    ((16, 4, 3, 8), "multiple of num_nodes"),       # gpus not divisible by nodes
    ((16, 5, 1, 8), "multiple of num_groups"),      # experts not divisible by groups
    ((8, 4, 2, 8), "at least the number of logical experts"),  # fewer replicas than experts
    ((16, 0, 1, 8), "num_groups must be a positive integer"),
    ((16, 4, 2, 2.0), "num_gpus must be a positive integer"),
])
def test_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(torch.tensor(EXAMPLE_W), *args)


@pytest.mark.parametrize("w, msg", [
    ([1.0, 2.0, 3.0, 4.0], "2-D"),
    ([[1.0, float("nan"), 3.0, 4.0]], "NaN"),
    ([[1.0, -2.0, 3.0, 4.0]], "negative"),
])
def test_bad_loads(w, msg):
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(torch.tensor(w), 4, 1, 1, 2)


# ----------------------------------------------------------------------------- CLI

def run_cli(capsys, *argv):
    rc = main(["eplb", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_list_and_out(tmp_path, capsys):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(EXAMPLE_W))
    out_path = tmp_path / "placement.json"
    rc, out, err = run_cli(capsys, "--loads", path, "--replicas", 16, "--groups", 4, "--nodes", 2,
                           "--gpus", 8, "--out", out_path)
    assert rc == 0, err
    assert "hierarchical" in out
    # layer 0: GPU 0 holds experts 5 6 and GPU 7 holds 11 1 (DeepSeek's example)
    assert "node 0 gpu 0: 5 6" in out and "node 1 gpu 7: 11 1" in out
    assert "node 1 gpu 7: 3 1" in out  # layer 1
    saved = json.loads(out_path.read_text())
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(EXAMPLE_W), 16, 4, 2, 8)
    assert saved["phy2log"] == EXAMPLE_PHY2LOG
    assert saved["log2phy"] == log2phy.tolist()
    assert saved["logcnt"] == logcnt.tolist()
    rep = balance_report(torch.tensor(EXAMPLE_W), phy2log, logcnt, 8)
    assert saved["balance"]["after"]["per_layer"] == pytest.approx(rep["after"]["per_layer"])
    b, a = rep["before"], rep["after"]
    assert (f"before mean {b['mean']:.3f} worst {b['worst']:.3f} | "
            f"after mean {a['mean']:.3f} worst {a['worst']:.3f}") in out
    assert a["worst"] < b["worst"]


def test_cli_json_dict_and_pt(tmp_path, capsys):
    outs = []
    dict_path = tmp_path / "loads.json"
    dict_path.write_text(json.dumps({"loads": EXAMPLE_W, "note": "extra keys are ignored"}))
    pt_path = tmp_path / "loads.pt"
    torch.save(torch.tensor(EXAMPLE_W), pt_path)
    pt_dict_path = tmp_path / "loads_dict.pt"
    torch.save({"loads": torch.tensor(EXAMPLE_W, dtype=torch.float32)}, pt_dict_path)
    for p in (dict_path, pt_path, pt_dict_path):
        o = tmp_path / (p.stem + "_out.json")
        rc, _, err = run_cli(capsys, "--loads", p, "--replicas", 16, "--groups", 4, "--nodes", 2,
                             "--gpus", 8, "--out", o, "--no-placement")
        assert rc == 0, err
        outs.append(json.loads(o.read_text())["phy2log"])
    assert outs == [EXAMPLE_PHY2LOG] * 3


def test_cli_defaults_global_and_single_layer(tmp_path, capsys):
    # A flat list is one layer; --replicas defaults to the number of experts (no redundancy);
    # 3 groups on 2 nodes selects the global policy.
    path = tmp_path / "one.json"
    path.write_text(json.dumps([5, 9, 1, 7, 6, 8]))
    rc, out, err = run_cli(capsys, "--loads", path, "--gpus", 2, "--groups", 3, "--nodes", 2)
    assert rc == 0, err
    assert "global policy" in out and "6 physical experts" in out
    assert "node 0 gpu 0: 1 4 0" in out and "node 1 gpu 1: 5 3 2" in out


@pytest.mark.parametrize("content, msg", [
    ("{not json", "not valid JSON"),
    ('{"load": [[1, 2]]}', "'loads' key"),
    ("[]", "non-empty list"),
    ('"abc"', "non-empty list"),
    ("[[1, 2, 3, 4], [1, 2, 3]]", "layer 1 has 3 expert loads but layer 0 has 4"),
    ('[[1, 2, "x", 4]]', "layer 0, expert 2: 'x' is not a number"),
    ("[[1, 2, 3, true]]", "layer 0, expert 3"),
    ("[[1, 2, 3, 4], 5]", "layer 1 must be a non-empty list"),
    ("[[1, 2, -3, 4]]", "layer 0, expert 2: negative load -3"),
])
def test_cli_malformed_loads(tmp_path, capsys, content, msg):
    path = tmp_path / "bad.json"
    path.write_text(content)
    rc, _, err = run_cli(capsys, "--loads", path, "--gpus", 2)
    assert rc == 2
    assert str(path) in err and msg in err


def test_cli_bad_files_and_arguments(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    rc, _, err = run_cli(capsys, "--loads", missing, "--gpus", 2)
    assert rc == 2 and f"{missing}: no such file" in err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    rc, _, err = run_cli(capsys, "--loads", junk, "--gpus", 2)
    assert rc == 2 and f"{junk}: cannot read as a torch file" in err

    wrong = tmp_path / "wrong.pt"
    torch.save(torch.zeros(2, 3, 4), wrong)
    rc, _, err = run_cli(capsys, "--loads", wrong, "--gpus", 2)
    assert rc == 2 and str(wrong) in err and "(2, 3, 4)" in err

    good = tmp_path / "good.json"
    good.write_text(json.dumps(EXAMPLE_W))
    rc, _, err = run_cli(capsys, "--loads", good, "--replicas", 15, "--gpus", 8)
    assert rc == 2 and "num_replicas (15) must be a multiple of num_gpus (8)" in err
