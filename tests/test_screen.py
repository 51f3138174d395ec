"""The int8 screen of the output head (dsv3.infer.screen): its error bound holds against float64
logits, its argmax is the fp32 argmax on weights and hidden states built to be hard (heavy tails,
outlier features, exact ties, near-ties below the int8 resolution), with either int8 kernel (oneDNN's
on an activation quantized by the screen, torch's dynamic one), and greedy decoding through it
(dsv3.generate, the engine, MTP speculative decoding) gives exactly the tokens of the full fp32 head
and of transformers."""
import pytest
import torch

import dsv3
import dsv3.infer.engine as engine_mod
import dsv3.infer.screen as screen
from dsv3.infer.engine import Engine
from dsv3.infer.screen import GreedyHead
from hf_ref import YARN, make_v3
from test_engine import greedy, rand_prompts, tiny_model

pytestmark = pytest.mark.skipif(screen._engine() is None, reason="no quantized CPU engine in this torch build")
KERNELS = (["dynamic"] + (["onednn"] if screen._onednn_linear() is not None else [])
           + (["c"] if screen.cpu_kernels.vnni() else []))


def weights(kind: str, V=6000, D=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) * 0.02
    if kind == "heavy":  # Student-t-like tails: a few huge entries per row set the int8 scale
        w = w / torch.rand(V, D, generator=g).clamp_min(0.02)
    elif kind == "scaled-rows":  # row norms over four orders of magnitude, one zero row
        w = w * torch.logspace(-2, 2, V)[torch.randperm(V, generator=g)][:, None]
        w[17] = 0
    elif kind == "low-rank":  # logits close together: many rows look alike
        w = (torch.randn(V, 4, generator=g) @ torch.randn(4, D, generator=g)) * 0.01 + w * 1e-3
    return w


def hiddens(D=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(D, generator=g) * s for s in (1e-3, 1.0, 1e3)]
    x = torch.randn(D, generator=g)
    x[5] = 80.0  # a "massive activation" feature
    out.append(x)
    out.append(torch.rand(D, generator=g))  # all positive: the activation range starts at 0
    out.append(torch.zeros(D))
    out += [torch.randn(D, generator=g) for _ in range(20)]
    return torch.stack(out)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["gauss", "heavy", "scaled-rows", "low-rank"])
def test_bound_holds_and_argmax_is_the_fp32_argmax(kind, kernel):
    w = weights(kind)
    gh = GreedyHead(w, kernel=kernel)
    assert gh.kernel == kernel
    h = hiddens()
    exact = h.double() @ w.double().t()  # (N, V) the real-valued logits, to fp64 precision
    a, b = gh.approx(h), gh.bound(h)
    assert ((a.double() - exact).abs() <= b.double()).all()
    assert (b.amax(dim=1) <= gh.bound_max(h) * (1 + 1e-6)).all()
    want = torch.nn.functional.linear(h, w).argmax(dim=1)
    for r in range(0, h.shape[0], 3):  # one to three rows at a time, as decode and verify pass them
        assert torch.equal(gh.argmax(h[r:r + 3]), want[r:r + 3])
    assert gh.rows == h.shape[0]
    assert gh.candidates < gh.rows * w.shape[0] // 4  # the screen really screens


@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_ties_and_near_ties_below_the_int8_resolution(kernel):
    w = weights("gauss")
    h = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    top = int((h @ w.t()).argmax())
    # an exact copy of the best row at a higher id, and one at a lower id: argmax takes the lowest
    w2 = w.clone()
    w2[4000] = w2[top]
    assert int(GreedyHead(w2, kernel).argmax(h)) == min(top, 4000)
    w2[3] = w2[top]
    assert int(GreedyHead(w2, kernel).argmax(h)) == 3
    # a rival 1e-5 below the best (far below what int8 resolves): the rescoring must separate them
    w3 = w.clone()
    w3[10] = w3[top] * (1 - 1e-5)
    w3[11] = w3[top] * (1 + 1e-5)
    gh = GreedyHead(w3, kernel)
    assert int(gh.argmax(h)) == int(torch.nn.functional.linear(h, w3).argmax()) == 11


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_finite_hidden_states_give_what_the_full_product_gives(kernel):
    w = weights("gauss")
    gh = GreedyHead(w, kernel)
    h = hiddens()[:3].clone()
    h[0, 7] = float("nan")
    h[1, 3] = float("inf")
    assert torch.equal(gh.argmax(h), torch.nn.functional.linear(h, w).argmax(dim=1))
    assert gh.fallbacks >= 2


