"""The DeepSeek-V3 pre-training step on one device (paper §2.1.2, §2.2, §3.3, §4.2).

One optimizer step = one global batch of windows of `seq_len + 1 + D` tokens (D = MTP depth),
split into micro-batches whose gradients are accumulated:

  loss = CE(main) + lambda * (1/D) sum_k CE(MTP depth k) + balance loss      (paper eq. 24-25)

- main CE and every MTP CE are means over tokens, computed on fp32 logits;
- balance: `aux-free` = the bias update of §2.1.2 after the step (loads counted over ALL
  micro-batches of the step, i.e. the global batch) plus the sequence-wise loss (eq. 17-20,
  alpha 1e-4); `aux-loss` = the classic expert-level loss (the §4.5 baseline, bias stays 0);
  `none`;
- AdamW (0.9, 0.95, wd 0.1), the paper's LR schedule and batch-size ramp scaled to `steps`,
  gradient clipping 1.0, MTP weight 0.3 -> 0.1, bias speed gamma 0.001 -> 0 (dsv3.train.optim).

Precision. `fp32`: the model is the master. `bf16`: the model runs with bf16 parameters and an
fp32 master copy holds the weights the optimizer updates (its gradients are accumulated in fp32
across micro-batches); after each step the master is rounded into the bf16 model. We do not use
autocast: autocast would recast the model's deliberately-fp32 pieces (the router's
`F.linear(x.float(), w.float())`, DESIGN.md: "router scores ... in fp32") to bf16, while bf16
parameters keep every explicit `.float()` of the model code meaningful. The router bias
(`e_score_correction_bias`) is an fp32 buffer shared by both copies and never in the optimizer.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.config import ModelConfig
from dsv3.model.linear import Linear
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts, MoE
from dsv3.model.transformer import Transformer
from dsv3.train.balance import (
    LoadTracker,
    bias_update,
    count_loads,
    expert_aux_loss,
    max_violation,
    sequence_balance_loss,
)
from dsv3.train.data import BatchSampler, TokenDataset
from dsv3.train.optim import (
    PAPER,
    LRSchedule,
    batch_size_at,
    build_lr_scheduler,
    build_optimizer,
    gamma_at,
    mtp_weight_at,
)

BALANCE_MODES = ("aux-free", "aux-loss", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAPER_HIDDEN = 7168  # DeepSeek-V3's hidden size, where the paper's init std 0.006 applies


def default_init_std(hidden_size: int) -> float:
    """The paper initialises every matrix with std 0.006 at hidden size 7168 (§4.2). A fixed std
    would make narrow models' layers shrink their inputs (a d-wide row of N(0, s^2) scales a unit
    vector by s * sqrt(d)), so we keep the paper's per-layer gain s * sqrt(d) = 0.006 * sqrt(7168)
    ~ 0.51: s = 0.006 * sqrt(7168 / d). It gives 0.006 for V3 itself and ~0.045 at d = 128 (about
    GPT-2's gain too: 0.02 * sqrt(768) ~ 0.55)."""
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    return 0.006 * math.sqrt(PAPER_HIDDEN / hidden_size)


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    batch_size: int = 16  # sequences per optimizer step once the ramp is over
    batch_size_start: int | None = None  # ramp start (paper: 3072 -> 15360); None = no ramp
    batch_ramp_until: float = PAPER["batch_ramp_until"]
    micro_batch_size: int | None = None  # None = the whole batch at once
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int | None = None  # None = 1% of the steps (at least 1, at most the paper's 2000)
    constant_until: float = PAPER["constant_until"]
    decay_until: float = PAPER["decay_until"]
    tail_switch_at: float = PAPER["tail_switch_at"]
    min_lr_fraction: float = PAPER["min_lr_fraction"]
    last_lr_fraction: float = PAPER["last_lr_fraction"]
    weight_decay: float = PAPER["weight_decay"]
    betas: tuple[float, float] = PAPER["betas"]
    grad_clip: float = PAPER["grad_clip"]
    mtp_lambda: tuple[float, float] = (PAPER["mtp_early"], PAPER["mtp_late"])
    mtp_switch_at: float = PAPER["mtp_switch_at"]
    balance: str = "aux-free"
    gamma: float = PAPER["gamma"]
    gamma_stop_at: float = PAPER["gamma_stop_at"]
    seq_alpha: float = PAPER["alpha"]
    # The expert-level loss of the aux-loss baseline. The paper does not restate its alpha for the
    # §4.5 baseline; 1e-3 is our choice, the lower end of the usual 1e-3..1e-2 range (higher values
    # balance harder and cost more quality, the trade-off the paper's ablation is about).
    aux_alpha: float = 1e-3
    init_std: float | None = None  # None = default_init_std(hidden_size)
    dtype: str = "fp32"
    device: str = "cpu"
    # torch.compile every block (routed experts included) for the training steps; `dsv3 train` turns it
    # on by default for long runs (compile_by_default)
    compile: bool = False

    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(2000, max(1, round(0.01 * self.steps)))

    def validate(self, model_cfg: ModelConfig | None = None) -> None:
        def bad(name, msg):
            raise ValueError(f"invalid training option {name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size:
            bad("micro_batch_size", "must be a positive integer")
        if self.batch_size_start is not None and not 1 <= self.batch_size_start <= self.batch_size:
            bad("batch_size_start", f"the ramp must start between 1 and batch_size={self.batch_size}")
        if not self.lr > 0:
            bad("lr", "must be positive")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not self.grad_clip > 0:
            bad("grad_clip", "must be positive")
        if self.balance not in BALANCE_MODES:
            bad("balance", f"choose one of {', '.join(BALANCE_MODES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {', '.join(DTYPES)}")
        for name in ("gamma", "seq_alpha", "aux_alpha", "weight_decay"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("batch_ramp_until", "mtp_switch_at", "gamma_stop_at"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a fraction in [0, 1]")
        if self.init_std is not None and not self.init_std > 0:
            bad("init_std", "must be positive")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            bad("device", "CUDA is not available on this machine")
        if dev.type not in ("cpu", "cuda"):
            bad("device", "choose cpu or cuda")
        # The LR schedule checks its own fractions and that the warmup ends before the decay.
        LRSchedule(self.steps, self.resolved_warmup(), self.constant_until, self.decay_until,
                   self.tail_switch_at, self.min_lr_fraction, self.last_lr_fraction)
        if model_cfg is not None:
            if self.seq_len > model_cfg.max_position_embeddings:
                bad("seq_len", f"longer than the model's max_position_embeddings={model_cfg.max_position_embeddings}")
            has_moe = any(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_hidden_layers))
            if self.balance == "aux-free" and has_moe and model_cfg.topk_method != "noaux_tc":
                bad("balance", f"aux-free balancing needs the V3 gate with a correction bias (topk_method "
                               f"'noaux_tc'); this model routes with {model_cfg.topk_method!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["mtp_lambda"] = list(self.betas), list(self.mtp_lambda)
        return d


def moe_layers(model: Transformer) -> list[tuple[str, MoE]]:
    """Every MoE of the model, main layers first, then the MTP modules' blocks, with the names the
    metrics use ("layers.3", "mtp.0")."""
    out = [(f"layers.{i}", layer.ffn) for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    out += [(f"mtp.{k}", m.block.ffn) for k, m in enumerate(model.mtp) if isinstance(m.block.ffn, MoE)]
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_t CE(softmax(h_t W^T), y_t) and its gradients, a block of rows at a time.

    The plain path materialises the (N, V) fp32 logits, their log-softmax, a zero-filled (N, V)
    gradient of the NLL and the (N, V) gradient of the log-softmax: four passes over N * V floats
    that do not fit in cache. Here each block of rows gets its logits, loss and logit gradient
    (softmax - onehot) / N in one cache-resident buffer, which goes straight into the two GEMMs of
    the head's backward (dh = dz W, dW += dz^T h). The forward thus does the backward's GEMMs too
    (same FLOPs in total); backward() only scales the stored gradients by the incoming one.
    Same arithmetic as F.cross_entropy on fp32 logits (log-sum-exp after subtracting the row max);
    the logits are rounded to the head's dtype before going to fp32, as model.logits(h).float() does."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, need_h, need_w):
        N = h.shape[0]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, rows):
            hc, tc = h[i:i + rows], targets[i:i + rows, None]
            z = F.linear(hc, weight).float()  # (rows, V) fp32 logits
            zt = z.gather(1, tc)
            m = z.amax(dim=1, keepdim=True)
            z.sub_(m).exp_()
            se = z.sum(dim=1, keepdim=True)
            total += (se.log() + m - zt).sum()
            if need_h or need_w:
                z.mul_(se.reciprocal_().mul_(1.0 / N))  # softmax / N
                z.scatter_add_(1, tc, torch.full_like(zt, -1.0 / N))  # - onehot / N
                if need_h:
                    torch.mm(z.to(h.dtype), weight, out=grad_h[i:i + rows])
                if need_w:  # accumulated over the blocks in fp32 (a bf16 head gets it rounded once)
                    grad_w.addmm_(z.t(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total / N

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * g if grad_h is not None else None
        dw = (grad_w * g).to(ctx.w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


# Logits per block of the fused loss: 2^18 fp32 values = 1 MiB, held in a core's L2 cache between
# the softmax and the two GEMMs (at least 64 rows, so large vocabularies still get usable GEMMs).
CE_BLOCK_LOGITS = 1 << 18


def _head_is_plain(model: Transformer) -> bool:
    """The fused loss reads model.head.weight directly: only for a plain, unsharded nn.Linear head
    (FSDP2 and the tensor-parallel head gather or split it inside their own forward)."""
    head = model.head
    if (type(head) not in (torch.nn.Linear, Linear) or head.bias is not None or head._forward_hooks
            or head._forward_pre_hooks):
        return False
    from torch.distributed.tensor import DTensor

    return not isinstance(head.weight, DTensor)


def lm_loss(model: Transformer, h: torch.Tensor, targets: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Mean next-token CE of the head on hidden states h (B, S, D) against targets (B, S), in fp32
    (DESIGN.md). With autograd on and a plain head, the chunked fused loss above (no (N, V) tensor
    is ever stored); otherwise F.cross_entropy on the full logits, which it equals within fp32 rounding."""
    V = model.config.vocab_size
    if fused and torch.is_grad_enabled() and _head_is_plain(model):
        w = model.head.weight
        need_h, need_w = h.requires_grad, w.requires_grad
        if need_h or need_w:
            rows = max(64, CE_BLOCK_LOGITS // V)
            return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1), rows, need_h, need_w)
    return F.cross_entropy(model.logits(h).float().reshape(-1, V), targets.reshape(-1))


@dataclass
class Losses:
    loss: torch.Tensor  # what is differentiated
    ce: torch.Tensor  # main next-token CE (mean over tokens)
    mtp: torch.Tensor  # mean over depths of the MTP CEs (0 without MTP)
    balance: torch.Tensor  # summed over MoE layers
    loads: torch.Tensor | None  # (n_moe, E) int64 tokens routed to each expert in this micro-batch


def compute_losses(
    model: Transformer,
    windows: torch.Tensor,
    seq_len: int,
    mtp_lambda: float = 0.0,
    balance: str = "none",
    seq_alpha: float = PAPER["alpha"],
    aux_alpha: float = 1e-3,
    layers: list[tuple[str, MoE]] | None = None,
    fused_loss: bool = True,
) -> Losses:
    """windows (B, seq_len + 1 + D) int64: inputs are the first seq_len tokens, the main targets are
    shifted by one and the depth-k MTP targets by k + 1 (paper §2.2: module k sees Emb(t_{i+k}) and
    predicts t_{i+k+1}). `layers` are the MoEs with `record_routing` on (see moe_layers).
    `fused_loss`: the chunked head + CE of lm_loss (False: plain F.cross_entropy on full logits)."""
    B, W = windows.shape
    S = seq_len
    D = W - S - 1
    assert D >= 0, (W, S)
    inputs = windows[:, :S]
    h = model.hidden(inputs)
    # The loss in fp32 (DESIGN.md); the mean is over all B * S tokens.
    ce = lm_loss(model, h, windows[:, 1:S + 1], fused_loss)
    mtp = torch.zeros((), device=windows.device)
    if D > 0:
        hs = model.mtp_hidden(h, windows[:, :S + D], depths=D)
        per_depth = [lm_loss(model, hk, windows[:, k + 1:k + 1 + S], fused_loss) for k, hk in enumerate(hs, 1)]
        mtp = torch.stack(per_depth).mean()  # L_MTP = lambda / D * sum_k L_MTP^k (eq. 25)
    bal = torch.zeros((), device=windows.device)
    loads = None
    if layers:
        counts = []
        for _, moe in layers:
            assert moe.last_routing is not None, "record_routing must be on for every MoE layer"
            s, idx = moe.last_routing
            moe.last_routing = None  # drop the graph reference as soon as it is used
            E, K = moe.n_experts, moe.topk
            counts.append(count_loads(idx, E))
            if balance == "aux-free" and seq_alpha > 0:
                # Eq. 18 counts Top-K_r of the raw affinities s (no bias), per sequence.
                s3 = s.view(B, -1, E)
                bal = bal + sequence_balance_loss(s3, s3.detach().topk(K, dim=-1).indices, E, K, seq_alpha)
            elif balance == "aux-loss" and aux_alpha > 0:
                # Expert-level loss over the micro-batch's tokens on what the router dispatched.
                bal = bal + expert_aux_loss(s, idx, E, K, aux_alpha)
        loads = torch.stack(counts)
    loss = ce + mtp_lambda * mtp + bal
    return Losses(loss, ce.detach(), mtp.detach(), bal.detach(), loads)


def _item(t: torch.Tensor) -> float:
    return float(t.detach())


def compile_model(model: Transformer, backend: str = "inductor") -> None:
    """torch.compile, from outside (DESIGN.md: compilation is applied to the model, not written into
    it), every transformer block whole: attention, norms, router, shared experts and the routed
    experts, whose grouped GEMMs trace through the dsv3::grouped_mm custom op (dsv3.model.moe) and
    whose dispatch keeps fixed shapes (sort + per-expert counts); so one graph per block, forward and
    backward, with the elementwise work between the GEMMs fused (and, on CPU, the attention as
    blocked math attention: dsv3.model.mla.blocked_causal_attention). The MTP modules' blocks are
    compiled as blocks, so they reuse the main MoE blocks' compiled graphs (same code, same shapes:
    one compilation fewer, ~10 s of a ~60 s cold compile), and their norms reuse the final norm's;
    their concat and eh_proj GEMM stay eager. Routed experts of another kind (FP8 training's) read
    their group sizes on the host: around them only the dense parts are compiled. Shapes are static
    (dynamic shapes compiled twice as long and ran slower here): the trainer runs micro-batches of
    any other size eagerly (Trainer._compiled_shape), so one compilation serves the whole run.
    Training steps only: evaluation and generation run eagerly
    (`torch.compiler.set_stance("force_eager")`). `backend`: torch.compile's (the tests use
    "aot_eager": the same graphs and autograd, without generating C++)."""
    kw = dict(dynamic=False, backend=backend)
    on_cpu = next(model.parameters()).device.type == "cpu"
    for m in model.modules():
        if isinstance(m, MLA):
            m.blocked_attention = on_cpu  # faster than the fused CPU kernel once inductor fuses it

    def whole(b) -> bool:
        return not isinstance(b.ffn, MoE) or type(b.ffn.experts) is Experts

    for b in model.layers:
        _compile_block(b, whole(b), kw)
    for m in model.mtp:
        _compile_block(m.block, whole(m.block), kw)
        for sub in (m.enorm, m.hnorm, m.norm):
            sub.compile(**kw)
    model.norm.compile(**kw)


def _compile_block(b, whole: bool, kw: dict) -> None:
    if whole:
        b.compile(**kw)
        return
    mods = [b.attn, b.attn_norm, b.ffn_norm]
    mods.append(b.ffn.shared_experts if isinstance(b.ffn, MoE) else b.ffn)
    for m in mods:
        if m is not None:
            m.compile(**kw)


# `dsv3 train` compiles by default (compile_by_default) when the run is at least this much work, in
# training tokens x parameters used per token (MTP included): ~90 s of eager steps on this machine's 2
# cores. Compiling costs ~50 s with a cold inductor cache and ~5 s with a warm one, and then saves
# ~17% of every step of the demo model. The demo run (2.0e12) compiles: ~40 s longer than eagerly on
# a cold cache (the first run on a machine), ~15 s shorter on a warm one (docs/training.md), with a
# step that is 1.6x transformers' instead of 1.3x. The `tiny` preset's run is 1.1e11, the tests' runs
# far less.
COMPILE_MIN_WORK = 1e12


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH: torch inductor builds its CPU kernels with it."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def compile_by_default(model_cfg: ModelConfig, cfg: TrainConfig, distributed: bool = False,
                       fp8: bool = False) -> tuple[bool, str]:
    """Whether `dsv3 train` compiles when neither --compile nor --no-compile is given, and why."""
    if distributed:
        return False, "not with --dp/--ep/--pp"
    if fp8:
        return False, "not with --fp8 (its routed experts run eagerly anyway)"
    if torch.device(cfg.device).type != "cpu":
        return False, "only on CPU by default (pass --compile on CUDA)"
    if not has_cxx_compiler():
        return False, "no C++ compiler for torch inductor"
    n = model_cfg.num_params()
    work = cfg.steps * cfg.batch_size * cfg.seq_len * (n["active"] + n["mtp"])
    if work < COMPILE_MIN_WORK:
        return False, f"a short run ({work:.1e} token-parameters < {COMPILE_MIN_WORK:.0e}): compiling would not pay"
    return True, f"a long run ({work:.1e} token-parameters >= {COMPILE_MIN_WORK:.0e})"


class Trainer:
    """Model, optimizer, schedules, sampler and balance state of one run; `train_step()` does one
    optimizer step, `evaluate()` scores a validation set, `state_dict()` is everything a resume needs
    besides the weights (which the checkpoint holds as an HF folder)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        train_data: TokenDataset,
        model: Transformer | None = None,
        parallel=None,
        prepare=None,
    ):
        """`parallel`: a dsv3.parallel.dist.ParallelContext (from init_parallel) to train data/expert
        parallel over torchrun's processes; `prepare(model)`: called on the fp32 model right after it
        is built, before any copy, sharding or optimizer (e.g. dsv3.fp8.training.apply_fp8_training)."""
        cfg.validate(model_cfg)
        self.parallel = parallel if parallel is not None and parallel.distributed else None
        if self.parallel is not None:
            # The bf16 master copy and the compiled blocks would each need their own sharding;
            # keep the parallel path to the one tested configuration.
            if cfg.dtype != "fp32":
                raise ValueError(f"--dtype {cfg.dtype} with --dp/--ep is not supported yet: use --dtype fp32")
            if cfg.compile:
                raise ValueError("--compile with --dp/--ep is not supported yet")
            if prepare is not None:
                raise ValueError("--fp8 with --dp/--ep is not supported yet (the FP8 experts and the "
                                 "expert-parallel experts both replace the MoE's experts)")
        self.cfg, self.model_cfg = cfg, model_cfg
        self.device = torch.device(cfg.device)
        self.depth = model_cfg.num_nextn_predict_layers
        torch.manual_seed(cfg.seed)
        if model is None:
            with torch.device(self.device):
                master = Transformer(model_cfg)
            master.init_weights(cfg.init_std or default_init_std(model_cfg.hidden_size))
        else:
            assert model.config == model_cfg
            master = model.to(self.device)
            for p in master.parameters():
                p.data = p.data.float()
        if prepare is not None:
            prepare(master)
        if self.parallel is not None:
            # every rank built the same model from the same seed; EP keeps this rank's experts,
            # then FSDP2 / replicated DP over the rest (dsv3.parallel.dist)
            self.parallel.parallelize(master)
            master = self.parallel.model
        master.train()
        self.master = master
        if cfg.dtype == "bf16":
            self.model = copy.deepcopy(master)
            for p in self.model.parameters():
                p.data = p.data.to(torch.bfloat16)
                p.requires_grad_(True)
            for (_, a), (_, b) in zip(moe_layers(self.model), moe_layers(master)):
                if b.gate.bias is not None:
                    a.gate.bias = b.gate.bias  # one fp32 buffer for both copies
            self._pairs = list(zip(self.model.parameters(), master.parameters()))
        else:
            self.model = master
            self._pairs = []
        self.layers = moe_layers(self.model)
        for _, moe in self.layers:
            moe.record_routing = True
        # the compiled graphs serve micro-batches of this many rows; others (the batch-size ramp, a last
        # partial micro-batch) run eagerly rather than compile again for every size
        self._compiled_shape = (cfg.micro_batch_size or cfg.batch_size) if cfg.compile else None
        if cfg.compile:
            compile_model(self.model)
        self.optimizer = build_optimizer(master, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
        self.scheduler = build_lr_scheduler(
            self.optimizer, cfg.steps, cfg.resolved_warmup(), constant_until=cfg.constant_until,
            decay_until=cfg.decay_until, tail_switch_at=cfg.tail_switch_at,
            min_lr_fraction=cfg.min_lr_fraction, last_lr_fraction=cfg.last_lr_fraction,
        )
        self.sampler = BatchSampler(train_data, cfg.seq_len, extra=self.depth, seed=cfg.seed)
        self.tracker = LoadTracker(len(self.layers), model_cfg.n_routed_experts) if self.layers else None
        self.step = 0
        self.tokens = 0

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    # ---- schedules at the current step ----
    def batch_size(self, step: int | None = None) -> int:
        cfg = self.cfg
        step = self.step if step is None else step
        if cfg.batch_size_start is None or cfg.batch_size_start == cfg.batch_size:
            return cfg.batch_size
        return batch_size_at(step, cfg.steps, cfg.batch_size_start, cfg.batch_size, cfg.batch_ramp_until)

    def mtp_lambda(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.depth == 0:
            return 0.0
        early, late = self.cfg.mtp_lambda
        return mtp_weight_at(step, self.cfg.steps, early, late, self.cfg.mtp_switch_at)

    def gamma(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.cfg.balance != "aux-free":
            return 0.0
        return gamma_at(step, self.cfg.steps, self.cfg.gamma, self.cfg.gamma_stop_at)

    # ---- one optimizer step ----
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        bs = self.batch_size()
        lam, gamma = self.mtp_lambda(), self.gamma()
        lr = self.scheduler.get_last_lr()[0]
        windows = self.sampler.next_windows(bs).to(self.device)
        if self.parallel is not None:
            # every rank draws the same global batch (same sampler seed) and keeps its slice
            windows = self.parallel.local_batch(windows)
        local_bs = windows.shape[0]
        mb = cfg.micro_batch_size or local_bs
        self.model.train()
        sums = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
        loads = None
        for micro in windows.split(mb):
            # Every loss term is a mean over its micro-batch: weighting by its share of the rows
            # makes the accumulated gradient that of the mean over the whole step's batch.
            w = micro.shape[0] / local_bs
            eager = self._compiled_shape is not None and micro.shape[0] != self._compiled_shape
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                out = compute_losses(self.model, micro, cfg.seq_len, lam, cfg.balance, cfg.seq_alpha,
                                     cfg.aux_alpha, self.layers)
            (out.loss * w).backward()
            if self._pairs:
                self._accumulate_master_grads()
            for k, v in (("loss", out.loss), ("ce", out.ce), ("mtp", out.mtp), ("balance", out.balance)):
                sums[k] += _item(v) * w
            if out.loads is not None:
                loads = out.loads if loads is None else loads + out.loads
        if self.parallel is not None:
            # each rank's loss is the mean over its slice: the reduced gradients are those of the
            # global mean, and the norm is the global gradient's
            self.parallel.reduce_gradients()
            grad_norm = self.parallel.clip_grad_norm_(cfg.grad_clip)
            sums = {k: float(self.parallel.mean(v)) for k, v in sums.items()}
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.master.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._pairs:
            with torch.no_grad():
                for p, q in self._pairs:
                    p.copy_(q)  # round the fp32 master into the bf16 model
        if loads is not None and self.parallel is not None:
            # the bias update and the statistics count the global batch (issue 7: loads all-reduced
            # over the data- and expert-parallel ranks)
            loads = self.parallel.global_loads(loads)
        return self._finish_step(t0, bs, lr, lam, gamma, sums, grad_norm, loads,
                                 [(i, moe) for i, (_, moe) in enumerate(self.layers)], self.layer_names)

    def _finish_step(self, t0, bs, lr, lam, gamma, sums, grad_norm, loads, biased, names) -> dict:
        """After the optimizer step: the step's metrics record, the aux-free bias update and the load
        statistics. loads (n_moe, E): the whole step's global loads (or None); biased: (row of loads,
        MoE) for the MoE layers whose bias this rank updates; names: the rows' layer names. Shared
        with the pipeline trainer, whose ranks hold only some of the layers."""
        cfg = self.cfg
        record = {
            "kind": "train",
            "step": self.step + 1,
            "loss": sums["loss"],
            "ce": sums["ce"],
            "mtp_loss": sums["mtp"],
            "balance_loss": sums["balance"],
            "lr": lr,
            "mtp_lambda": lam,
            "gamma": gamma,
            "batch_size": bs,
            "grad_norm": float(grad_norm),
        }
        if loads is not None:
            # Aux-free balancing (§2.1.2): after the step, b_i += gamma * sign(mean - load_i) with
            # the loads of the whole step (every micro-batch), the global batch of the paper.
            if gamma > 0:
                for row, moe in biased:
                    bias_update(moe.gate.bias, loads[row], gamma)
            self.tracker.update(loads)
            record["maxvio_batch"] = dict(zip(names, self.tracker.batch_max_violation().tolist()))
            record["maxvio_cum"] = dict(zip(names, self.tracker.cumulative_max_violation().tolist()))
        self.step += 1
        self.tokens += bs * cfg.seq_len
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        record["tokens"] = self.tokens
        record["tokens_per_s"] = bs * cfg.seq_len / dt
        return record

    def _accumulate_master_grads(self):
        # bf16 mode: move this micro-batch's bf16 gradients into fp32 master gradients, so the
        # accumulation over micro-batches happens in fp32.
        for p, q in self._pairs:
            if p.grad is None:
                continue
            if q.grad is None:
                q.grad = p.grad.float()
            else:
                q.grad.add_(p.grad)  # bf16 -> fp32 is exact: the same sum without an fp32 temporary
            p.grad = None

    # ---- validation ----
    def evaluate(self, data: TokenDataset, max_batches: int | None = None) -> dict:
        """Mean main CE over the validation windows (nats/token), bits per byte, the MTP CE, and
        MaxVio over the whole set (global) and per batch (mean over batches), per MoE layer."""
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            return self._evaluate(data, max_batches)

    def _evaluate(self, data: TokenDataset, max_batches: int | None) -> dict:
        cfg = self.cfg
        self.model.eval()
        nats = torch.zeros((), dtype=torch.float64)
        mtp_nats = torch.zeros((), dtype=torch.float64)
        n_tok, n_bytes = 0, 0
        total = None
        batch_vio = []
        mb = cfg.micro_batch_size or cfg.batch_size
        V = self.model_cfg.vocab_size
        for inputs, targets in data.sequential_batches(mb, cfg.seq_len, self.depth, max_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            S = cfg.seq_len
            h = self.model.hidden(inputs)
            main = targets[:, :S]
            nats += F.cross_entropy(self.model.logits(h).float().reshape(-1, V), main.reshape(-1),
                                    reduction="sum").double().cpu()
            if self.depth:
                windows = torch.cat([inputs[:, :1], targets], dim=1)  # (B, S + 1 + D)
                for k, hk in enumerate(self.model.mtp_hidden(h, windows[:, :S + self.depth]), 1):
                    mtp_nats += F.cross_entropy(self.model.logits(hk).float().reshape(-1, V),
                                                windows[:, k + 1:k + 1 + S].reshape(-1),
                                                reduction="sum").double().cpu() / self.depth
            n_tok += main.numel()
            if data.token_nbytes is not None:
                n_bytes += data.num_bytes(main.cpu())
            if self.layers:
                loads = torch.stack([count_loads(m.last_routing[1], m.n_experts).cpu() for _, m in self.layers])
                for _, m in self.layers:
                    m.last_routing = None
                total = loads if total is None else total + loads
                batch_vio.append(max_violation(loads))
        assert n_tok > 0
        val_loss = float(nats) / n_tok
        out = {"kind": "eval", "step": self.step, "val_loss": val_loss, "val_tokens": n_tok}
        if self.depth:
            out["val_mtp_loss"] = float(mtp_nats) / n_tok
        if n_bytes:
            out["val_bpb"] = float(nats) / math.log(2) / n_bytes
        if total is not None:
            out["val_maxvio_global"] = dict(zip(self.layer_names, max_violation(total).tolist()))
            out["val_maxvio_batch"] = dict(zip(self.layer_names, torch.stack(batch_vio).mean(0).tolist()))
            out["val_loads"] = {n: row.tolist() for n, row in zip(self.layer_names, total)}
        if self.tracker is not None and self.tracker.steps:
            out["train_loads"] = {n: row.tolist() for n, row in zip(self.layer_names, self.tracker.total)}
        self.model.train()
        return out

    # ---- state for checkpoints (the weights are saved separately, as an HF folder) ----
    def full_master(self) -> Transformer:
        """The master weights as a single-device Transformer (for saving and sampling). Under
        parallel training this is collective: every rank must call it."""
        if self.parallel is None:
            return self.master
        from dsv3.parallel.data import full_state_dict

        weights = full_state_dict(self.master, self.parallel.group("ep"))
        full = Transformer(self.model_cfg)  # on CPU: non-persistent buffers (rotary) are built, not loaded
        missing, unexpected = full.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        return full.eval()

    def loads_record(self) -> dict | None:
        """Cumulative per-layer, per-expert loads of the training steps so far (global batch), in
        the form `dsv3 eplb --loads` reads."""
        if self.tracker is None:
            return None
        return {"step": self.step, "steps": self.tracker.steps, "layers": self.layer_names,
                "loads": self.tracker.total.tolist()}

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "tokens": self.tokens,
            # under dp/ep the optimizer state is sharded over the ranks: not saved (no parallel resume)
            "optimizer": self.optimizer.state_dict() if self.parallel is None else None,
            "parallel": dict(self.parallel.sizes) if self.parallel is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "rng": rng,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_cfg.to_hf(),
        }

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        """`weights`: the master model's state dict (with the gate biases) as read from the checkpoint."""
        if ModelConfig.from_hf(state["model_config"]) != self.model_cfg:
            raise ValueError("the checkpoint's model config differs from this run's")
        if state.get("optimizer") is None:
            raise ValueError(f"this checkpoint was written by a parallel run ({state.get('parallel')}) without "
                             f"optimizer state: it cannot be resumed (its weights load with dsv3.load_model)")
        with torch.no_grad():
            missing, unexpected = self.master.load_state_dict(weights, strict=False)
            missing = [k for k in missing if not k.endswith("inv_freq")]
            if missing or unexpected:
                raise ValueError(f"checkpoint weights do not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            for p, q in self._pairs:
                p.copy_(q)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
