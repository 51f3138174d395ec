"""`dsv3 convert`: Hugging Face checkpoint folders between the released FP8 format and BF16.

Released FP8 format (DeepSeek-V3/R1/V3.1 on the Hub): the 2-D linear weights of attention and
MLP/experts are float8_e4m3fn, each followed by `<name>.weight_scale_inv` (fp32, one value per
128x128 block); everything else (embeddings, lm_head, norms, the router `mlp.gate.weight`,
`e_score_correction_bias`, the MTP `eh_proj` and `shared_head.head`) is left in high precision.
config.json carries `quantization_config` (quant_method fp8, fmt e4m3, weight_block_size
[128, 128], activation_scheme dynamic; V3.1 adds scale_fmt ue8m0).

Both directions stream: shards are processed one at a time, tensors are read in row pieces of
whole 128-row blocks (safe_open slices) and written piece by piece into the output shard (our
own safetensors writer, header first), so working memory is a few pieces (~64 MB each), not a
tensor or a shard; the input shard's pages mapped by safe_open come on top (clean page cache,
reclaimable). Each output shard is written under a temporary name and renamed when complete,
so an interrupted run can simply be run again: finished shards are verified and skipped.
"""
import argparse
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from dsv3.fp8.quant import BLOCK, FP8_DTYPE, weight_dequant, weight_quant

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
PARTIAL_SUFFIX = ".partial"

