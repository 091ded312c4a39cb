"""Where action adapters attach inside each Hugging Face model family, and the LoRA option.

The conditioned LM (`planner_lm.models.conditioning`) hooks one small adapter per chosen block;
this module knows the blocks' paths per family (`ADAPTER_TARGETS`: add a family with one line),
the two sites an action can enter (`ADAPTER_SITES`), which layers the paper conditions, the
settings that rebuild a conditioned LM, and how LoRA layers are injected when the base trains
through LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from planner_lm.errors import UserError

ADAPTER_SITES: tuple[str, ...] = ("attention_output", "ffn_input")
"""Where in a block the action enters: the input of the attention output projection (the
reference's GPT-2 adapter) or the input of the feed-forward block (its OLMo adapter)."""


@dataclass(frozen=True)
class AdapterTarget:
    """Where the adapters attach inside one model family."""

    layers: str  # attribute path from the causal LM to its list of transformer blocks
    projection: str  # path inside a block to the attention output projection
    ffn: str = "mlp"  # path inside a block to the feed-forward module (its input is the normed state)

    def site(self, name: str) -> str:
        return self.projection if name == "attention_output" else self.ffn


_LLAMA_LIKE = AdapterTarget("model.layers", "self_attn.o_proj")
ADAPTER_TARGETS: dict[str, AdapterTarget] = {
    "gpt2": AdapterTarget("transformer.h", "attn.c_proj"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt_neox": AdapterTarget("gpt_neox.layers", "attention.dense"),
    "opt": AdapterTarget("model.decoder.layers", "self_attn.out_proj", ffn="fc1"),
}
"""``config.model_type`` -> where the adapters go. Add a family with one line here."""


@dataclass
class ConditioningSettings:
    """Everything needed to rebuild a conditioned LM around the same base (saved as JSON)."""

    model_type: str
    conditioned_layers: list[int]
    num_actions: int
    action_dim: int
    per_layer_codebook: bool
    train_codebook: bool
    base_mode: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str] | None
    adapter_seed: int
    adapter_site: str = "attention_output"


def default_conditioned_layers(num_layers: int) -> list[int]:
    """The paper's choice: every layer but the first two."""
    return list(range(2, num_layers))


def get_path(root: Any, dotted: str) -> Any:
    node = root
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def normalise_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    chosen = default_conditioned_layers(num_layers) if layers is None else list(layers)
    if not chosen:
        raise UserError(
            f"no layer to condition: the model has {num_layers} layers and the default skips "
            "the first two; pass conditioned_layers explicitly"
        )
    normalised = []
    for layer in chosen:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise UserError(f"conditioned layer {layer} does not exist (the model has {num_layers})")
        normalised.append(index)
    if len(set(normalised)) != len(normalised):
        raise UserError(f"conditioned_layers repeats a layer: {list(layers or [])}")
    return sorted(normalised)


def input_features(projection: nn.Module) -> int:
    """Width of the projection's input (``nn.Linear``, GPT-2 ``Conv1D`` or a LoRA wrapper)."""
    inner = getattr(projection, "base_layer", projection)
    if isinstance(inner, nn.Linear):
        return inner.in_features
    if hasattr(inner, "nf") and inner.weight.ndim == 2:  # transformers' Conv1D: weight [in, out]
        return int(inner.weight.shape[0])
    raise TypeError(f"cannot tell the input width of {type(inner).__name__}")


def inject_lora(base: nn.Module, settings: Any) -> None:
    """LoRA layers on `settings.lora_target_modules` (peft's family default when None); only they train."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = settings.lora_target_modules or DEFAULTS.get(settings.model_type)
    if not targets:
        raise UserError(f"no default LoRA target modules for {settings.model_type!r}; "
                        "set lora_target_modules")
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=settings.model_type == "gpt2",  # GPT-2's Conv1D stores weight as [in, out]
    )
    inject_adapter_in_model(lora, base)
    for name, param in base.named_parameters():
        param.requires_grad_("lora_" in name)
