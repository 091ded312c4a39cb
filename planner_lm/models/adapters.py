"""Where action adapters attach inside each Hugging Face model family, and the LoRA option.

The conditioned LM (`planner_lm.models.conditioning`) hooks one small adapter per chosen block;
this module knows the blocks' paths per family (`ADAPTER_TARGETS`: add a family with one line),
the two sites an action can enter (`ADAPTER_SITES`), which layers the paper conditions, the
settings that rebuild a conditioned LM (and what their saved JSON may hold), and how LoRA layers are injected when the base trains
through LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from planner_lm.errors import UserError
from planner_lm.models.hub import ConfigRules, flag, integer, list_of, number, one_of, optional, text

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
    conditioning: str = "paper"
    residual_rank: int = 0


CONDITIONINGS: tuple[str, ...] = ("paper", "residual")
"""How an action mixture becomes each layer's shift. `paper`: ``W_l (w @ C_l) + b_l`` with ``W_l``
Xavier-initialised (the reference: every code moves every layer from step 0). `residual`: ``b_l +
W_l (w @ C_l - m)`` with ``W_l`` zero-initialised and ``m`` the mean of the k-means centroids: the
bias is a code-independent shift every token trains, and the plan only adds a centred, initially
zero residual on top of it, so at step 0 every code source gives the same model."""


BASE_MODES: tuple[str, ...] = ("frozen", "lora", "full")
"""How the base LM's own weights train: not at all (paper), through LoRA, or fully."""

FORMAT = "planner-lm/action-conditioned-lm"
FORMAT_VERSION = 1
"""What a saved conditioned LM's `conditioning_config.json` says it is."""
MAX_LAYERS, MAX_ACTIONS, MAX_WIDTH = 1024, 1 << 16, 1 << 16

CONFIG_RULES: ConfigRules = {
    "format": one_of(FORMAT), "format_version": one_of(FORMAT_VERSION), "base": text(), "base_relative": optional(text()),
    "base_saved": flag(), "base_fingerprint": optional(text(64)), "model_type": one_of(*ADAPTER_TARGETS),
    "conditioned_layers": list_of(integer(-MAX_LAYERS, MAX_LAYERS - 1), MAX_LAYERS),
    "num_actions": integer(1, MAX_ACTIONS), "action_dim": integer(1, MAX_WIDTH), "per_layer_codebook": flag(),
    "train_codebook": flag(), "base_mode": one_of(*BASE_MODES), "lora_r": integer(1, 4096),
    "lora_alpha": number(0, 1e6), "lora_dropout": number(0.0, 1.0), "lora_target_modules": optional(list_of(text(256), 64)),
    "adapter_seed": integer(0, 2**63 - 1), "adapter_site": one_of(*ADAPTER_SITES),
    "conditioning": one_of(*CONDITIONINGS), "residual_rank": integer(0, MAX_WIDTH),
}
"""What `conditioning_config.json` may hold (checked before anything is built from it)."""
REQUIRED_KEYS = ("format", "format_version", "base", "base_saved", "model_type", "conditioned_layers", "num_actions",
                 "action_dim", "per_layer_codebook", "train_codebook", "base_mode", "lora_r", "lora_alpha",
                 "lora_dropout", "adapter_seed")


def check_options(model_type: str, base_mode: str, adapter_site: str, conditioning: str, residual_rank: int) -> None:
    """One line for each setting a conditioned LM cannot be built with."""
    if model_type not in ADAPTER_TARGETS:
        raise UserError(f"model type {model_type!r} has no known adapter location; supported: "
                        f"{', '.join(sorted(ADAPTER_TARGETS))} (add it to ADAPTER_TARGETS in planner_lm/models/adapters.py)")
    if base_mode not in BASE_MODES:
        raise UserError(f"base_mode must be one of {', '.join(BASE_MODES)}, got {base_mode!r}")
    if adapter_site not in ADAPTER_SITES:
        raise UserError(f"adapter_site must be one of {', '.join(ADAPTER_SITES)}, got {adapter_site!r}")
    if conditioning not in CONDITIONINGS:
        raise UserError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
    if residual_rank < 0 or (residual_rank and conditioning != "residual"):
        raise UserError(f"residual_rank must be >= 0 and needs conditioning residual, got {residual_rank} "
                        f"with {conditioning}")


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
