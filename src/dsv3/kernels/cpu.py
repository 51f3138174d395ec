"""Build and load the C kernels of this folder (AVX-512 CPUs), with the system C compiler.

The shared library is compiled on first use into a cache folder ($DSV3_CACHE_DIR, else
$XDG_CACHE_HOME/dsv3, else ~/.cache/dsv3), named by a hash of the source, the compiler and its flags,
and loaded with ctypes. Where it cannot be had (not x86-64 with AVX-512, no compiler, a failed build,
or DSV3_CPU_KERNELS=0 in the environment) `library()` returns None and callers keep their PyTorch path;
the reason is logged once and given by `unavailable_reason()`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref

import torch

log = logging.getLogger("dsv3.kernels")

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, f) for f in ("moe_cpu.c", "attn_cpu.c", "gemm_cpu.c", "screen_cpu.c", "fp8_cpu.c")]
_HEADERS = [os.path.join(_HERE, "common.h")]
# -ffp-contract=off: products and sums written as separate C operations round separately, as PyTorch's
# separate ops do (the kernels' fused multiply-adds are explicit intrinsics)
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fPIC", "-shared", "-fopenmp", "-fno-strict-aliasing",
          "-ffp-contract=off"]
_reason: str | None = None


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (read once; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> str:
    d = os.environ.get("DSV3_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "dsv3")
    return d


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> str:
    """Compile the source into the cache (atomically: concurrent builders each write a temporary file
    and rename it) and return the library's path."""
    src = b""
    for name in _SOURCES + _HEADERS:
        with open(name, "rb") as f:
            src += f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f"dsv3_cpu-{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:  # a read-only home: a per-user folder of the temporary directory
        folder = os.path.join(tempfile.gettempdir(), f"dsv3-kernels-{os.getuid()}")
        path = os.path.join(folder, f"dsv3_cpu-{key}.so")
        if os.path.exists(path):
            return path
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", tmp, *_SOURCES, "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see unavailable_reason())."""
    global _reason
    if os.environ.get("DSV3_CPU_KERNELS", "1") == "0":
        _reason = "disabled by DSV3_CPU_KERNELS=0"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"not an x86-64 CPU ({platform.machine()})"
    elif not {"avx512f", "avx512bw", "avx512vl", "fma"} <= cpu_flags():
        _reason = "the CPU lacks AVX-512 (F, BW and VL)"
    elif (cc := _compiler()) is None:
        _reason = "no C compiler (cc, gcc or clang) on PATH"
    else:
        try:
            lib = ctypes.CDLL(_build(cc))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _reason = f"build failed: {e}"
        else:
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.dsv3_moe.argtypes = [p] * 7 + [i64] * 5 + [i32, i32]
            lib.dsv3_moe.restype = i32
            lib.dsv3_linear.argtypes = [p] * 3 + [i64] * 3 + [i32, i32]
            lib.dsv3_linear.restype = i32
            lib.dsv3_pack_bf16.argtypes = [p, i64, i64, p]
            lib.dsv3_pack_bf16.restype = None
            lib.dsv3_bf16_packed.argtypes = [i32]
            lib.dsv3_bf16_packed.restype = i32
            lib.dsv3_far_fetch.argtypes = [i32]
            lib.dsv3_far_fetch.restype = i32
            lib.dsv3_rmsnorm.argtypes = [p, i64, p, p, i64, i64, f32, i32, i32]
            lib.dsv3_rmsnorm.restype = i32
            lib.dsv3_rotary.argtypes = [p, i64, i64, p, p, p, i64, i64, i64, i32, i32]
            lib.dsv3_rotary.restype = i32
            lib.dsv3_mla_attend.argtypes = [p] * 5 + [i64] * 4 + [p] * 5 + [i64] * 8 + [f32, i32, i32, i32]
            lib.dsv3_mla_attend.restype = i32
            lib.dsv3_mla_block.argtypes = ([p, p, i64, i64, i64, p, f32, p, p, p, f32, p, i64, p, p, f32] + [p] * 7
                                           + [i64, i64, p, p, i64, p] + [i64] * 5 + [f32, i32, i32, i32])
            lib.dsv3_mla_block.restype = i32
            lib.dsv3_ffn_block.argtypes = ([p, p, i64, i64, p, f32, p, p] + [i64] * 4 + [i32] * 3 + [f32] + [p] * 3
                                           + [i64] + [p] * 3 + [i64, i32, i32])
            lib.dsv3_ffn_block.restype = i32
            lib.dsv3_gemm.argtypes = [p, i64, p, p] + [i64] * 4 + [i32, i32]
            lib.dsv3_gemm.restype = i32
            lib.dsv3_moe_gemm.argtypes = [p] * 7 + [i64] * 5 + [i32, i32]
            lib.dsv3_moe_gemm.restype = i32
            lib.dsv3_prefill_attend.argtypes = ([p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, p, p]
                                                + [i64] * 7 + [f32, i32, i32])
            lib.dsv3_prefill_attend.restype = i32
            lib.dsv3_i8_pack.argtypes = [p, i64, i64, p]
            lib.dsv3_i8_pack.restype = None
            lib.dsv3_head_i8.argtypes = [p, i64, p, p, p, f32, i32, i64, i64, p, p, i32]
            lib.dsv3_head_i8.restype = i32
            lib.dsv3_screen_prepare.argtypes = [p, i64, i64, i64, i32, f32, p, p]
            lib.dsv3_screen_prepare.restype = f32
            lib.dsv3_screen_rescore.argtypes = [p, i64, i64, p, i32, p, p, i64, p, p]
            lib.dsv3_screen_rescore.restype = i32
            lib.dsv3_screen_candidates.argtypes = [p] * 6 + [i64] * 3 + [f32, f32, p, p, i64]
            lib.dsv3_screen_candidates.restype = i64
            lib.dsv3_bf16_dot.argtypes = [i32]
            lib.dsv3_bf16_dot.restype = i32
            lib.dsv3_fp8_linear.argtypes = [p] * 5 + [i64] * 4 + [i32]
            lib.dsv3_fp8_linear.restype = i32
            lib.dsv3_fp8_act_quant.argtypes = [p, i64, i64, i64, i32, i32, p, p]
            lib.dsv3_fp8_act_quant.restype = i32
            return lib
    log.info("dsv3 CPU kernels unavailable: %s; the PyTorch paths are used", _reason)
    return None


def bf16_dot(on: bool | None = None) -> bool:
    """Whether bf16 products run as AVX512-BF16 dot products (vdpbf16ps; the default where the CPU has them)
    rather than widening every value to fp32 first; `on` sets it (for A/B comparisons and the tests).
    Returns the setting before the call. Both sum exact products in fp32; the order of the sums differs."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.dsv3_bf16_dot(-1 if on is None else int(on)))