@pytest.mark.skipif(len(KERNELS) < 2, reason="no oneDNN int8 linear in this torch build")
def test_measured_activation_error_narrows_the_candidates():
    # the same argmax from both kernels; oneDNN's, whose activation error the screen measures instead
    # of bounding it by the quantization step, rescores several times fewer rows
    w = weights("gauss", V=20000)
    h = hiddens()[6:]  # 20 N(0, 1) rows
    heads = {k: GreedyHead(w, k) for k in KERNELS}
    want = torch.nn.functional.linear(h, w).argmax(dim=1)
    for gh in heads.values():
        assert torch.equal(gh.argmax(h), want)
    assert heads["onednn"].candidates * 3 < heads["dynamic"].candidates
    assert (heads["onednn"].bound(h).mean(dim=1) < 0.8 * heads["dynamic"].bound(h).mean(dim=1)).all()


def test_only_fp32_and_bf16_cpu_heads_above_the_size_threshold_are_screened():
    assert not GreedyHead.supported(torch.zeros(10, 10))
    assert GreedyHead.supported(torch.zeros(1 << 12, 1 << 10, dtype=torch.bfloat16))
    assert GreedyHead.supported(torch.zeros(1 << 12, 1 << 10))
    assert not GreedyHead.supported(torch.zeros(1 << 12, 1 << 10, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp32 or bf16"):
        GreedyHead(torch.zeros(8, 8, dtype=torch.float16))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["gauss", "heavy", "scaled-rows", "low-rank"])
def test_bf16_head_argmax_is_the_argmax_of_the_bf16_logits(kind, kernel):
    # a bf16 model's greedy token: its bf16 logits' argmax, the first of equal ones (ties after
    # rounding to 8 significant bits are common); the screen reads the int8 copy of the bf16 values
    w = weights(kind, V=8000).bfloat16()
    h = hiddens().bfloat16()
    gh = GreedyHead(w, kernel=kernel)
    want = torch.nn.functional.linear(h, w).argmax(dim=1)
    for r in range(0, h.shape[0], 3):
        assert torch.equal(gh.argmax(h[r:r + 3]), want[r:r + 3])
    assert gh.candidates < gh.rows * w.shape[0] // 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_rounding_ties_go_to_the_lowest_id(kernel):
    w = weights("gauss", V=8000).bfloat16()
    h = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    top = int(torch.nn.functional.linear(h, w).argmax())
    w2 = w.clone()
    # rows 5 and 6: the best row with one weight moved down / up by one bf16 step, so the exact logits
    # differ (in fp32) but round to the same bf16 value as the best one's
    j = int(h.float().abs().argmax())
    x = w2[top, j].float()
    spacing = 2.0 ** (torch.floor(torch.log2(x.abs())) - 7)
    for row, step in ((5, -1), (6, 1)):
        w2[row] = w2[top]
        w2[row, j] = (x + step * spacing).bfloat16()
    assert w2[5, j] != w2[top, j] != w2[6, j]
    exact = h.float() @ w2.float().t()
    assert exact[0, 5] != exact[0, top] and exact[0, 6] != exact[0, top]
    rounded = exact.bfloat16()
    assert rounded[0, 5] == rounded[0, 6] == rounded[0, top] == rounded.max()
    want = int(torch.nn.functional.linear(h, w2).argmax())
    assert want == 5
    assert int(GreedyHead(w2, kernel).argmax(h)) == want


def test_inference_mode_models_decode_through_the_caches(monkeypatch):
    # a model built under torch.inference_mode has inference tensors, which keep no version counter:
    # the absorbed-attention weights and the head screen must still be built and reused
    monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    ref = dsv3.generate(tiny_model(0), [[1, 2, 3]], 6)
    with torch.inference_mode():
        m = tiny_model(0)
        assert m.head.weight.is_inference()
        assert dsv3.generate(m, [[1, 2, 3]], 6) == ref
        assert screen.greedy_head(m) is screen.greedy_head(m)


def test_no_screen_for_a_tensor_parallel_head():
    from dsv3.parallel.tensor import VocabParallelHead

    m = tiny_model(0)
    screen.MIN_ELEMENTS, old = 0, screen.MIN_ELEMENTS
    try:
        assert screen.greedy_head(m) is not None
        shard = m.head.weight.detach()[: m.config.vocab_size // 2].clone()
        m.head = VocabParallelHead(shard, None)
        assert screen.greedy_head(m) is None
    finally:
        screen.MIN_ELEMENTS = old


@pytest.mark.parametrize("rows", [7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_built_in_row_blocks_with_the_whole_matrix_values(monkeypatch, rows, dtype):
    """The quantization and the bound's factors, built BUILD_ROWS rows at a time, equal those of the whole
    matrix at once (V not a multiple of the block, a zero row)."""
    monkeypatch.setattr(screen, "BUILD_ROWS", rows)
    w = weights("scaled-rows", V=3001, D=200).to(dtype)
    gh = GreedyHead(w, "dynamic")
    wf = w.float()
    scale = wf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127)
    wq = q * scale[:, None]
    assert torch.equal(gh.err_l2, (wf - wq).norm(dim=1))
    assert torch.equal(gh.wq_l2, wq.norm(dim=1))
    assert torch.equal(gh.l1, torch.maximum(wq.abs().sum(dim=1), wf.abs().sum(dim=1)))
    assert gh.err_l2[17] == gh.wq_l2[17] == gh.l1[17] == 0
    if screen.cpu_kernels.vnni():
        c = GreedyHead(w, "c")
        assert torch.equal(c._w_scale, scale) and torch.equal(c._i8_qsum, q.sum(dim=1).to(torch.int32))
        assert torch.equal(c._i8, screen.cpu_kernels.i8_pack(q.to(torch.int8)))


def test_the_engine_builds_the_screen_before_the_first_request(monkeypatch):
    monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    m = tiny_model(0)
    e = Engine(m)
    gh = m.__dict__.get("_greedy_head")
    assert gh is not None and not gh.stale(m.head.weight)
    built, screened = [], []
    monkeypatch.setattr(screen.GreedyHead, "__init__", lambda self, *a: built.append(1))
    real = screen.GreedyHead.argmax
    monkeypatch.setattr(screen.GreedyHead, "argmax", lambda self, h: screened.append(1) or real(self, h))
    e.generate(rand_prompts([6], 3), greedy(4))
    assert screened and not built


def test_rebuilt_when_the_head_changes():
    m = tiny_model(0)
    screen.MIN_ELEMENTS, old = 0, screen.MIN_ELEMENTS
    try:
        gh = screen.greedy_head(m)
        assert screen.greedy_head(m) is gh
        with torch.no_grad():
            m.head.weight.mul_(2)  # in-place updates (an optimizer step) bump the version
        assert screen.greedy_head(m) is not gh
    finally:
        screen.MIN_ELEMENTS = old


@pytest.fixture
def screened(monkeypatch):
    """Screen every head (the test models have small vocabularies) and count the rows screened."""
    monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    seen = []
    real = screen.GreedyHead.argmax

    def counting(self, h):
        seen.append(h.shape[0])
        return real(self, h)

    monkeypatch.setattr(screen.GreedyHead, "argmax", counting)
    return seen


def test_greedy_decoding_through_the_screen_equals_transformers(tmp_path, screened):
    ref = make_v3(tmp_path, seed=11, rope_parameters=YARN)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    prompts = rand_prompts((7, 3, 12), seed=5, vocab=97)
    ours = dsv3.generate(model, prompts, max_new_tokens=12)
    assert screened, "dsv3.generate did not take the screen"
    screened.clear()
    engine = Engine(model, block_size=4, max_num_batched_tokens=8, eos_token_id=None)
    assert [c.token_ids for c in engine.generate(prompts, greedy(12))] == ours
    assert screened
    for p, g in zip(prompts, ours):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=12)[0, len(p):].tolist()
        assert g == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_and_speculative_decoding_same_tokens_with_and_without_screen(monkeypatch, screened, dtype):
    m = tiny_model(3).to(dtype)
    prompts = rand_prompts((5, 17, 1, 33, 8, 2), seed=1)
    with_screen = {}
    for spec in (None, "mtp"):
        eng = Engine(m, block_size=4, eos_token_id=None, speculative=spec, max_num_seqs=2)
        with_screen[spec] = [c.token_ids for c in eng.generate(prompts, greedy(20))]
        if spec:
            assert eng.stats().spec.steps > 0
    if dtype == torch.float32:  # in bf16 a 2-token verify forward rounds differently from 1-token steps
        assert with_screen[None] == with_screen["mtp"]
    n_screened = len(screened)
    assert n_screened > 0
    # rows that need the full logits (logprobs) bypass the screen, with the same tokens
    eng = Engine(m, block_size=4, eos_token_id=None, max_num_seqs=2)
    outs = eng.generate(prompts, greedy(20, logprobs=2))
    assert [c.token_ids for c in outs] == with_screen[None] and len(screened) == n_screened
    monkeypatch.setattr(engine_mod, "greedy_head", lambda model, rows=1: None)  # the full fp32 head everywhere
    for spec in (None, "mtp"):
        eng = Engine(m, block_size=4, eos_token_id=None, speculative=spec, max_num_seqs=2)
        assert [c.token_ids for c in eng.generate(prompts, greedy(20))] == with_screen[spec]
    assert len(screened) == n_screened


@pytest.mark.parametrize("kind", ["gauss", "scaled-rows"])
@pytest.mark.parametrize("V", [64 * 37, 64 * 37 + 13, 50])
def test_candidates_are_exactly_the_rows_within_the_bound(V, kind):
    # the chunked search against its definition: ids with a_i + b_i >= max_k (a_k - b_k) - slack,
    # b_i = ||e_i||_2 hn + L1_i c, row-major and ascending (the chunk maxima only skip work)
    g = torch.Generator().manual_seed(V)
    gh = GreedyHead(weights(kind, V=V, D=64))  # scaled-rows: per-row bound factors over four decades
    a = torch.randn(6, V, generator=g)
    a[1, ::7] = a[1].max()  # many exact ties with the maximum, spread over chunks
    a[2, -1] = 10.0  # the maximum in the tail (when V is not a multiple of the chunk)
    a[3, 5] = float("nan")  # a non-finite row: no candidate
    hn = torch.tensor([0.0, 0.0, 0.5, 1.0, 3.0, 1e9])
    c = torch.tensor([0.0, 0.0, 1e-3, 1e-2, 1.0, 1e9])
    rn = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.1, 0.0])
    row_of, ids = gh._candidates(a, (hn, rn, c))
    b = gh.err_l2[None] * hn[:, None] + gh.wq_l2[None] * rn[:, None] + gh.l1[None] * c[:, None]
    slack = 2.0 ** -20 * (a.amax(dim=1).abs() + 4 * (gh.err_l2_max * hn + gh.wq_l2.max() * rn + gh.l1_max * c))
    want = a + b >= ((a - b).amax(dim=1) - slack)[:, None]
    want_rows, want_ids = want.nonzero(as_tuple=True)
    assert torch.equal(row_of, want_rows) and torch.equal(ids, want_ids)
    n = torch.bincount(row_of, minlength=6)
    assert n[3] == 0 and n[5] == V and n[1] >= V // 7
    assert 0 < n[2] < V and 1 < n[4] < V and n[0] == 1  # the bound is what widens the set, ties aside


