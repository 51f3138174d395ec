"""Block-wise FP8 (E4M3) quantization as in the DeepSeek-V3 paper, section 3.3.

Weights: 128x128 blocks, one fp32 scale per block stored as `weight_scale_inv`
with shape (ceil(out/128), ceil(in/128)); dequant = fp8 block * scale_inv.
Activations: 1x128 tiles along the last (contraction) dim, scale = amax / 448,
dequant = fp8 tile * scale.

Both scales are multipliers for dequantization (the released checkpoints call the
weight one `weight_scale_inv` because it is the inverse of the quantization scale).
`scale_fmt="ue8m0"` rounds every scale up to a power of two, as the V3.1 checkpoints
do (`"scale_fmt": "ue8m0"` in their quantization_config): the value then fits an
8-bit exponent-only format and multiplying by it is exact.
"""
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
SCALE_FMTS = (None, "ue8m0")


def _check_scale_fmt(scale_fmt):
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to the next power of two (exact, via the float exponent)."""
    # frexp: scale = m * 2**e with m in [0.5, 1). m == 0.5 means scale already is 2**(e-1);
    # any other mantissa rounds up to 2**e. Bit-exact, unlike ceil(log2(.)) on rounded logs.
    m, e = torch.frexp(scale)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(scale), e)


def _scale_from_amax(amax: torch.Tensor, scale_fmt) -> torch.Tensor:
    # fp32 throughout: the scale is the numerically sensitive part of the recipe.
    amax = amax.to(torch.float32)
    scale = amax / FP8_MAX
    # A scale that underflows to 0 would turn x / scale into inf/NaN; the smallest normal
    # fp32 still maps |x| <= amax into the fp8 range.
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    # All-zero blocks (padding, pruned rows) get scale 1: any value dequantizes to exact zeros,
    # and 1 is a power of two, so both formats agree.
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    return scale


def _to_fp8_(x: torch.Tensor) -> torch.Tensor:
    # |x / scale| <= 448 up to fp32 rounding of the division; the clamp keeps a value
    # one ulp above 448 from becoming NaN (float8_e4m3fn has no inf). Clamps x in place.
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt=None):
    """(out, in) weight -> (fp8 weight (out, in), fp32 scale_inv (ceil(out/block), ceil(in/block)))."""
    _check_scale_fmt(scale_fmt)
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight_quant expects a floating-point weight, got {w.dtype}")
    out_f, in_f = w.shape
    rb, cb = -(-out_f // block), -(-in_f // block)
    # Ragged edges: pad with zeros to whole blocks; zeros never raise a block's amax.
    # In-place ops below keep the peak near one fp32 copy of the weight (full-size layers
    # are hundreds of MB during checkpoint conversion).
    wp = torch.zeros(rb * block, cb * block, dtype=torch.float32, device=w.device)
    wp[:out_f, :in_f] = w
    wb = wp.view(rb, block, cb, block)  # (RB, block, CB, block)
    amax = torch.maximum(wb.amax(dim=(1, 3)).abs(), wb.amin(dim=(1, 3)).abs())  # (RB, CB)
    scale = _scale_from_amax(amax, scale_fmt)
    q = _to_fp8_(wb.div_(scale[:, None, :, None])).view(rb * block, cb * block)
    return q[:out_f, :in_f].contiguous(), scale


def weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) fp8 weight * per-block scale_inv -> dtype. Ragged edge blocks are handled."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rb, cb = -(-out_f // block), -(-in_f // block)
    if tuple(scale_inv.shape) != (rb, cb):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(rb, cb)} "
                         f"for a weight of shape {(out_f, in_f)} with {block}x{block} blocks")
    # Pad to whole blocks in fp8 (1 byte/element) and scale a blocked fp32 view in place:
    # the same fp32 products as broadcasting the scales to (out, in), with about half the
    # peak memory, which matters when converting 7168 x 18432 layers.
    wp = torch.zeros(rb * block, cb * block, dtype=weight.dtype, device=weight.device)
    wp[:out_f, :in_f] = weight
    w32 = wp.to(torch.float32)
    w32.view(rb, block, cb, block).mul_(scale_inv.to(torch.float32)[:, None, :, None])
    return w32[:out_f, :in_f].to(dtype).contiguous()


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt=None):
    """(..., K) activations -> (fp8 (..., K), fp32 scales (..., ceil(K/block))) in 1 x block tiles."""
    _check_scale_fmt(scale_fmt)
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"act_quant expects a floating-point tensor with a last dim, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    k = x.shape[-1]
    kb = -(-k // block)
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, kb * block - k))
    xt = xp.view(*x.shape[:-1], kb, block)  # (..., KB, block)
    scale = _scale_from_amax(xt.abs().amax(dim=-1), scale_fmt)  # (..., KB)
    q = _to_fp8_(xt / scale[..., None]).view(*x.shape[:-1], kb * block)
    return q[..., :k].contiguous(), scale


def act_dequant(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of act_quant: (..., K) fp8 * per-tile scale -> dtype."""
    k = q.shape[-1]
    kb = -(-k // block)
    if tuple(scale.shape) != (*q.shape[:-1], kb):
        raise ValueError(f"activation scales have shape {tuple(scale.shape)}, expected "
                         f"{(*q.shape[:-1], kb)} for fp8 values of shape {tuple(q.shape)}")
    s = scale.to(torch.float32).repeat_interleave(block, dim=-1)[..., :k]
    return (q.to(torch.float32) * s).to(dtype)