def far_fetch(on: bool | None = None) -> bool:
    """Whether the expert and few-row linear kernels also fetch, into L2, the weight rows 32 KB ahead in each
    thread's order of reads (across the routed experts); `on` sets it (for A/B comparisons and the tests: it
    changes no value). Returns the setting before the call."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.dsv3_far_fetch(-1 if on is None else int(on)))


def unavailable_reason() -> str | None:
    library()
    return _reason


# the dtypes the kernels take (weights, rows and outputs of one call share one); bf16 products and sums
# are fp32, each output rounded to bf16 once
DTYPES = (torch.float32, torch.bfloat16)
# Up to how many rows each kernel beats PyTorch's GEMMs on this project's CPUs (docs/engine.md): the
# experts of this many tokens, the projections of this many rows
MOE_MAX_TOKENS = 64
LINEAR_MAX_ROWS = 16


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels take x with these weights: inference (no autograd through them, not traced by
    torch.compile), on the CPU, one dtype of DTYPES, contiguous weights, and the library loads. The one
    place the model's layers (dsv3.model.linear.Linear, MoE) ask."""
    return (not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and x.device.type == "cpu" and x.dtype in DTYPES
            and all(w.device.type == "cpu" and w.dtype == x.dtype and w.is_contiguous() for w in weights)
            and library() is not None)


def widen_bf16_products(t: torch.Tensor) -> bool:
    """Whether small bf16 products on t's device run faster widened to fp32 (exactly) in inference:
    PyTorch's CPU bf16 bmm takes 100-300 us on absorbed attention's decode shapes, where fp32 takes a few."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not torch.is_grad_enabled()


def moe(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor,
        gw: torch.Tensor) -> torch.Tensor:
    """Routed experts of a few tokens: x (T, D), w1/w3 (E, I, D), w2 (E, D, I) contiguous, expert ids idx
    (T, K) and gate weights gw (T, K) -> sum_k gw[t, k] * w2_e (silu(w1_e x_t) * (w3_e x_t)), e = idx[t, k],
    in x's dtype. The caller checks usable()."""
    return _experts("dsv3_moe", x, w1, w3, w2, idx, gw)


def _experts(name: str, x, w1, w3, w2, idx, gw) -> torch.Tensor:
    """One call of the experts kernel `name` (dsv3_moe or dsv3_moe_gemm: the same arguments)."""
    T, D = x.shape
    E, I, _ = w1.shape
    K = idx.shape[1]
    x = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    gw = gw.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=x.dtype)
    rc = getattr(library(), name)(x.data_ptr(), w1.data_ptr(), w3.data_ptr(), w2.data_ptr(), idx.data_ptr(),
                                  gw.data_ptr(), out.data_ptr(), T, D, I, K, E, torch.get_num_threads(),
                                  int(x.dtype == torch.bfloat16))
    if rc == -1:
        raise IndexError(f"expert id out of range [0, {E}) in {idx.tolist()}")
    _check(rc, name)
    return out


# the bf16 weights' copies in dsv3_linear's layout: id(weight) -> (weak reference, _values_key, copy)
_PACKED: dict = {}


def _values_key(w: torch.Tensor) -> tuple:
    """What marks a CPU weight's values as changed for the copies made from it: its storage and, where tracked,
    its version counter (dsv3.model.mla.version_key without dtype and device; here, inline, as it runs for every
    projection of every decode step)."""
    return w.data_ptr(), None if w.is_inference() else w._version


