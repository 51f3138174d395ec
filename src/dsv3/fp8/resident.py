"""FP8-resident inference: the released FP8 weights stay FP8 in memory (about half of BF16).

Applied from outside the model (DESIGN.md): a dsv3 Transformer is built, then the modules that the
release stores in FP8 are swapped for FP8 twins, and the weights are filled from the checkpoint:

- every nn.Linear of MLA (wq / wq_a, wq_b, wkv_a, wkv_b, wo), of dense MLPs and of shared experts
  becomes a `dsv3.fp8.linear.FP8Linear` (float8_e4m3fn `weight` + fp32 `weight_scale_inv`);
- the stacked routed experts become `FP8Experts`: w1/w3 (E, I, D) and w2 (E, D, I) in fp8 with
  per-expert block scales `w*_scale_inv` (E, ceil(out/128), ceil(in/128));
- MLA's absorbed decode path reads `wkv_b.weight` as a matrix, so the attention becomes `FP8MLA`,
  which dequantizes wkv_b for that path on every call, as DeepSeek's reference inference does
  (`weight_dequant(wkv_b.weight, wkv_b.scale)` in its MLA forward) instead of keeping a BF16 copy.

Everything else (embedding, head, norms, router gate and its fp32 bias, the MTP eh_proj) keeps the
model dtype: the same split as the release (docs/fp8.md) and as `dsv3 convert bf16-to-fp8`.

A released FP8 checkpoint is loaded as is (bytes unchanged); a BF16/FP32 checkpoint is quantized
tensor by tensor while loading, so memory never holds the high-precision model.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.checkpoint import _get, _weight_files, check_complete, check_shape, hf_to_dsv3
from dsv3.config import ModelConfig
from dsv3.fp8.linear import BACKENDS, FP8Linear, fp8_gemm, fp8_gemm_reference
from dsv3.fp8.quant import BLOCK, FP8_DTYPE, _check_scale_fmt, weight_dequant, weight_quant
from dsv3.model.mla import MLA, version_key
from dsv3.model.moe import MLP, Experts, MoE, combine, dispatch
from dsv3.model.transformer import Transformer

SCALE_SUFFIX = "_scale_inv"
_MLA_LINEARS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
_MLP_LINEARS = ("w1", "w2", "w3")


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


class FP8Experts(nn.Module):
    """Routed experts with FP8 weights: the FP8 twin of dsv3.model.moe.Experts (same
    forward_grouped / forward_loop interface). Buffers w1/w3 (E, I, D) and w2 (E, D, I) are
    float8_e4m3fn; `w1_scale_inv` etc. hold one fp32 scale per 128x128 block of each expert.
    `reference=True`: every expert GEMM dequantizes its weight and multiplies in fp32 (the slow
    twin); otherwise activations are quantized in 1x128 tiles and multiplied by `fp8_gemm`."""

    def __init__(self, n: int, dim: int, inter: int, block: int = BLOCK, scale_fmt=None,
                 reference: bool = False, backend: str = "auto", device=None):
        super().__init__()
        _check_scale_fmt(scale_fmt)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.n_experts, self.dim, self.inter = n, dim, inter
        self.block, self.scale_fmt, self.reference, self.backend = block, scale_fmt, reference, backend
        for name, (out_f, in_f) in self._shapes().items():
            self.register_buffer(name, torch.zeros(n, out_f, in_f, dtype=FP8_DTYPE, device=device))
            self.register_buffer(name + SCALE_SUFFIX, torch.ones(
                n, _blocks(out_f, block), _blocks(in_f, block), dtype=torch.float32, device=device))

    def _shapes(self) -> dict:
        return {"w1": (self.inter, self.dim), "w2": (self.dim, self.inter), "w3": (self.inter, self.dim)}

    @classmethod
    def from_experts(cls, experts: Experts, scale_fmt=None, block: int = BLOCK, **kw) -> "FP8Experts":
        n, inter, dim = experts.w1.shape
        m = cls(n, dim, inter, block=block, scale_fmt=scale_fmt, device=experts.w1.device, **kw)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                w = getattr(experts, name).detach()
                for e in range(n):  # one expert at a time: peak memory is one fp32 expert matrix
                    q, s = weight_quant(w[e], block, scale_fmt)
                    getattr(m, name)[e].copy_(q)
                    getattr(m, name + SCALE_SUFFIX)[e].copy_(s)
        return m

    def _mm(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w, s = getattr(self, name)[e], getattr(self, name + SCALE_SUFFIX)[e]
        if self.reference:
            return fp8_gemm_reference(x, w, s, self.block)
        return fp8_gemm(x, w, s, self.block, self.scale_fmt, self.backend)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._mm(F.silu(self._mm(x, "w1", e)) * self._mm(x, "w3", e), "w2", e)

    def forward_grouped(self, x, weights, idx):
        """Pairs sorted by expert (as Experts.forward_grouped), then one FP8 GEMM chain per
        expert with tokens on its contiguous slice: the layout a grouped FP8 kernel would take.
        Activation tiles are per row, so slicing rows never changes a tile's scale."""
        order, token, counts = dispatch(idx, self.n_experts)
        counts = counts.tolist()
        xs = x[token]  # (T*K, D), grouped by expert
        y = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                y[start:start + c] = self._expert(xs[start:start + c], e)
            start += c
        return combine(x, y, weights, order, token)

    def forward_loop(self, x, weights, idx):
        """Twin: one expert at a time over the tokens that chose it (the reference implementation's loop)."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self._expert(x[tok], e) * weights[tok, slot, None].to(x.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, inter={self.inter}, block={self.block}, "
                f"scale_fmt={self.scale_fmt}")


class FP8MLA(MLA):
    """MLA whose absorbed path works with an FP8 wkv_b: the absorbed path's per-head halves are the
    dequantized weight (DeepSeek's reference dequantizes wkv_b on every absorbed forward). Without autograd
    they are kept, as MLA keeps its own, and made again when the FP8 weight or its scales change: a decode
    step would otherwise dequantize every layer's wkv_b again (on a CPU, 16.7M values per layer at
    DeepSeek-V3's shapes; in fp32 the kept halves are ~67 MB per layer there). The naive path simply calls
    wkv_b (an FP8Linear)."""

    def _absorb_weights(self, dtype=None):
        if not isinstance(self.wkv_b, FP8Linear):
            return super()._absorb_weights(dtype)
        H = self.n_heads
        # the dtype the products of the absorbed path run in: the one asked for, else the model's
        # (norms stay unquantized)
        dtype = dtype or self.kv_norm.weight.dtype
        wq, ws = self.wkv_b.weight, self.wkv_b.weight_scale_inv
        key = (version_key(wq), version_key(ws), self.wkv_b.block, dtype)
        if getattr(self, "_fp8_absorb_key", None) != key:
            w = weight_dequant(wq, ws, self.wkv_b.block, dtype=dtype)
            w = w.view(H, self.nope + self.v_dim, self.kv_lora_rank)  # (H, nope + v, C)
            w_vt = w[:, self.nope:].transpose(1, 2).contiguous()  # (H, C, v), as MLA keeps it
            self._fp8_absorb_cache = (w[:, :self.nope].contiguous(), w_vt.transpose(1, 2))
            self._fp8_absorb_key = key
        return self._fp8_absorb_cache


def _fp8_blocks(model: Transformer):
    """Every decoder Block, main layers then the MTP modules' blocks (the release quantizes both)."""
    return list(model.layers) + [m.block for m in model.mtp]


def _quantized_targets(block_module):
    """(parent module, child name, module) for each module of one Block that the release keeps in FP8."""
    attn = block_module.attn
    for name in _MLA_LINEARS:
        if hasattr(attn, name):
            yield attn, name, getattr(attn, name)
    ffn = block_module.ffn
    mlps = [ffn] if isinstance(ffn, MLP) else [ffn.shared_experts] if ffn.shared_experts is not None else []
    for mlp in mlps:
        for name in _MLP_LINEARS:
            yield mlp, name, getattr(mlp, name)
    if isinstance(ffn, MoE):
        yield ffn, "experts", ffn.experts


def quantize_model_(model: Transformer, scale_fmt=None, block: int = BLOCK, reference: bool = False,
                    backend: str = "auto") -> Transformer:
    """In place: quantize the release's FP8 set of `model` (nn.Linear -> FP8Linear, Experts ->
    FP8Experts, MLA -> FP8MLA). On the meta device this only swaps modules (for loading).
    Modules that are already FP8 are left as they are."""
    _check_scale_fmt(scale_fmt)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for b in _fp8_blocks(model):
        if type(b.attn) is MLA:
            # Same state, one overridden method: the module keeps its submodules and buffers.
            b.attn.__class__ = FP8MLA
        for parent, name, mod in list(_quantized_targets(b)):
            if not isinstance(mod, (nn.Linear, Experts)):  # already FP8 (a second call)
                continue
            meta = next(mod.parameters()).device.type == "meta"
            if isinstance(mod, nn.Linear):
                if meta:  # empty FP8 slots, filled by the loader
                    new = FP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, block=block,
                                    scale_fmt=scale_fmt, reference=reference, backend=backend, device="meta")
                else:
                    new = FP8Linear.from_linear(mod, scale_fmt=scale_fmt, block=block, reference=reference,
                                                backend=backend)
            elif meta:
                n, inter, dim = mod.w1.shape
                new = FP8Experts(n, dim, inter, block, scale_fmt, reference, backend, device="meta")
            else:
                new = FP8Experts.from_experts(mod, scale_fmt, block, reference=reference, backend=backend)
            setattr(parent, name, new)
    return model