@pytest.mark.parametrize("kernel", KERNELS)
def test_seven_bit_activations_where_the_cpu_has_no_vnni(monkeypatch, kernel):
    # without VNNI the screen quantizes h to 7 bits (int16 pair sums cannot saturate); the bound must
    # hold and the argmax stay exact in that mode too, whatever CPU runs the test
    monkeypatch.setattr(screen, "_vnni", lambda: False)
    w, h = weights("heavy"), hiddens()
    gh = GreedyHead(w, kernel=kernel)
    exact = h.double() @ w.double().t()
    assert ((gh.approx(h).double() - exact).abs() <= gh.bound(h).double()).all()
    assert torch.equal(gh.argmax(h), torch.nn.functional.linear(h, w).argmax(dim=1))


@pytest.mark.skipif(__import__("dsv3.kernels.cpu", fromlist=["x"]).library() is None, reason="no CPU kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "scaled-rows", "low-rank"])
def test_c_candidate_search_equals_its_tensor_twin(kind, dtype):
    """The candidate search in C (the default) and its tensor-op twin find the same (row, id) pairs, in the
    same order, over 26 rows at once (a vocabulary with a tail beyond the last 64-wide chunk), including a
    row that is not finite (none: its token is computed in full)."""
    w = weights(kind).to(dtype)
    gh = GreedyHead(w)
    h = hiddens()
    h[3, 7] = float("nan")
    hs = h / torch.where(h.abs().amax(1, keepdim=True) > 0, h.abs().amax(1, keepdim=True), torch.ones(1))
    a, terms = gh._screen(hs)
    assert gh.search == "c"
    c_rows, c_ids = gh._candidates(a, terms)
    gh.search = "torch"
    t_rows, t_ids = gh._candidates(a, terms)
    assert torch.equal(c_rows, t_rows) and torch.equal(c_ids, t_ids)
    assert 3 not in c_rows.tolist() and c_rows.numel() > 0


@pytest.mark.skipif(__import__("dsv3.kernels.cpu", fromlist=["x"]).library() is None, reason="no CPU kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "scaled-rows", "low-rank"])
def test_c_screen_argmax_equals_its_tensor_twin(kind, dtype):
    """The whole argmax with the C search and rescoring (the default) and with their tensor-op twins: the same
    token for every row, alone and 26 rows at once, including exact duplicate rows (ties to the lowest id) and
    a row that falls back to the full product."""
    w = weights(kind).to(dtype)
    w[4000] = w[17]  # an exact tie
    gh = GreedyHead(w)
    h = hiddens()
    h[3, 7] = float("nan")
    want = {}
    for search in ("torch", "c"):
        gh.search = search
        want[search] = (gh.argmax(h), torch.cat([gh.argmax(h[r:r + 1]) for r in range(h.shape[0])]))
    assert torch.equal(want["c"][0], want["torch"][0]) and torch.equal(want["c"][1], want["torch"][1])
    assert torch.equal(want["c"][0], want["c"][1])


@pytest.mark.skipif(not screen.cpu_kernels.vnni(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("kind", ["gauss", "heavy", "scaled-rows", "low-rank"])
def test_c_quantization_and_bound_terms_hold(kind):
    """argmax's one-call preparation (kernel "c": rows scaled to max 1, quantized, the bound's terms in C): the
    approximate logits it leads to are within the bound of the float64 logits of the scaled rows, and its
    terms are those of the tensor path to fp32 rounding."""
    w = weights(kind)
    gh = GreedyHead(w, "c")
    h = hiddens()
    hs = h / torch.where(h.abs().amax(1, keepdim=True) > 0, h.abs().amax(1, keepdim=True), torch.ones(1))
    a, t, cm = gh._screen_c(h)
    b = sum(f[None].double() * x[:, None].double() for f, x in zip(gh._factors, t))
    exact = hs.double() @ w.double().t()
    assert ((a.double() - exact).abs() <= b).all()
    a2, t2 = gh._screen(hs)
    assert torch.equal(a, a2)
    for x, y in zip(t, t2):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-30)  # (a zero norm is rounded up to the least float)
    assert torch.equal(cm, chunk_maxima(a))  # the product's chunk maxima, the last chunk partial


def chunk_maxima(a: torch.Tensor) -> torch.Tensor:
    """The maxima of a's rows over screen.CHUNK-wide chunks (the last one partial), NaN where a chunk holds one."""
    R, V = a.shape
    n = -(-V // screen.CHUNK)
    p = torch.cat([a, torch.full((R, n * screen.CHUNK - V), float("-inf"))], dim=1).view(R, n, screen.CHUNK)
    return p.amax(dim=2).masked_fill(p.isnan().any(dim=2), float("nan"))


@pytest.mark.skipif(not screen.cpu_kernels.vnni(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "low-rank"])
def test_search_from_the_products_chunk_maxima_equals_the_search_over_a(kind, dtype):
    """The int8 product hands the candidate search the maxima of its tiles (taken in registers, NaN where a tile
    holds a NaN), so the search skips its pass over a: the same (row, id) pairs as the search over a and its
    tensor twin, including a row whose a holds a NaN (from a head row whose int8 scale is NaN: no candidates in
    any row then, as without the maxima) and a vocabulary that ends in a partial tile."""
    w = weights(kind, V=screen.CHUNK * 41 + 20).to(dtype)
    gh = GreedyHead(w, "c")
    h = hiddens()
    a, terms, cm = gh._screen_c(h.float())
    assert cm.shape == (h.shape[0], 42) and torch.equal(cm, chunk_maxima(a))
    got = gh._candidates(a, terms, cm)
    assert torch.equal(torch.stack(got), torch.stack(gh._candidates(a, terms)))
    gh.search = "torch"
    assert torch.equal(torch.stack(got), torch.stack(gh._candidates(a, terms)))
    assert got[0].unique().numel() == h.shape[0]  # every row has candidates (the zero row: all of them)
    gh.search = "c"
    gh._w_scale[100] = float("nan")  # column 100 of a becomes NaN in every row
    a, terms, cm = gh._screen_c(h.float())
    assert cm[:, 100 // screen.CHUNK].isnan().all() and torch.equal(cm.isnan(), chunk_maxima(a).isnan())
    assert gh._candidates(a, terms, cm)[0].numel() == 0


@pytest.mark.skipif(not screen.cpu_kernels.vnni(), reason="no AVX512-VNNI kernel here")
def test_screen_is_rebuilt_when_its_c_kernel_goes_away(monkeypatch):
    """A screen built on kernel "c" is stale once the CPU kernels are switched off (an A/B benchmark does
    that at run time): greedy_head() builds it again on another kernel instead of calling a missing library."""
    monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    model = tiny_model()
    assert screen.greedy_head(model).kernel == "c"
    monkeypatch.setattr(screen.cpu_kernels, "library", lambda: None)
    gh = screen.greedy_head(model)
    assert gh.kernel in ("onednn", "dynamic")
    h = torch.randn(2, model.config.hidden_size)
    assert torch.equal(gh.argmax(h), torch.nn.functional.linear(h, model.head.weight).argmax(-1))


@pytest.mark.skipif(not screen.cpu_kernels.vnni(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("D", [256, 250])
def test_head_i8_values_and_chunk_maxima_are_the_exact_integer_products(D):
    """head_i8's two forms (row lanes for the first 16 rows of u, vocabulary lanes for the rest) against the integer
    product in int64: the same fp32 values bitwise (the int32 sums are exact, then the two fp32 scalings), and
    the same chunk maxima, at row counts that take either form or both, a vocabulary ending in a partial block
    and chunk, K not a multiple of the packing's 8, and 1 or 2 threads."""
    cpu = screen.cpu_kernels
    g = torch.Generator().manual_seed(5)
    V, zp, xs = cpu.I8_TILE_ROWS * 3 + 13, 128, 0.0123
    q = torch.randint(-127, 128, (V, D), dtype=torch.int8, generator=g)
    packed, qsum = cpu.i8_pack(q), q.sum(1, dtype=torch.int32)
    ws = torch.rand(V, generator=g) * 0.01
    Dp = -(-D // cpu.I8_K) * cpu.I8_K
    threads = torch.get_num_threads()
    try:
        for R in (1, 5, 7, 16, 17, 33):
            u = torch.randint(0, 256, (R, D), dtype=torch.uint8, generator=g)
            up = torch.nn.functional.pad(u, (0, Dp - D), value=zp)
            s = (u.long() - zp) @ q.long().t()  # exact
            want = (s.float() * torch.tensor(xs, dtype=torch.float32)) * ws
            for n in (1, 2):
                torch.set_num_threads(n)
                got, cm = cpu.head_i8(up, packed, qsum, ws, xs, zp, V, chunk_max=True)
                assert torch.equal(got, want), (R, n)
                pad = torch.full((R, -V % cpu.I8_TILE_ROWS), float("-inf"))
                assert torch.equal(cm, torch.cat([want, pad], 1).view(R, -1, cpu.I8_TILE_ROWS).amax(2)), (R, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not screen.cpu_kernels.vnni(), reason="no AVX512-VNNI kernel here")
def test_head_bench_runs(capsys, load_benchmark):
    """benchmarks/head_bench.py (behind docs/engine.md's int8 head figures) on a small head: a row per row count,
    one row's ratio to itself 1.00x."""
    load_benchmark("head_bench").main(["--rounds", "1", "--rows", "1,17", "--vocab", "3000", "--dim", "100",
                                       "--flush-mb", "8"])
    rows = [r.strip("|").split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| 1 ")
            or r.startswith("| 17 ")]
    assert len(rows) == 2 and all(len(r) == 4 for r in rows) and rows[0][2].strip() == "1.00x"