# Linear layers the release stores in FP8: MLA projections and the dense/shared/routed expert
# MLPs of every decoder layer (the MTP block's included). The router gate, eh_proj and heads are not.
QUANTIZED_PROJS = frozenset({"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                             "gate_proj", "up_proj", "down_proj"})
_LAYER_WEIGHT = re.compile(r"^model\.layers\.\d+\.(?:.+\.)?([A-Za-z_]+)\.weight$")

# Kept in fp32 by the release and by transformers (`_keep_in_fp32_modules_strict`): the
# routing bias is added to sigmoid scores and bf16 would blur the top-k choice.
KEEP_FP32 = ("e_score_correction_bias",)

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FP8_ST = ("F8_E4M3", "F8_E5M2")
_WIDE_FLOATS = ("F64", "F32", "F16")

QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [BLOCK, BLOCK]}


def is_quantized_weight(name: str, shape) -> bool:
    m = _LAYER_WEIGHT.match(name)
    return m is not None and m.group(1) in QUANTIZED_PROJS and len(shape) == 2


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------
# safetensors writing, one tensor at a time

class _ShardWriter:
    """Writes a safetensors file whose header (names, dtypes, shapes) is known up front, then
    the tensors in header order, each possibly in several row pieces; memory is one piece."""

    def __init__(self, path: Path, plan: list):
        self.path, self.plan, self.i, self.done = path, plan, 0, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.nbytes = []
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * _ST_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.nbytes.append(nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self._skip_complete()

    def _skip_complete(self):
        # move past the current tensor once all its bytes are written (and past empty tensors)
        while self.i < len(self.plan) and self.done == self.nbytes[self.i]:
            self.i, self.done = self.i + 1, 0

    def write(self, name: str, piece: torch.Tensor):
        """Append `piece` (the whole tensor, or its next rows) to tensor `name`."""
        if piece.numel() == 0:
            return  # the header already records the shape of an empty tensor
        pname, dtype, shape = self.plan[self.i]
        assert name == pname and _ST_DTYPES[piece.dtype] == dtype and list(piece.shape[1:]) == list(shape[1:]), \
            (name, pname, piece.dtype, dtype, tuple(piece.shape), shape)
        nbytes = piece.numel() * piece.element_size()
        assert self.done + nbytes <= self.nbytes[self.i], (name, self.done, nbytes, self.nbytes[self.i])
        self.f.write(piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.done += nbytes
        self._skip_complete()

    def close(self):
        assert self.i == len(self.plan), f"{self.path}: wrote {self.i} of {len(self.plan)} tensors"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _shard_complete(path: Path, plan: list) -> bool:
    """True when `path` holds exactly the planned tensors (a finished shard from an earlier run)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
    except (OSError, ValueError, struct.error):
        return False
    header.pop("__metadata__", None)
    want = {name: (dtype, list(shape)) for name, dtype, shape in plan}
    have = {name: (h["dtype"], h["shape"]) for name, h in header.items()}
    data = sum(_numel(s) * _ST_SIZES[d] for d, s in want.values())
    return have == want and path.stat().st_size == 8 + hlen + data


# ---------------------------------------------------------------------------------------------
# reading the input folder

def _read_headers(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def _layout(inp: Path):
    """-> (shard file names in order, {tensor: shard}, {shard: {tensor: (dtype, shape)}}, has_index)."""
    index = inp / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        has_index = True
    elif (inp / SINGLE_NAME).is_file():
        shards, weight_map, has_index = [SINGLE_NAME], None, False
    else:
        raise ValueError(f"{inp} has neither {INDEX_NAME} nor {SINGLE_NAME}: not a Hugging Face checkpoint folder")
    headers = {}
    for shard in shards:
        if not (inp / shard).is_file():
            raise ValueError(f"{INDEX_NAME} in {inp} names shard {shard}, which does not exist")
        headers[shard] = _read_headers(inp / shard)
    # The headers are the truth; the index only tells where to look for a tensor that is not
    # in the shard being converted (e.g. a scale stored next to another weight).
    located = {name: shard for shard, h in headers.items() for name in h}
    if weight_map is not None:
        for name, shard in weight_map.items():
            if located.get(name) != shard:
                raise ValueError(f"{INDEX_NAME} in {inp} maps {name} to {shard}, but that shard does not hold it")
    return shards, located, headers, has_index


def _check_paths(inp: Path, out: Path):
    if not inp.is_dir():
        raise ValueError(f"--input {inp} is not a directory")
    ri, ro = inp.resolve(), out.resolve()
    if ro == ri or ri in ro.parents:
        raise ValueError(f"--output {out} is the input folder or inside it; refusing to write into the "
                         f"checkpoint being converted (choose a separate folder)")
    if ro.exists() and not ro.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")


# ---------------------------------------------------------------------------------------------
# per-direction plans: what each output shard holds, computed from headers only

def _plan_fp8_to_bf16(shard, header, located, headers, block):
    plan = []
    for name, (dtype, shape) in header.items():
        if name.endswith(SCALE_SUFFIX):
            continue  # consumed by its weight
        if dtype in _FP8_ST:
            sname = name + SCALE_SUFFIX
            if sname not in located:
                raise ValueError(f"FP8 tensor {name} in shard {shard} has no scale {sname} "
                                 f"(not in that shard and not in {INDEX_NAME})")
            sshape = headers[located[sname]][sname][1]
            want = tuple(-(-d // block) for d in shape)
            if len(shape) != 2 or tuple(sshape) != want:
                raise ValueError(f"{sname} in shard {located[sname]} has shape {tuple(sshape)}, expected {want} "
                                 f"for FP8 tensor {name} of shape {tuple(shape)} with {block}x{block} blocks")
            plan.append((name, "BF16", shape))
        else:
            plan.append((name, dtype, shape))
    return plan


def _plan_bf16_to_fp8(shard, header, block):
    plan = []
    for name, (dtype, shape) in header.items():
        if dtype in _FP8_ST:
            raise ValueError(f"tensor {name} in shard {shard} is already FP8 ({dtype}); "
                             f"the input of bf16-to-fp8 must be a high-precision checkpoint")
        if is_quantized_weight(name, shape):
            plan.append((name, "F8_E4M3", shape))
            plan.append((name + SCALE_SUFFIX, "F32", tuple(-(-d // block) for d in shape)))
        elif dtype in _WIDE_FLOATS and not name.endswith(KEEP_FP32):
            plan.append((name, "BF16", shape))
        else:
            plan.append((name, dtype, shape))
    return plan


# ---------------------------------------------------------------------------------------------

def _write_config(inp: Path, out: Path, direction: str, scale_fmt):
    cfg_path = inp / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    if direction == "fp8-to-bf16":
        # transformers would otherwise route loading through its FP8 quantizer.
        cfg.pop("quantization_config", None)
    else:
        qc = dict(QUANT_CONFIG)
        if scale_fmt is not None:
            qc["scale_fmt"] = scale_fmt
        cfg["quantization_config"] = qc
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "bfloat16"
    _atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_side_files(inp: Path, out: Path):
    # tokenizer.json, tokenizer_config.json, generation_config.json, custom modeling code, ...
    for p in sorted(inp.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(p, out / p.name)


def _block_size(inp: Path) -> int:
    cfg_path = inp / "config.json"
    if not cfg_path.is_file():
        return BLOCK
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    bs = qc.get("weight_block_size", [BLOCK, BLOCK])
    if len(bs) != 2 or bs[0] != bs[1]:
        raise ValueError(f"weight_block_size {bs} in {cfg_path}: only square blocks are supported")
    return int(bs[0])


def convert(inp, out, direction: str, scale_fmt=None, progress: bool = True) -> dict:
    """Convert the checkpoint folder `inp` into `out`. Returns {"bytes_written", "shards_written", "shards_skipped"}."""
    from tqdm import tqdm

    inp, out = Path(inp), Path(out)
    if direction not in ("fp8-to-bf16", "bf16-to-fp8"):
        raise ValueError(f"unknown direction {direction!r}; choose fp8-to-bf16 or bf16-to-fp8")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"--scale-fmt must be ue8m0 or absent, got {scale_fmt!r}")
    if scale_fmt is not None and direction != "bf16-to-fp8":
        raise ValueError("--scale-fmt only applies to bf16-to-fp8 (fp8-to-bf16 reads the scales as stored)")
    _check_paths(inp, out)
    block = _block_size(inp) if direction == "fp8-to-bf16" else BLOCK
    shards, located, headers, has_index = _layout(inp)

    # Plan every shard before writing anything: a missing scale or a bad shape fails fast.
    plans = {}
    for shard in shards:
        if direction == "fp8-to-bf16":
            plans[shard] = _plan_fp8_to_bf16(shard, headers[shard], located, headers, block)
        else:
            plans[shard] = _plan_bf16_to_fp8(shard, headers[shard], block)

    out.mkdir(parents=True, exist_ok=True)
    sizes = {s: sum(_numel(sh) * _ST_SIZES[d] for _, d, sh in p) for s, p in plans.items()}
    stats = {"bytes_written": 0, "shards_written": 0, "shards_skipped": 0}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=direction, disable=not progress)
    try:
        for shard in shards:
            final = out / shard
            if _shard_complete(final, plans[shard]):
                stats["shards_skipped"] += 1
                bar.update(sizes[shard])
                continue
            bar.set_postfix_str(shard)
            _convert_shard(inp, shard, final, plans[shard], located, direction, scale_fmt, block, bar)
            stats["shards_written"] += 1
            stats["bytes_written"] += sizes[shard]
    finally:
        bar.close()

    weight_map = {name: shard for shard in shards for name, _, _ in plans[shard]}
    if has_index or len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    _copy_side_files(inp, out)
    _write_config(inp, out, direction, scale_fmt)
    return stats


def _convert_shard(inp, shard, final, plan, located, direction, scale_fmt, block, bar):
    tmp = final.with_name(final.name + PARTIAL_SUFFIX)
    writer = _ShardWriter(tmp, plan)
    try:
        with safe_open(str(inp / shard), framework="pt") as f:
            names = set(f.keys())
            for name, _, _ in plan:
                if name.endswith(SCALE_SUFFIX) and direction == "bf16-to-fp8":
                    continue  # written right after its weight
                for oname, piece in _convert_tensor(name, f, names, inp, located, direction, scale_fmt, block):
                    writer.write(oname, piece)
                    bar.update(piece.numel() * piece.element_size())
        writer.close()
    except BaseException:
        writer.f.close()
        raise
    os.replace(tmp, final)  # only a complete shard ever carries the final name


CHUNK_ELEMS = 1 << 24  # rows are processed in pieces of about this many elements (64 MB in fp32)


def _row_chunks(f, name, block):
    """Yield (first row, rows) of tensor `name`, read piecewise (row counts are multiples of
    `block`, so every piece holds whole quantization blocks). Memory stays at one piece even
    for the 129280 x 7168 embedding."""
    sl = f.get_slice(name)
    shape = sl.get_shape()
    if len(shape) == 0:
        yield 0, f.get_tensor(name)
        return
    cols = max(1, _numel(shape[1:]))
    step = max(block, (CHUNK_ELEMS // cols) // block * block)
    for r0 in range(0, shape[0], step):
        yield r0, sl[r0:r0 + step]


def _convert_tensor(name, f, names, inp, located, direction, scale_fmt, block):
    """Yield (output name, piece) in output order; a tensor may come in several row pieces."""
    if direction == "fp8-to-bf16":
        dtype = f.get_slice(name).get_dtype()
        if dtype in _FP8_ST:
            sname = name + SCALE_SUFFIX
            if sname in names:
                s = f.get_tensor(sname)
            else:  # the scale lives in another shard: read just that tensor
                with safe_open(str(inp / located[sname]), framework="pt") as g:
                    s = g.get_tensor(sname)
            for r0, w in _row_chunks(f, name, block):
                yield name, weight_dequant(w, s[r0 // block:r0 // block + -(-w.shape[0] // block)], block,
                                           dtype=torch.bfloat16)
        else:
            for _, t in _row_chunks(f, name, block):
                yield name, t
    else:
        sl = f.get_slice(name)
        shape, dtype = sl.get_shape(), sl.get_dtype()
        if is_quantized_weight(name, shape):
            scales = []
            for _, w in _row_chunks(f, name, block):
                q, s = weight_quant(w, block, scale_fmt)
                scales.append(s)
                yield name, q
            yield name + SCALE_SUFFIX, torch.cat(scales)
        else:
            cast = dtype in _WIDE_FLOATS and not name.endswith(KEEP_FP32)
            for _, t in _row_chunks(f, name, block):
                yield name, t.to(torch.bfloat16) if cast else t


# ---------------------------------------------------------------------------------------------
# CLI: dsv3 convert {fp8-to-bf16,bf16-to-fp8} --input DIR --output DIR [--scale-fmt ue8m0]

def configure(parser: argparse.ArgumentParser):
    parser.add_argument("direction", choices=("fp8-to-bf16", "bf16-to-fp8"),
                        help="fp8-to-bf16: dequantize a released FP8 checkpoint (weight * weight_scale_inv per "
                             "128x128 block) so transformers loads it without a GPU; bf16-to-fp8: write the "
                             "released FP8 format (E4M3 weights + fp32 weight_scale_inv)")
    parser.add_argument("--input", required=True, help="input checkpoint folder (config.json + safetensors shards)")
    parser.add_argument("--output", required=True,
                        help="output folder (created; must not be the input or inside it). Re-running after "
                             "an interruption skips shards that are already complete")
    parser.add_argument("--scale-fmt", choices=("ue8m0",), default=None,
                        help="bf16-to-fp8 only: round block scales up to powers of two (DeepSeek-V3.1 format)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args) -> int:
    stats = convert(args.input, args.output, args.direction, scale_fmt=args.scale_fmt,
                    progress=not args.no_progress)
    print(f"{args.direction}: wrote {stats['shards_written']} shard(s) ({stats['bytes_written'] / 1e9:.3f} GB), "
          f"skipped {stats['shards_skipped']} already complete -> {args.output}")
    return 0