def set_reference(model: nn.Module, reference: bool = True) -> nn.Module:
    """Switch every FP8 module between the fast path and the dequantize+matmul twin."""
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8Experts)):
            m.reference = reference
    return model


def fp8_modules(model: nn.Module) -> dict:
    """name -> FP8Linear / FP8Experts module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers, each storage counted once (tied embedding/head share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _checkpoint_quant(cfg: ModelConfig, path: str, block, scale_fmt):
    """Block size and scale format: explicit arguments win, else the checkpoint's quantization_config."""
    q = cfg.fp8 or {}
    if block is None:
        wbs = q.get("weight_block_size", [BLOCK, BLOCK])
        if not (isinstance(wbs, (list, tuple)) and len(wbs) == 2 and wbs[0] == wbs[1] and int(wbs[0]) > 0):
            raise ValueError(f"{path}: quantization_config.weight_block_size {wbs!r} is not supported "
                             f"(square blocks only, e.g. [128, 128])")
        block = int(wbs[0])
    if scale_fmt is None and q.get("scale_fmt") is not None:
        scale_fmt = q["scale_fmt"]
        if scale_fmt not in ("ue8m0",):
            raise ValueError(f"{path}: quantization_config.scale_fmt {scale_fmt!r} is not supported")
    return block, scale_fmt


