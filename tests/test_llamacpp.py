"""The llama.cpp wrapper: loading (with the extra-buffer-type workaround), generation, speed,
perplexity, and crash isolation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from refinery import base_model, gguf_export, llamacpp
from refinery.config import load_profile
from refinery.modelstats import perplexity


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    home = tmp_path_factory.mktemp("tiny")
    art = base_model.build(load_profile("smoke"), inputs={}, home=home, log=lambda _m: None)
    path = gguf_export.convert_to_gguf(art.path / "model", home / "tiny.gguf", "F16", metadata={})
    return art.path / "model", path


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(llamacpp.LlamaCppMissing, match=r"pip install 'refinery\[llamacpp\]'"):
        llamacpp.load("whatever.gguf")


def test_extra_buffer_types_follow_the_build(tiny_gguf):
    """The AMX / repack crash workaround reaches the model params llama.cpp is given when the
    build has AMX kernels; otherwise the fast repacked weights stay on."""
    _, path = tiny_gguf
    with llamacpp.loaded(path) as llm:
        assert llm.model_params.use_extra_bufts is (not llamacpp.build_has_amx())
        assert llm.n_vocab() == 49152


def test_the_build_uses_this_cpus_vector_units():
    """`make setup` builds llama.cpp for the machine: its AVX512 kernels where the CPU has them
    (scoring a GGUF is 1.5x faster with them than with AVX2 only), never the AMX ones that crashed.
    A wheel taken from a cache built elsewhere, or with other flags, fails here."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "").split()) \
        if cpuinfo.exists() else set()
    built = llamacpp.build_features()
    assert not llamacpp.build_has_amx(), built
    if "avx2" in flags:
        assert "AVX2" in built, built
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert "AVX512" in built, built
        for cpu, ggml in (("avx512vbmi", "AVX512_VBMI"), ("avx512_vnni", "AVX512_VNNI"),
                          ("avx512_bf16", "AVX512_BF16")):
            assert (ggml in built) == (cpu in flags), (cpu, built)


def test_default_params_generate_in_a_child_process(tiny_gguf):
    """Without the workaround, in a separate process: exits cleanly with this build. If this
    fails with a signal, the wheel was built with the AMX kernels that crashed natively; the
    workaround in refinery.llamacpp keeps refinery working either way."""
    _, path = tiny_gguf
    code = ("import llama_cpp, sys; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
            "print(llm.model_params.use_extra_bufts, len(llm.create_completion('Hi', max_tokens=4)['choices'])); "
            "llm.close()")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "1"]


def test_generate_and_check(tiny_gguf):
    _, path = tiny_gguf
    text = llamacpp.generate(path, "Once upon a time", max_tokens=8)
    assert isinstance(text, str)
    assert llamacpp.generate(path, "Once upon a time", max_tokens=8) == text  # greedy
    assert isinstance(llamacpp.generate(path, "Hello", max_tokens=4, chat=True), str)
    ok, sample = llamacpp.loads_and_generates(path)
    assert ok and sample.startswith(llamacpp.generate(path, llamacpp.SMOKE_PROMPT, 16)[:1])


def test_a_broken_file_is_a_failed_check_not_a_crash(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    ok, why = llamacpp.loads_and_generates(bad)
    assert not ok and why


def test_tokens_per_second(tiny_gguf):
    _, path = tiny_gguf
    speed = llamacpp.tokens_per_second(path, n_tokens=16, n_threads=1)
    assert speed["prompt_tokens"] == 16 and speed["generated_tokens"] == 16
    assert speed["prompt_tokens_per_second"] > 0 and speed["generation_tokens_per_second"] > 0
    assert speed["n_threads"] == 1


def test_perplexity_matches_transformers(tiny_gguf):
    """One window (256 tokens < n_ctx): llama.cpp and transformers score the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path = tiny_gguf
    text = "The history of the city begins in the tenth century, when a small fort was built. " * 8
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = llamacpp.perplexity(path, text, max_tokens=128)
    theirs = perplexity(model, text, tokenizer=AutoTokenizer.from_pretrained(model_dir), max_tokens=128)
    assert ours == pytest.approx(theirs, rel=1e-3)
