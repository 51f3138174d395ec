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

import torch

log = logging.getLogger("dsv3.kernels")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_cpu.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fPIC", "-shared", "-fopenmp", "-fno-strict-aliasing"]
_reason: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
    with open(_SOURCE, "rb") as f:
        src = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f"moe_cpu-{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:  # a read-only home: a per-user folder of the temporary directory
        folder = os.path.join(tempfile.gettempdir(), f"dsv3-kernels-{os.getuid()}")
        path = os.path.join(folder, f"moe_cpu-{key}.so")
        if os.path.exists(path):
            return path
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", tmp, _SOURCE, "-lm"], capture_output=True, text=True, timeout=300)
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
    elif not {"avx512f", "avx512bw", "avx512vl", "fma"} <= _cpu_flags():
        _reason = "the CPU lacks AVX-512 (F, BW and VL)"
    elif (cc := _compiler()) is None:
        _reason = "no C compiler (cc, gcc or clang) on PATH"
    else:
        try:
            lib = ctypes.CDLL(_build(cc))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _reason = f"build failed: {e}"
        else:
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.dsv3_moe.argtypes = [p] * 7 + [i64] * 5 + [i32, i32]
            lib.dsv3_moe.restype = i32
            lib.dsv3_linear.argtypes = [p] * 3 + [i64] * 3 + [i32, i32]
            lib.dsv3_linear.restype = i32
            return lib
    log.info("dsv3 CPU kernels unavailable: %s; the PyTorch paths are used", _reason)
    return None


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
    T, D = x.shape
    E, I, _ = w1.shape
    K = idx.shape[1]
    x = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    gw = gw.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=x.dtype)
    rc = library().dsv3_moe(x.data_ptr(), w1.data_ptr(), w3.data_ptr(), w2.data_ptr(), idx.data_ptr(), gw.data_ptr(), out.data_ptr(),
                            T, D, I, K, E, torch.get_num_threads(), int(x.dtype == torch.bfloat16))
    if rc == -1:
        raise IndexError(f"expert id out of range [0, {E}) in {idx.tolist()}")
    if rc != 0:
        raise MemoryError("dsv3_moe: out of memory")
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T for a few rows, in x's dtype (the caller checks usable(x, w)). Each output
    is one dot product evaluated the same way whatever M is (batch-invariant)."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    if library().dsv3_linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), M, K, N, torch.get_num_threads(),
                             int(x.dtype == torch.bfloat16)) != 0:
        raise MemoryError("dsv3_linear: out of memory")
    return out