def packed_bf16(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight (N, K) in the layout the few-row linear kernel takes for bf16 (dsv3_pack_bf16: blocks of 16
    rows, k in pairs), made once and kept while w lives and its values stay the same (a new storage or, where
    tracked, an in-place change makes it again). It costs a second copy of each bf16 projection weight that
    decode steps multiply (the fused blocks' and Linear's), in exchange for products that run at the FMA's
    rate at 16 rows (see dsv3_linear)."""
    key = _values_key(w)
    got = _PACKED.get(id(w))
    if got is not None and got[1] == key and got[0]() is w:
        return got[2]
    N, K = w.shape
    out = torch.empty((N + 15) // 16 * ((K + 1) // 2) * 32, dtype=torch.bfloat16)
    library().dsv3_pack_bf16(w.contiguous().data_ptr(), N, K, out.data_ptr())
    if got is None or got[0]() is not w:  # (a new weight: its entry goes when it does)
        weakref.finalize(w, _PACKED.pop, id(w), None)
    _PACKED[id(w)] = (weakref.ref(w), key, out)
    return out


_bf16_packed = True


def bf16_packed(on: bool | None = None) -> bool:
    """Whether bf16 few-row products (dsv3_linear, and the fused blocks' projections) run on the weights' packed
    copies (packed_bf16: each value summed in order over k in a lane of its own, the default) or on the weights
    as they are (16-lane dot products reduced per value, as fp32 and the experts run); `on` sets it (for A/B
    comparisons and the tests). Returns the setting before the call. The two give different roundings."""
    global _bf16_packed
    prev = _bf16_packed
    if on is not None and library() is not None:
        _bf16_packed = bool(on)
        library().dsv3_bf16_packed(int(_bf16_packed))
    return prev


def _weight_operand(w: torch.Tensor) -> torch.Tensor:
    """What dsv3_linear (and the fused blocks' products) take for w: bf16 packed (packed_bf16) unless
    bf16_packed(False), fp32 as it is."""
    return packed_bf16(w) if w.dtype == torch.bfloat16 and _bf16_packed else w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T for a few rows, in x's dtype (the caller checks usable(x, w)). Each output
    is one sum evaluated the same way whatever M is (batch-invariant): fp32, a dot product of 16 partial sums;
    bf16, a sum over k in order, one fused multiply-add a term, on the weight's packed copy (packed_bf16)."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    _check(library().dsv3_linear(x.data_ptr(), _weight_operand(w).data_ptr(), out.data_ptr(), M, K, N, torch.get_num_threads(),
                                 int(x.dtype == torch.bfloat16)), "dsv3_linear")
    return out


# the most rows fp8_linear takes: each weight row is multiplied by every row of x in turn, so x has to stay in the
# caches; at 2048 x 7168 it is 2.2x fp8_gemm's emulation at 64 rows and 0.36x at 256 (a GEMM over the decoded
# weight, the emulation, is the better form there)
FP8_MAX_ROWS = 64


def fp8_act_quant(x: torch.Tensor, block: int, scale_fmt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dsv3.fp8.quant.act_quant of x (M, K) fp32 or bf16 in one kernel call: (the e4m3 values as fp32 (M, K), the
    tiles' fp32 scales (M, ceil(K / block))), the same values. The caller checks library() and block % 16 == 0."""
    x = x.contiguous()
    M, K = x.shape
    xq = torch.empty(M, K, dtype=torch.float32)
    xs = torch.empty(M, -(-K // block), dtype=torch.float32)
    _check(library().dsv3_fp8_act_quant(x.data_ptr(), M, K, block, int(scale_fmt == "ue8m0"),
                                        int(x.dtype == torch.bfloat16), xq.data_ptr(), xs.data_ptr()), "dsv3_fp8_act_quant")
    return xq, xs


def fp8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, block: int, quantize: bool = False,
               scale_fmt=None) -> torch.Tensor | None:
    """x (M, K) @ W^T -> (M, N) fp32, W given as its float8_e4m3fn values w (N, K) and fp32 block scales ws
    (ceil(N / block), ceil(K / block)), read as bytes (dsv3/kernels/fp8_cpu.c). quantize=False: the product with
    the dequantized weight (fp8_gemm_reference's); True: x quantized in 1 x block tiles first (act_quant, with
    scale_fmt), DeepSeek's FP8 GEMM (fp8_gemm's). Each value is one sum in an order that does not depend on M. None
    where the kernel does not take these tensors (not inference on the CPU, x neither fp32 nor bf16, more than
    FP8_MAX_ROWS rows, block not a multiple of 16, shapes that do not match)."""
    if (library() is None or torch.compiler.is_compiling() or x.dim() != 2 or x.device.type != "cpu"
            or x.dtype not in DTYPES or w.device.type != "cpu" or w.dtype != torch.float8_e4m3fn or w.dim() != 2
            or block % 16 or block <= 0 or ws.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    M, K = x.shape
    N = w.shape[0]
    if not 0 < M <= FP8_MAX_ROWS or w.shape[1] != K or tuple(ws.shape) != (-(-N // block), -(-K // block)):
        return None
    if quantize:
        x, xs = fp8_act_quant(x, block, scale_fmt)
    else:
        x, xs = x.to(torch.float32).contiguous(), None
    w, ws = w.contiguous(), ws.to(torch.float32).contiguous()
    out = torch.empty(M, N, dtype=torch.float32)
    _check(library().dsv3_fp8_linear(x.data_ptr(), None if xs is None else xs.data_ptr(), w.data_ptr(), ws.data_ptr(),
                                     out.data_ptr(), M, K, N, block, torch.get_num_threads()), "dsv3_fp8_linear")
    return out


_prefill = True


def prefill_paths(on: bool | None = None) -> bool:
    """Whether many-row inference (prefill) takes this module's kernels: the GEMM of bf16 projections and SwiGLUs,
    the routed experts of many tokens (moe_gemm), prefill attention (prefill_attend), RMSNorm and rotary
    embedding of any row count; `on` sets it (for A/B comparisons: benchmarks/kernels_bench.py --ab prefill).
    Returns the setting before the call."""
    global _prefill
    prev = _prefill
    if on is not None:
        _prefill = bool(on)
    return prev


def gemm_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the many-row kernels (gemm, moe_gemm, prefill_attend) take x with these weights: usable() with
    prefill_paths() on."""
    return _prefill and usable(x, *weights)


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T for many rows, in x's dtype (the caller checks gemm_usable(x, w)); x may have a
    row stride. Each output is its fp32 sum over k in ascending order (bf16: rounded once), whatever M is. The
    model takes it for bf16 only: PyTorch's CPU bf16 GEMM runs at about half its fp32 rate here, while its
    fp32 GEMM runs as fast as this one."""
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    _check(library().dsv3_gemm(x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), N, M, K, N,
                               torch.get_num_threads(), int(x.dtype == torch.bfloat16)), "dsv3_gemm")
    return out


def moe_gemm(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor,
             gw: torch.Tensor) -> torch.Tensor:
    """moe()'s values for many tokens, the products as GEMMs over each expert's tokens (the caller checks
    gemm_usable(x, w1, w3, w2))."""
    return _experts("dsv3_moe_gemm", x, w1, w3, w2, idx, gw)


def prefill_attend(q_nope: torch.Tensor, q_pe: torch.Tensor, kvb: torch.Tensor, pe: torch.Tensor,
                   mask: torch.Tensor | None, scale: float, v_dim: int) -> torch.Tensor | None:
    """MLA attention over decompressed keys and values: q = [q_nope (B, S, H, nope), q_pe (B, S, H, R)], k =
    [kvb[..., :nope], pe (B, L, R) shared by the heads], v = kvb[..., nope:], kvb (B, L, H, nope + v_dim);
    mask (B, S, L) bool, or None for plain causal attention (L == S). Returns (B, S, H, v_dim) in q's dtype:
    the values of F.scaled_dot_product_attention on those tensors up to fp32 rounding, zeros for a query that
    may see no key; or None where the tensors do not fit (the caller's path runs). The caller checks
    gemm_usable(q_nope)."""
    B, S, H, nope = q_nope.shape
    R, L = q_pe.shape[-1], kvb.shape[1]
    ts = (q_nope, q_pe, kvb, pe)
    if (any(t.dtype != q_nope.dtype or t.stride(-1) != 1 for t in ts) or kvb.shape != (B, L, H, nope + v_dim)
            or q_pe.shape[:3] != (B, S, H) or pe.shape != (B, L, R) or nope + R > 1024 or v_dim > 1024):
        return None
    if mask is None and L != S:
        return None
    mask = _bool_mask(mask, B, S, L)
    if mask is False:
        return None
    out = torch.empty(B, S, H, v_dim, dtype=q_nope.dtype)
    _check(library().dsv3_prefill_attend(
        q_nope.data_ptr(), *q_nope.stride()[:3], q_pe.data_ptr(), *q_pe.stride()[:3], kvb.data_ptr(),
        *kvb.stride()[:3], pe.data_ptr(), *pe.stride()[:2], None if mask is None else mask.data_ptr(),
        out.data_ptr(), B, S, L, H, nope, R, v_dim, scale, torch.get_num_threads(),
        int(q_nope.dtype == torch.bfloat16)), "dsv3_prefill_attend")
    return out


def vnni() -> bool:
    """Whether head_i8 runs here: the library loads and the CPU has AVX512-VNNI."""
    return library() is not None and "avx512_vnni" in cpu_flags()


def i8_pack(q: torch.Tensor) -> torch.Tensor:
    """An int8 matrix (V, D) in head_i8's layout: blocks of 8 rows, [k / 8][8][8] bytes, zero padded."""
    V, D = q.shape
    out = torch.empty(-(-V // 8) * 8 * i8_dim(D), dtype=torch.int8)
    library().dsv3_i8_pack(q.contiguous().data_ptr(), V, D, out.data_ptr())
    return out


# The int8 product's chunk of vocabulary rows (screen_cpu.c: VB * CB): the width of the chunks whose maxima
# head_i8 hands to screen_candidates; and the multiple of k its rows of u are padded to (screen_cpu.c: KB)
I8_TILE_ROWS = 48
I8_K = 8


def i8_dim(D: int) -> int:
    """The row length of head_i8's operands for a hidden size D: D rounded up to I8_K."""
    return -(-D // I8_K) * I8_K


def head_i8(u: torch.Tensor, packed: torch.Tensor, qsum: torch.Tensor, scale: torch.Tensor, xs: float, zp: int,
            V: int, chunk_max: bool = False):
    """(xs * (q u_r - zp * qsum)) * scale for the rows u (R, Dp) uint8 (padded with zp to Dp, a multiple of 8) over
    the int8 q (V, D) packed by i8_pack; qsum (V,) int32 = q.sum(1), scale (V,) fp32 -> (R, V) fp32. Every
    product and sum is exact (int32); the two fp32 scalings round. With chunk_max, also the maxima of each row
    over each I8_TILE_ROWS-wide chunk (R, ceil(V / I8_TILE_ROWS)), NaN where a chunk holds a NaN, taken while
    the values are in registers: (out, maxima). The caller checks vnni()."""
    R, Dp = u.shape
    out = torch.empty(R, V, dtype=torch.float32)
    cm = torch.empty(R, -(-V // I8_TILE_ROWS), dtype=torch.float32) if chunk_max else None
    _check(library().dsv3_head_i8(u.data_ptr(), R, packed.data_ptr(), qsum.data_ptr(), scale.data_ptr(), xs, zp, V,
                                  Dp, out.data_ptr(), None if cm is None else cm.data_ptr(), torch.get_num_threads()),
           "dsv3_head_i8")
    return (out, cm) if chunk_max else out


def screen_candidates(a: torch.Tensor, terms: torch.Tensor, factors: torch.Tensor, chunk_factors: torch.Tensor,
                      factor_max: torch.Tensor, chunk: int, band: float, eps: float,
                      chunk_max: torch.Tensor | None = None):
    """GreedyHead._candidates (dsv3/infer/screen.py) in one call: a (R, V) fp32 approximate logits, terms (3, R),
    factors (3, V), chunk_factors (3, V // chunk), factor_max (3,), all fp32 -> (row_of, ids) int64, row-major
    with ascending ids; None where the library is missing or the candidates overflow the room given (the
    caller's twin runs). chunk_max: head_i8's chunk maxima of a (chunk must then be I8_TILE_ROWS), which spare
    the search its pass over a."""
    lib = library()
    if lib is None or a.dtype != torch.float32 or a.dim() != 2 or not a.is_contiguous():
        return None
    R, V = a.shape
    if chunk_max is not None and (chunk != I8_TILE_ROWS or chunk_max.shape != (R, -(-V // chunk))
                                  or chunk_max.dtype != torch.float32 or not chunk_max.is_contiguous()):
        raise ValueError(f"chunk maxima of shape {tuple(chunk_max.shape)} do not fit a {tuple(a.shape)} search "
                         f"in chunks of {chunk}")
    for cap in (R * 256, R * 4096):  # a few dozen candidates a row is the rule; room for more on a second try
        row_of, ids = torch.empty(cap, dtype=torch.int64), torch.empty(cap, dtype=torch.int64)
        n = lib.dsv3_screen_candidates(a.data_ptr(), terms.data_ptr(), factors.data_ptr(), chunk_factors.data_ptr(),
                                       factor_max.data_ptr(), None if chunk_max is None else chunk_max.data_ptr(),
                                       R, V, chunk, band, eps, row_of.data_ptr(),
                                       ids.data_ptr(), cap)
        if n >= 0:
            return row_of[:n], ids[:n]
    return None


def screen_prepare(h: torch.Tensor, zp: int, rounding: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GreedyHead.argmax's quantization for head_i8 in one call: h (R, D) fp32 -> u (R, Dp) uint8 (each row
    scaled to max |h| = 1, one scale xs for the finite rows, zero point zp, Dp = i8_dim(D)), the bound's
    terms (3, R) fp32 (NaN for a row that is not finite) and xs. The caller checks vnni()."""
    h = h.contiguous()
    R, D = h.shape
    Dp = i8_dim(D)
    u = torch.empty(R, Dp, dtype=torch.uint8)
    terms = torch.empty(3, R, dtype=torch.float32)
    xs = library().dsv3_screen_prepare(h.data_ptr(), R, D, Dp, zp, rounding, u.data_ptr(), terms.data_ptr())
    if xs != xs:
        raise MemoryError("dsv3_screen_prepare: out of memory")
    return u, terms, xs


def screen_rescore(h: torch.Tensor, weight: torch.Tensor, row_of: torch.Tensor, ids: torch.Tensor,
                   l1: torch.Tensor) -> torch.Tensor | None:
    """GreedyHead.argmax's rescoring (dsv3/infer/screen.py) in one call: h (R, D) fp32, the head weight (V, D)
    fp32 or bf16, the candidates (row_of, ids) int64 and the rows' L1 norms l1 (V,) fp32 -> (R,) int64 tokens,
    -1 for a row without candidates; None where the library or these tensors do not fit."""
    lib = library()
    if (lib is None or weight.dtype not in DTYPES or not weight.is_contiguous() or h.dtype != torch.float32
            or l1.dtype != torch.float32):
        return None
    h, row_of, ids, l1 = h.contiguous(), row_of.contiguous(), ids.contiguous(), l1.contiguous()
    R, D = h.shape
    out = torch.empty(R, dtype=torch.int64)
    _check(lib.dsv3_screen_rescore(h.data_ptr(), R, D, weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                                   row_of.data_ptr(), ids.data_ptr(), ids.numel(), l1.data_ptr(), out.data_ptr()),
           "dsv3_screen_rescore")
    return out


# Up to how many rows the per-layer pieces of a decode step (norms, rotations, attention) take the kernels:
# beyond, PyTorch's ops are vectorised over the rows and their dispatch cost is spread over enough work
STEP_MAX_ROWS = 64


def _rows(x: torch.Tensor) -> tuple[int, int] | None:
    """x seen as rows of its last dimension: (rows, elements between consecutive rows), or None when the
    last dimension is strided or the rows are not evenly spaced (then the caller's PyTorch path runs)."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    D = x.shape[-1]
    stride = expect = None
    for size, st in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if expect is not None and st != expect:
            return None
        if stride is None:
            stride = st
        expect = st * size
    return (x.numel() // D if D else 0), (D if stride is None else stride)


def _row_count(x: torch.Tensor, *weights: torch.Tensor) -> int:
    """x's number of evenly spaced rows where usable(x, *weights), else 0."""
    if not usable(x, *weights):
        return 0
    r = _rows(x)
    return r[0] if r is not None else 0


def rows_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """usable() for a kernel over x's rows (rmsnorm, rotary): evenly spaced rows, at least one, and beyond
    STEP_MAX_ROWS only with prefill_paths() on."""
    n = _row_count(x, *weights)
    return 0 < n and (n <= STEP_MAX_ROWS or _prefill)


def step_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """usable() for the per-layer pieces: also few enough rows, evenly spaced."""
    return 0 < _row_count(x, *weights) <= STEP_MAX_ROWS


def _check(rc: int, name: str):
    """The kernels' return codes: 0 ok, -1 an expert id out of range, -2 out of memory, -3 unsupported sizes."""
    if rc == -1:
        raise IndexError(f"{name}: expert id out of range")
    if rc == -2:
        raise MemoryError(f"{name}: out of memory")
    if rc != 0:
        raise ValueError(f"{name}: unsupported sizes (error {rc})")


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.composite of x (..., D) with weight w (D,) in x's dtype: a new contiguous tensor. The caller
    checks rows_usable(x, w)."""
    M, xs = _rows(x)
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype)
    _check(library().dsv3_rmsnorm(x.data_ptr(), xs, w.data_ptr(), out.data_ptr(), M, D, eps, torch.get_num_threads(),
                                  int(x.dtype == torch.bfloat16)), "dsv3_rmsnorm")
    return out


def _angles(t: torch.Tensor, n: int, half: int) -> torch.Tensor | None:
    """cos or sin of the rotary tables as (n, half) contiguous fp32, or None if t does not hold one angle
    set per row."""
    if t.dtype != torch.float32 or t.numel() != n * half:
        return None
    return t.reshape(n, half).contiguous()


def _bool_mask(mask, B: int, S: int, L: int):
    """The mask as the attention kernels take it: contiguous (B, S, L) bool, None (causal) for None, False where
    it does not fit."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != (B, S, L):
        return False
    return mask.contiguous()


def _attention_inputs(cos, sin, mask, B: int, S: int, L: int, half: int):
    """The rotary tables as (B * S, half) fp32 and the mask (_bool_mask), as the attention kernels take them;
    None where these tensors do not fit."""
    cs, sn, mask = _angles(cos, B * S, half), _angles(sin, B * S, half), _bool_mask(mask, B, S, L)
    if cs is None or sn is None or mask is False:
        return None
    return cs, sn, mask


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """apply_rotary of x (B, S, H, R) with cos, sin (B, S, 1, R/2), or None where the kernel does not take
    these tensors (then the caller's PyTorch path runs)."""
    if x.dim() != 4 or not rows_usable(x):
        return None
    B, S, H, R = x.shape
    rows = _rows(x[:, :, 0])
    cs, sn = _angles(cos, B * S, R // 2), _angles(sin, B * S, R // 2)
    if rows is None or cs is None or sn is None or R % 2 or R > 1024 or (H > 1 and x.stride(2) < R):
        return None
    out = torch.empty(B, S, H, R, dtype=x.dtype)
    _check(library().dsv3_rotary(x.data_ptr(), rows[1], x.stride(2), cs.data_ptr(), sn.data_ptr(), out.data_ptr(),
                                 B * S, H, R, int(interleave), int(x.dtype == torch.bfloat16)), "dsv3_rotary")
    return out


def mla_attend(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               mask: torch.Tensor | None, w_k: torch.Tensor, w_vt: torch.Tensor, nope: int, scale: float,
               interleave: bool, slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """Absorbed MLA attention (MLA._absorbed, with the rotation of the queries' rope part) of q (B, S, H,
    nope + R) over kv (B, L, C) and pe (B, L, R), or, with slots (B, L) int64, over the rows slots[b, l] of
    kv (N, C) and pe (N, R); mask (B, S, L) bool or None (causal); w_k (H, nope, C) and w_vt (H, C, v) fp32
    contiguous. -> (B, S, H, v) in q's dtype, or None where the kernel does not take these tensors."""
    if q.dim() != 4 or not q.is_contiguous() or not step_usable(q) or kv.dtype != q.dtype or pe.dtype != q.dtype:
        return None
    B, S, H, QD = q.shape
    R = QD - nope
    C, V = w_k.shape[2], w_vt.shape[2]
    if (w_k.dtype != torch.float32 or w_vt.dtype != torch.float32 or not w_k.is_contiguous()
            or not w_vt.is_contiguous() or w_k.shape != (H, nope, C) or w_vt.shape[:2] != (H, C)
            or kv.shape[-1] != C or pe.shape[-1] != R or kv.stride(-1) != 1 or pe.stride(-1) != 1
            or R % 2 or R > 1024 or nope > 1024 or V > 1024):
        return None
    if slots is None:
        if kv.dim() != 3 or pe.dim() != 3 or kv.shape[0] != B or pe.shape[:2] != kv.shape[:2]:
            return None
        L = kv.shape[1]
        strides = (kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1))
        ptr = None
    else:
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.dim() != 2 or slots.shape[0] != B:
            return None
        L = slots.shape[1]
        strides = (0, kv.stride(-2), 0, pe.stride(-2))
        ptr = slots.data_ptr()
    inputs = _attention_inputs(cos, sin, mask, B, S, L, R // 2)
    if inputs is None:
        return None
    cs, sn, mask = inputs
    out = torch.empty(B, S, H, V, dtype=q.dtype)
    _check(library().dsv3_mla_attend(
        q.data_ptr(), cs.data_ptr(), sn.data_ptr(), kv.data_ptr(), pe.data_ptr(), *strides, ptr,
        None if mask is None else mask.data_ptr(), w_k.data_ptr(), w_vt.data_ptr(), out.data_ptr(),
        B, S, H, nope, R, C, V, L, scale, int(interleave), torch.get_num_threads(), int(q.dtype == torch.bfloat16)),
        "dsv3_mla_attend")
    return out


def _hooked(mods) -> bool:
    """Whether any forward hook would see these modules' calls (a fused kernel call would skip them)."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks) or any(
        mod._forward_hooks or mod._forward_pre_hooks for mod in mods)


class _Plan:
    """What a fused block call needs from its modules, gathered once per module set: the modules (for the
    hook check), where their weights are ((module, name) pairs, read through the parameter dicts on every
    call, so that a replaced parameter is seen), the constant arguments, and the weights' (data pointer,
    dtype) of the last call that passed the checks."""

    def __init__(self, mods, weights, consts, ok=True, projections=()):
        self.mods, self.consts, self.ok = mods, consts, ok
        self.params = [(mod._parameters, name) for mod, name in weights]
        # which of the weights are projections the kernels multiply through dsv3_linear (pointers())
        self.proj = tuple(i for i, (mod, _) in enumerate(weights) if any(mod is m for m in projections))
        self.checked = self.ptr_key = self.ptrs = None
        self.ptr_ws, self.ptr_copies = [], []
        self.subs = self.extra = None

    def weights(self, x: torch.Tensor):
        """The weights, or None where usable(x, *weights) fails (checked again when a weight changes)."""
        ws = [d.get(n) for d, n in self.params]
        if any(w is None for w in ws) or (torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
            return None  # (autograd is checked on every call: the cached check below is about the tensors)
        key = (x.dtype, *[w.data_ptr() for w in ws])
        if key != self.checked:
            if not usable(x, *ws):
                return None
            self.checked = key
        return ws

    def pointers(self, ws) -> list[int]:
        """The weights' data pointers as the kernel call takes them: the projections as dsv3_linear does
        (_weight_operand: bf16 packed), the rest as they are. Kept while the weights are the same tensors
        (weak references: a new tensor at a freed one's address is not taken for it), their storage and the
        projections' versions (what packed_bf16 tracks) and the packing setting stay the same; the packed copies
        whose pointers are kept are held here, so a pointer never outlives its copy."""
        key = (self.checked, _bf16_packed, *[_values_key(ws[i]) for i in self.proj])
        if key != self.ptr_key or any(r() is not w for r, w in zip(self.ptr_ws, ws)):
            ops = [_weight_operand(w) if i in self.proj else w for i, w in enumerate(ws)]
            self.ptrs = [t.data_ptr() for t in ops]
            self.ptr_copies = [t for t, w in zip(ops, ws) if t is not w]
            self.ptr_ws = [weakref.ref(w) for w in ws]
            self.ptr_key = key
        return self.ptrs


def _plain(lins, *norms) -> bool:
    """Whether these are the model's own bias-free projections and norms: a replaced module (tensor-parallel,
    FP8, ...) computes something else than the kernels would (a sharded product and its all-reduce, ...)."""
    from dsv3.model.linear import Linear
    from dsv3.model.norm import RMSNorm

    return all(type(lin) is Linear and lin.bias is None for lin in lins) and all(type(n) is RMSNorm for n in norms)


def fusable(*lins) -> bool:
    """Whether one kernel call may stand for these projections' calls: the model's own bias-free Linears
    (_plain) that no forward hook, on them or global, would see called (the fused blocks' check, for the
    modules' own fused paths)."""
    return _plain(lins) and not _hooked(lins)


def _cached_plan(owner, norm, build) -> _Plan:
    """owner's plan with this norm, kept on the module; built again (build(norm, owner)) when a submodule was
    replaced (e.g. a projection by an FP8 one) or another norm comes with it."""
    plan = owner.__dict__.get("_kernel_plan")
    subs = tuple(owner._modules.values())
    if plan is None or plan.mods[0] is not norm or plan.subs != subs:
        plan = build(norm, owner)
        plan.subs = subs
        owner.__dict__["_kernel_plan"] = plan
    return plan


def _attn_plan(norm, attn) -> _Plan:
    lora = attn.q_lora_rank is not None
    lins = [attn.wq_a, attn.wq_b] if lora else [attn.wq]
    lins += [attn.wkv_a, attn.wo]
    mods = [norm, attn.wkv_a, attn.kv_norm, attn.wo] + ([attn.wq_a, attn.q_norm, attn.wq_b] if lora else [attn.wq])
    consts = (norm.eps, attn.kv_norm.eps, attn.q_norm.eps if lora else 0.0, attn.q_lora_rank or 0)
    plan = _Plan(mods, [(m, "weight") for m in mods], consts,
                 ok=attn.rope_dim % 2 == 0 and max(attn.rope_dim, attn.nope, attn.v_dim) <= 1024  # the kernel's limits
                 and _plain(lins, mods[0], attn.kv_norm, *([attn.q_norm] if lora else [])), projections=lins)
    return plan


def mla_block(x: torch.Tensor, attn_norm, attn, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
              slots) -> torch.Tensor | None:
    """x + attn(attn_norm(x)) for the rows x (B, S, D) of a decode step (Block.forward's attention half:
    dsv3.model.mla.MLA.decode_block), over a cache's kernel slots (kv (N, C), pe (N, R), write slots (B * S,),
    read slots (B, L)): one kernel call. None where the kernel does not take these tensors, or where forward
    hooks on the modules would miss the call."""
    B, S, D = x.shape
    plan = _cached_plan(attn, attn_norm, _attn_plan)
    if not plan.ok or not x.is_contiguous() or _hooked(plan.mods):
        return None
    ws = plan.weights(x)
    kv, pe, wslots, rslots = slots
    L = rslots.shape[1]
    dt = x.dtype
    if ws is None or kv.dtype != dt or pe.dtype != dt or kv.stride(-1) != 1 or pe.stride(-1) != 1:
        return None
    inputs = _attention_inputs(cos, sin, mask, B, S, L, attn.rope_dim // 2)
    if inputs is None:
        return None
    cs, sn, mask = inputs
    w_k, w_v = attn._absorb_weights(torch.float32)  # w_v: the transpose of a contiguous (H, C, v), as the kernel takes it
    out = torch.empty_like(x)
    eps, kv_eps, q_eps, qr = plan.consts
    p = plan.pointers(ws)  # norm, wkv_a, kv_norm, wo, then wq_a, q_norm, wq_b or wq
    q_args = (0, p[4], p[5], q_eps, p[6], qr) if qr else (p[4], 0, 0, 0.0, 0, 0)
    _check(library().dsv3_mla_block(
        x.data_ptr(), out.data_ptr(), B, S, D, p[0], eps, *q_args, p[1], p[2], kv_eps, p[3],
        w_k.data_ptr(), w_v.data_ptr(), cs.data_ptr(), sn.data_ptr(), kv.data_ptr(), pe.data_ptr(),
        kv.stride(-2), pe.stride(-2), wslots.data_ptr(), rslots.data_ptr(), L, None if mask is None else mask.data_ptr(),
        attn.n_heads, attn.nope, attn.rope_dim, attn.kv_lora_rank, attn.v_dim, attn.softmax_scale,
        int(attn.interleave), torch.get_num_threads(), int(dt == torch.bfloat16)), "dsv3_mla_block")
    return out


_SCORES = {"sigmoid": 0, "softmax": 1}
_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def _ffn_plan(norm, ffn) -> _Plan:
    """The plan of Block.forward's second half: a plain MoE (its own Gate, Experts and shared MLP, no
    replaced `routed`, impl "auto", no routing record) or a dense MLP; anything else is not planned (ok False)."""
    from dsv3.model.moe import MLP, Experts, Gate, MoE

    if type(ffn) is MLP:
        mlp, moe = ffn, None
    elif (type(ffn) is MoE and type(ffn.gate) is Gate and type(ffn.experts) is Experts and "routed" not in ffn.__dict__
          and (ffn.shared_experts is None or type(ffn.shared_experts) is MLP)):
        mlp, moe = ffn.shared_experts, ffn
    else:
        mlp = moe = None
    mods, weights, consts, lins = [norm, ffn], [(norm, "weight")], (), []
    ok = mlp is not None or moe is not None
    if ok and mlp is not None:
        lins = [mlp.w1, mlp.w3, mlp.w2]
        mods += [mlp, *lins]
        weights += [(lin, "weight") for lin in lins]
        consts = (mlp.w1.weight.shape[0],)
        ok = _plain(lins, norm)
    if ok and moe is not None:
        g, ex = moe.gate, moe.experts
        mods += [g, ex]
        weights += [(g, "weight"), (ex, "w1"), (ex, "w3"), (ex, "w2")]
        ok = g.score_func in _SCORES and g.topk_method in _METHODS and _plain([], norm)
        consts += (g.n_experts, g.topk, g.n_group, g.topk_group, _SCORES.get(g.score_func), _METHODS.get(g.topk_method),
                   int(g.norm_topk_prob), float(g.route_scale), ex.w1.shape[1])
    plan = _Plan(mods, weights, consts, ok, projections=lins)
    plan.extra = (moe is not None, mlp is not None, moe.gate._buffers if moe is not None else None)
    return plan


def ffn_block(x: torch.Tensor, ffn_norm, ffn) -> torch.Tensor | None:
    """x + ffn(ffn_norm(x)) for the rows x (B, S, D) of a decode step (Block.forward's second half), a MoE
    (router, routed experts and shared experts) or a dense MLP: one kernel call. None where the kernel does
    not take these modules or tensors, or where forward hooks on the modules would miss the call."""
    plan = _cached_plan(ffn, ffn_norm, _ffn_plan)
    if not plan.ok or not x.is_contiguous() or _hooked(plan.mods) or x.numel() == 0:
        return None
    ws = plan.weights(x)
    if ws is None:
        return None
    D = x.shape[-1]
    M = x.numel() // D
    if M > LINEAR_MAX_ROWS:
        return None
    out = torch.empty_like(x)
    is_moe, has_mlp, gate_buffers = plan.extra
    p = plan.pointers(ws)  # norm, then (shared / dense) w1, w3, w2, then gate, experts w1, w3, w2
    s = (p[1], p[2], p[3], plan.consts[0]) if has_mlp else (0, 0, 0, 0)
    if not is_moe:
        r = (0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0)
    else:
        E, K, G, TG, score, method, norm, scale, inter = plan.consts[1:] if has_mlp else plan.consts
        q = p[4:] if has_mlp else p[1:]
        bias = gate_buffers.get("bias")
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            # (a bf16 model's bias buffer is bf16): its fp32 copy is kept while the buffer stays the same
            from dsv3.model.mla import version_key  # (the model imports this module)

            key = version_key(bias)
            if getattr(plan, "bias_key", None) != key:
                plan.bias_key, plan.bias32 = key, bias.float().contiguous()
            bias = plan.bias32
        r = (q[0], None if bias is None else bias.data_ptr(), E, K, G, TG, score, method, norm, scale,
             q[1], q[2], q[3], inter)
    _check(library().dsv3_ffn_block(x.data_ptr(), out.data_ptr(), M, D, p[0], ffn_norm.eps, *r, *s,
                                    torch.get_num_threads(), int(x.dtype == torch.bfloat16)), "dsv3_ffn_block")
    return out