def load_fp8_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", scale_fmt=None,
                   block: int | None = None, reference: bool = False, backend: str = "auto") -> Transformer:
    """Loads an HF folder into a dsv3 Transformer whose released-FP8 set stays in FP8.

    FP8 tensors of the checkpoint are kept byte for byte with their `weight_scale_inv`; high-precision
    tensors of that set are quantized on load (128x128 blocks; `scale_fmt="ue8m0"` for power-of-two
    scales). Everything else is loaded in `dtype` (the router bias in fp32). `block` / `scale_fmt`
    default to the checkpoint's quantization_config; the scale format also applies to the
    activation tiles quantized at run time, as in V3.1."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint folder")
    cfg = ModelConfig.from_hf(path)
    block, scale_fmt = _checkpoint_quant(cfg, path, block, scale_fmt)
    with torch.device("meta"):
        model = Transformer(cfg)
    quantize_model_(model, scale_fmt=scale_fmt, block=block, reference=reference, backend=backend)
    sd = _load_state_dict(path, cfg, model, dtype, block, scale_fmt)
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    model.rotary.reset()
    return model.to(device).eval()


def _load_state_dict(path, cfg, model, dtype, block, scale_fmt) -> dict:
    # The structure of dsv3.checkpoint.load_state_dict (same names, same checks), except that
    # the FP8 slots of `model` receive fp8 tensors + scales instead of dequantized weights.
    expected = model.state_dict()
    fp8_slots = {k for k in expected if k + SCALE_SUFFIX in expected}
    files = _weight_files(path)
    handles: dict = {}
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set] = {}
    unexpected = []
    for name, file in sorted(files.items()):
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in files:
                unexpected.append((name, file))
            continue
        target = hf_to_dsv3(name, cfg)
        if target is None:
            unexpected.append((name, file))
            continue
        ds, e = target
        t = _get(handles, file, name)
        scale = None
        if t.dtype == FP8_DTYPE:
            sname = name + SCALE_SUFFIX
            if sname not in files:
                raise ValueError(f"FP8 tensor {name!r} in {file} has no {sname!r} in the checkpoint")
            scale = _get(handles, files[sname], sname)
            want = (_blocks(t.shape[0], block), _blocks(t.shape[1], block)) if t.dim() == 2 else None
            if t.dim() != 2 or tuple(scale.shape) != want:
                raise ValueError(f"{sname} in {files[sname]} has shape {tuple(scale.shape)}, expected {want} for "
                                 f"{name} of shape {tuple(t.shape)} with {block}x{block} blocks")
        if not check_shape(name, file, t.shape, ds, e, expected):
            continue
        ref = expected[ds]
        if ds in fp8_slots:
            if scale is None:  # a high-precision checkpoint: quantize on load
                t, scale = weight_quant(t, block, scale_fmt)
            values = {ds: t, ds + SCALE_SUFFIX: scale.to(torch.float32)}
        else:
            if scale is not None:  # FP8 in the checkpoint where we compute in high precision
                t = weight_dequant(t, scale, block, dtype=torch.float32)
            # the router bias stays fp32 (selection is sensitive to small bias differences)
            values = {ds: t.to(torch.float32 if ds.endswith("gate.bias") else dtype)}
        if e is not None:
            if not 0 <= e < ref.shape[0]:
                unexpected.append((name, file))
                continue
            for k, v in values.items():
                if k not in out:
                    out[k] = torch.empty(expected[k].shape, dtype=v.dtype)
                out[k][e].copy_(v)
            filled.setdefault(ds, set()).add(e)
        else:
            out.update(values)
    check_complete(path, expected, out, filled, unexpected)
    return out
