"""The built-in tiny-qwen3 model and model/device loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentmas.models import LoadedModel, ModelLoadError, load_model, resolve_device, tiny_qwen3


def test_tiny_qwen3_is_built_in_the_session_cache(tiny_lm_cache_env):
    folder = tiny_qwen3.cache_dir()
    assert str(folder).startswith(tiny_lm_cache_env["LATENTMAS_CACHE"])
    assert tiny_qwen3.ensure_built() == folder  # second call reuses the folder
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("*.safetensors")), "weights not saved in safetensors format"


def test_tiny_qwen3_loads_through_from_pretrained(tiny_lm_cache_env):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tiny_qwen3.ensure_built()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen3"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_norm, torch.nn.Module) and isinstance(attention.k_norm, torch.nn.Module)
    assert attention.k_proj.out_features == config.num_key_value_heads * config.head_dim
    assert attention.q_proj.out_features == config.num_attention_heads * config.head_dim
    assert len(tokenizer) == config.vocab_size
    ids = tokenizer("Question: 48 + 24 = 72", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_weights_are_seeded(tiny_lm_cache_env, tmp_path):
    """Two builds give the same weights (the recipe is deterministic)."""
    from safetensors.torch import load_file

    tiny_qwen3.build(tmp_path)
    folder = tiny_qwen3.ensure_built()
    first = load_file(next(folder.glob("*.safetensors")))
    second = load_file(next(tmp_path.glob("*.safetensors")))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_no_weight_is_left_at_a_constant(tiny_lm):
    """RMSNorm, q_norm and k_norm weights of 1 would hide a code path that skips a norm."""
    constant = [name for name, p in tiny_lm.model.named_parameters() if bool((p == p.flatten()[0]).all())]
    assert constant == []
    norms = [p for name, p in tiny_lm.model.named_parameters() if "norm" in name]
    assert len(norms) == 4 * tiny_lm.num_layers + 1  # input, post-attention, q, k per layer; the final norm
    assert all(float(p.min()) >= 0.5 and float(p.max()) <= 1.5 and float(p.std()) > 0.1 for p in norms)


def test_a_changed_recipe_builds_a_new_cache_folder(tiny_lm_cache_env, monkeypatch):
    folder = tiny_qwen3.cache_dir()
    assert folder.name == f"tiny-qwen3-v{tiny_qwen3.VERSION}"
    monkeypatch.setattr(tiny_qwen3, "VERSION", tiny_qwen3.VERSION + 1)
    assert tiny_qwen3.cache_dir() != folder and not tiny_qwen3.cache_dir().exists()


def test_vary_constant_weights_touches_only_constants():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    weight = model[0].weight.detach().clone()
    changed = tiny_qwen3.vary_constant_weights(model, 0)
    assert changed == ["1.weight", "1.bias"]  # the Linear starts random, the LayerNorm at 1 and 0
    torch.testing.assert_close(model[0].weight, weight, rtol=0, atol=0)
    assert float(model[1].weight.detach().std()) > 0 and float(model[1].bias.detach().abs().max()) > 0


def test_loaded_model_shapes(tiny_lm):
    assert isinstance(tiny_lm, LoadedModel)
    assert tiny_lm.device == torch.device("cpu")
    assert tiny_lm.dtype == torch.float32
    assert tiny_lm.config.model_type == "qwen3"
    assert tiny_lm.num_kv_heads < tiny_lm.num_heads
    assert tiny_lm.num_layers == tiny_qwen3.ARCHITECTURE["num_hidden_layers"]
    assert tiny_lm.head_dim == tiny_qwen3.ARCHITECTURE["head_dim"]
    assert tiny_lm.hidden_size == tiny_qwen3.ARCHITECTURE["hidden_size"]
    assert tiny_lm.tokenizer.padding_side == "left"
    assert tiny_lm.tokenizer.pad_token is not None
    assert not tiny_lm.model.training
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_chat_template(tiny_lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    no_think = tiny_lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False)
    assert no_think == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think = tiny_lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True)
    assert think.endswith("<|im_start|>assistant\n") and "<think>" not in think
    # the special tokens are single tokens
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = tiny_lm.tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
    assert tiny_lm.tokenizer.eos_token == "<|im_end|>"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["banana", "cuda:7" if not torch.cuda.is_available() else "cuda:999", "gpu0"])
def test_resolve_device_errors(device):
    with pytest.raises(ModelLoadError) as info:
        resolve_device(device)
    assert repr(device) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model("tiny-qwen3", "cuda:7")


@pytest.mark.parametrize("name", ["missing-model-folder", "./missing-model", "sub/dir/missing"])
def test_missing_local_path_is_one_line(tmp_path, offline, name):
    path = str(tmp_path / name) if not name.startswith("./") else name
    with pytest.raises(ModelLoadError) as info:
        load_model(path, "cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot load model {path!r}")
    assert "local folder" in message


def test_empty_folder_is_one_line(tmp_path, offline):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), "cpu")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"cannot load model {str(folder)!r}")
    assert "not a local folder" not in str(info.value)


def test_random_weights_keeps_shapes(tiny_lm, tiny_lm_cache_env):
    random = load_model("tiny-qwen3", "cpu", random_weights=True, seed=3)
    assert random.model.config.model_type == "qwen3"
    real = dict(tiny_lm.model.named_parameters())
    fresh = dict(random.model.named_parameters())
    assert real.keys() == fresh.keys()
    assert all(real[k].shape == fresh[k].shape for k in real)
    again = load_model("tiny-qwen3", "cpu", random_weights=True, seed=3)
    for name, tensor in again.model.named_parameters():
        torch.testing.assert_close(tensor, fresh[name], rtol=0, atol=0)
    other_seed = dict(load_model("tiny-qwen3", "cpu", random_weights=True, seed=4).model.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh[name], real[name])  # not the stored weights
    assert not torch.equal(fresh[name], other_seed[name])  # the seed decides
    assert Path(tiny_qwen3.cache_dir()).exists()
