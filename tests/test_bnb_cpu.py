"""The bitsandbytes CPU quirk (refinery.bnb_cpu): gradients must reach LoRA weights through 4-bit
layers even after an eval-mode forward. Without the workaround the second test's assertion fails
(the eval forward repacks the weights and later forwards lose their backward)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a declared dependency")

from refinery.bnb_cpu import BnbCpuPlugin, disable_cpu_repacking  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny4bit")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def lora_gradients(model_dir, *, eval_first: bool, workaround: bool) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA weights after one training step, optionally preceded by an eval pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so every A (not only B) gets a gradient
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    if workaround:
        disable_cpu_repacking(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def test_gradients_survive_an_eval_forward_with_the_workaround(tiny_dir):
    clean = lora_gradients(tiny_dir, eval_first=False, workaround=True)
    after_eval = lora_gradients(tiny_dir, eval_first=True, workaround=True)
    early = [n for n in clean if ".layers.0." in n and "lora_A" in n]
    assert early, "expected LoRA A weights in the first decoder layer"
    assert set(after_eval) == set(clean)
    for name in clean:
        assert after_eval[name].abs().sum() > 0, f"{name}: gradient lost after an eval forward"
        torch.testing.assert_close(after_eval[name], clean[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_bug_is_still_there_without_the_workaround(tiny_dir):
    """Proves the test above can fail: without the workaround the early layers' gradients change.

    If a bitsandbytes upgrade fixes the bug, this test fails: then refinery.bnb_cpu can go."""
    clean = lora_gradients(tiny_dir, eval_first=False, workaround=False)
    after_eval = lora_gradients(tiny_dir, eval_first=True, workaround=False)
    early = [n for n in clean if ".layers.0." in n and "lora_A" in n]
    differs = [n for n in early if n not in after_eval
               or not torch.allclose(after_eval[n], clean[n], rtol=1e-4, atol=1e-6)]
    assert differs, "bitsandbytes no longer drops gradients after an eval forward"


def test_workaround_refuses_an_already_repacked_model(tiny_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant, device_map="cpu")
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    if not repacked:
        pytest.fail("this CPU did not repack (no AVX512-BF16?): the quirk cannot be exercised here")
    with pytest.raises(RuntimeError, match="already repacked"):
        disable_cpu_repacking(model)


def test_plugin_hooks_apply_the_workaround(tiny_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant, device_map="cpu")
    BnbCpuPlugin().post_model_build(None, model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
