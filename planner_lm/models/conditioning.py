"""Action-conditioned causal LM: any Hugging Face causal LM plus per-layer action adapters.

In each conditioned layer ``l`` the action mixture ``w_t`` (weights over the K actions, see
:mod:`planner_lm.models.selection`) becomes a vector ``e_t = w_t @ C_l`` (``C_l`` the layer's copy
of the k-means codebook) and ``W_l e_t + b_l`` is added to the *input* of the attention output
projection, i.e. to the merged attention heads before they are projected back into the residual
stream. This is the paper's adapter for GPT-2; the reference adds it to the input of OLMo's
feed-forward block instead (the normalised state before its first projection), which
``adapter_site="ffn_input"`` does for any family. Adapters are attached with forward pre-hooks,
so no model code is copied and every family listed in :data:`ADAPTER_TARGETS` works.

Without action weights the hooks do nothing and the output is bit-identical to the base model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from planner_lm.errors import UserError
from planner_lm.models.adapters import (ADAPTER_TARGETS, BASE_MODES, CONFIG_RULES, REQUIRED_KEYS,
                                        ConditioningSettings, check_options, get_path, inject_lora, input_features,
                                        normalise_layers)
from planner_lm.models.base_lm import load_base_lm, weights_fingerprint
from planner_lm.models.conditioned_files import (CONFIG_FILE, WEIGHTS_FILE, base_location, carried_base,
                                                  check_config_shapes, check_warm_start, write_conditioned_lm)
from planner_lm.models.hub import HUB_SETTINGS, HubArtefact, check_shapes, header_shapes, read_config

__all__ = ["BASE_MODES", "CONFIG_FILE", "ActionConditionedLM"]


class ActionConditionedLM(nn.Module, HubArtefact, **HUB_SETTINGS):
    """A Hugging Face causal LM whose chosen layers read an action mixture per token.

    Args:
        base: the causal LM (any family in :data:`ADAPTER_TARGETS`); modified in place (its
            parameters' ``requires_grad`` set by ``base_mode``, LoRA layers injected for "lora").
        codebook: ``[K, D]`` action vectors (the k-means centroids) used to initialise the
            codebook(s).
        conditioned_layers: block indices that get an adapter; ``None`` = all but the first two
            (the paper); negative indices count from the end.
        per_layer_codebook: one trainable codebook copy per conditioned layer (the authors'
            default: the copies drift apart) instead of one shared codebook.
        train_codebook: whether the codebook starts trainable (see :meth:`set_codebook_trainable`
            to unfreeze it later).
        base_mode: "frozen" (paper: only adapters and codebook train), "lora" or "full".
        lora_r: LoRA rank (base_mode "lora").
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout inside LoRA layers.
        lora_target_modules: module names LoRA wraps; ``None`` = peft's default for the family.
        adapter_seed: seed of the adapters' Xavier-normal initialisation (independent of the
            global RNG, so the same seed gives the same adapters).
        adapter_site: `attention_output` (the input of the attention output projection, the
            reference's GPT-2 adapter) or `ffn_input` (the input of the feed-forward block, its
            OLMo adapter).
        base_reference: how a saved copy refers to the base (hub name, preset or directory);
            defaults to ``base.name_or_path``.
        conditioning: `paper` (Xavier adapters on the raw action embedding: the reference) or
            `residual` (a shared per-layer shift plus a zero-initialised adapter on the centred
            action embedding, see :data:`CONDITIONINGS`).
        residual_rank: with `residual`, r > 0 sends the centred action embedding through one
            projection to r dimensions shared by every layer before each layer's adapter, so
            neighbouring actions share strength; 0 = a full-width adapter per layer.
    """

    def __init__(
        self,
        base: PreTrainedModel,
        codebook: Tensor,
        conditioned_layers: Sequence[int] | None = None,
        per_layer_codebook: bool = True,
        train_codebook: bool = True,
        base_mode: str = "frozen",
        lora_r: int = 8,
        lora_alpha: int = 32,
        lora_dropout: float = 0.01,
        lora_target_modules: Sequence[str] | None = None,
        adapter_seed: int = 0,
        base_reference: str | None = None,
        adapter_site: str = "attention_output",
        conditioning: str = "paper",
        residual_rank: int = 0,
    ) -> None:
        super().__init__()
        model_type = base.config.model_type
        check_options(model_type, base_mode, adapter_site, conditioning, residual_rank)
        self._hub_mixin_config = None  # the JSON config is ours (conditioning_config.json), not the mixin's
        if codebook.ndim != 2:
            raise ValueError(f"codebook must be [num_actions, action_dim], got {tuple(codebook.shape)}")
        target = ADAPTER_TARGETS[model_type]
        blocks = get_path(base, target.layers)
        layers = normalise_layers(conditioned_layers, len(blocks))

        self.base = base
        self.base_reference = base_reference if base_reference is not None else base.name_or_path
        self.settings = ConditioningSettings(
            model_type=model_type,
            conditioned_layers=layers,
            num_actions=int(codebook.shape[0]),
            action_dim=int(codebook.shape[1]),
            per_layer_codebook=per_layer_codebook,
            train_codebook=train_codebook,
            base_mode=base_mode,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=list(lora_target_modules) if lora_target_modules else None,
            adapter_seed=adapter_seed,
            adapter_site=adapter_site,
            conditioning=conditioning,
            residual_rank=residual_rank,
        )
        self._action_weights: Tensor | None = None
        self._base_fingerprint: str | None = None

        # "frozen"/"lora" never change the base weights, so its fingerprint is taken lazily
        # at save time (weights_fingerprint ignores LoRA layers and their renaming)
        base.requires_grad_(base_mode == "full")
        if base_mode == "lora":
            inject_lora(base, self.settings)

        device = next(base.parameters()).device
        num_books = len(layers) if per_layer_codebook else 1
        books = codebook.detach().float().to(device).unsqueeze(0).repeat(num_books, 1, 1)
        self.codebook = nn.Parameter(books, requires_grad=train_codebook)
        residual = conditioning == "residual"
        # the residual design subtracts the centroids' mean, so the code-independent part of every
        # action lives in the adapters' biases (trained by every token) and not in their weights
        if residual:
            self.register_buffer("code_centre", books.mean(dim=1))
        else:
            self.code_centre: Tensor | None = None
        generator = torch.Generator().manual_seed(adapter_seed)
        self.code_projection: nn.Linear | None = None
        adapter_input = self.settings.action_dim
        if residual_rank:
            self.code_projection = nn.Linear(self.settings.action_dim, residual_rank, bias=False).to(device)
            nn.init.orthogonal_(self.code_projection.weight, generator=generator)
            adapter_input = residual_rank
        self.adapters = nn.ModuleList()
        self._hooks = []
        self._sites: list[nn.Module] = []  # plain list: the modules belong to the base, not to this wrapper
        for slot, layer in enumerate(layers):
            site = get_path(blocks[layer], target.site(adapter_site))
            self._sites.append(site)
            width = input_features(site) if adapter_site == "attention_output" else int(base.config.hidden_size)
            adapter = nn.Linear(adapter_input, width)
            if residual:  # the plan starts at exactly zero and matters only as far as it earns it
                nn.init.zeros_(adapter.weight)
            else:
                nn.init.xavier_normal_(adapter.weight, generator=generator)
            nn.init.zeros_(adapter.bias)
            self.adapters.append(adapter.to(device))
            self._hooks.append(site.register_forward_pre_hook(self._make_hook(slot)))

    # ------------------------------------------------------------------ forward
    @property
    def config(self) -> Any:
        """The base model's config (``vocab_size``, ``model_type``, ...)."""
        return self.base.config

    @property
    def num_actions(self) -> int:
        return self.settings.num_actions

    def blocks(self) -> list[nn.Module]:
        """The base's transformer blocks (the units FSDP shards and activation checkpointing wraps)."""
        return list(get_path(self.base, ADAPTER_TARGETS[self.settings.model_type].layers))

    @property
    def conditioned_layers(self) -> list[int]:
        return list(self.settings.conditioned_layers)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        action_weights: Tensor | None = None,
        labels: Tensor | None = None,
        **hf_kwargs: Any,
    ) -> Any:
        """Run the base LM conditioned on ``action_weights`` ``[B, T, K]`` (or ``[B, 1, K]``,
        broadcast over positions); ``None`` = the plain base model, bit for bit.

        With ``past_key_values`` the weights cover only the new positions. Returns the base
        model's ``CausalLMOutput`` (with ``loss`` when ``labels`` are given).
        """
        with self.conditioned(action_weights):
            return self.base(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **hf_kwargs
            )

    @contextlib.contextmanager
    def conditioned(self, action_weights: Tensor | None) -> Iterator[None]:
        """Condition every call of ``self.base`` inside the block (e.g. ``base.generate``)."""
        if action_weights is not None:
            if action_weights.ndim != 3 or action_weights.shape[-1] != self.num_actions:
                raise ValueError(
                    f"action_weights must be [batch, positions, {self.num_actions}], got "
                    f"{tuple(action_weights.shape)}"
                )
        # with activation checkpointing the blocks run again in backward, after this block ends:
        # they must read the same weights then, so training keeps them until the next forward
        keep = action_weights is not None and _checkpointing(self.base) and torch.is_grad_enabled()
        previous, self._action_weights = self._action_weights, action_weights
        try:
            yield
        finally:
            if not keep:
                self._action_weights = previous

    @torch.no_grad()
    def generate(self, input_ids: Tensor, action_weights: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``base.generate`` with one action mixture per sequence (``[B, 1, K]``) or none."""
        with self.conditioned(action_weights):
            return self.base.generate(input_ids=input_ids, **kwargs)

    def sites(self) -> list[nn.Module]:
        """The module of each conditioned layer whose input receives the action (one per slot)."""
        return list(self._sites)

    def layer_codebook(self, slot: int) -> Tensor:
        """The codebook ``[K, D]`` used by the ``slot``-th conditioned layer."""
        return self.codebook[slot if self.settings.per_layer_codebook else 0]

    def _make_hook(self, slot: int) -> Any:
        def add_action(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            weights = self._action_weights
            if weights is None:
                return None
            hidden = args[0]
            if weights.shape[1] not in (1, hidden.shape[1]) or weights.shape[0] not in (1, hidden.shape[0]):
                raise ValueError(
                    f"action_weights cover {tuple(weights.shape[:2])} (batch, positions) but the "
                    f"model runs on {tuple(hidden.shape[:2])}; with past_key_values give weights "
                    "for the new positions only"
                )
            return (hidden + self.action_shift(slot, weights).to(hidden.dtype), *args[1:])

        return add_action

    def action_shift(self, slot: int, weights: Tensor) -> Tensor:
        """What the ``slot``-th conditioned layer adds for action mixtures ``weights`` ``[..., K]``."""
        action = weights.to(self.codebook.dtype) @ self.layer_codebook(slot)
        if self.code_centre is not None:
            # mixtures sum to 1, so this is the mixture of centred actions
            action = action - self.code_centre[slot if self.settings.per_layer_codebook else 0]
        if self.code_projection is not None:
            action = self.code_projection(action)
        return self.adapters[slot](action)

    # ------------------------------------------------------------------ parameters
    def set_codebook_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the codebook(s) (e.g. from a callback at step N)."""
        self.codebook.requires_grad_(trainable)

    def codebook_parameters(self) -> list[nn.Parameter]:
        return [self.codebook]

    def adapter_parameters(self) -> list[nn.Parameter]:
        projection = [] if self.code_projection is None else list(self.code_projection.parameters())
        return [*self.adapters.parameters(), *projection]

    def shared_shift_parameters(self) -> list[nn.Parameter]:
        """The adapters' biases: each layer's code-independent shift (every token trains it)."""
        return [adapter.bias for adapter in self.adapters]

    def base_trainable_parameters(self) -> list[nn.Parameter]:
        """Base-model parameters that train in this ``base_mode`` (LoRA layers or all)."""
        return [p for p in self.base.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_dir: str | os.PathLike, tokenizer: Any = None, *, include_base: bool = False,
                        **hub_kwargs: Any) -> Path:
        """Write adapters, codebook(s) (and LoRA layers), a JSON config and a model card to ``save_dir``
        (``push_to_hub=True, repo_id=...`` also uploads it).

        The base model is referenced by name/path and fingerprint; its weights are written to
        ``save_dir/base`` only when they trained ("full"), have no loadable reference, or
        ``include_base`` asks for a self-contained folder (e.g. to share a base that is a local
        directory). A ``tokenizer`` given here is saved alongside, so the folder is self-contained
        for ``from_pretrained`` + ``AutoTokenizer.from_pretrained(save_dir)``.
        """
        outer = getattr(self, "_pending_save", None)  # push_to_hub saves again: keep what the outer call asked
        self._pending_save = (tokenizer, include_base) if outer is None or tokenizer is not None else outer
        try:
            super().save_pretrained(save_dir, **hub_kwargs)
        finally:
            self._pending_save = outer
        return Path(save_dir)

    def _save_pretrained(self, save_dir: Path) -> None:
        tokenizer, include_base = getattr(self, "_pending_save", None) or (None, False)
        write_conditioned_lm(self, save_dir, tokenizer, include_base)

    @classmethod
    def from_pretrained(
        cls,
        save_dir: str | os.PathLike,
        base: PreTrainedModel | None = None,
        *,
        check_fingerprint: bool = True,
        dtype: torch.dtype | str | None = None,
        **hub_kwargs: Any,
    ) -> "ActionConditionedLM":
        """Load a conditioned LM saved with :meth:`save_pretrained` (no Lightning needed).

        Args:
            save_dir: the folder written by ``save_pretrained``, or a Hub repository id (only
                JSON, safetensors and tokenizer text files are fetched: `planner_lm.models.hub`).
            base: an already loaded base model to wrap instead of loading the reference.
            check_fingerprint: refuse a referenced base whose weights changed since saving.
            dtype: load the base in this dtype (adapters stay float32).
            hub_kwargs: `revision`, `cache_dir`, `token`, ... of the Hub download.
        """
        source = cls.fetch(save_dir, subfolders=carried_base, **hub_kwargs)  # a clone or cache gets a download's checks
        save_dir = source.folder
        config_path = save_dir / CONFIG_FILE
        if not config_path.is_file():
            raise UserError(f"{save_dir} holds no conditioned LM ({CONFIG_FILE} missing)")
        config = read_config(config_path, CONFIG_RULES, REQUIRED_KEYS)
        settings = ConditioningSettings(**{k: config[k] for k in ConditioningSettings.__dataclass_fields__ if k in config})
        stated = header_shapes(save_dir / WEIGHTS_FILE)
        check_config_shapes(save_dir / WEIGHTS_FILE, stated, asdict(settings))  # before a base is fetched
        if base is None:
            base = load_base_lm(base_location(source, config, hub_kwargs), dtype=dtype)
        expected = config.get("base_fingerprint")
        if check_fingerprint and expected and weights_fingerprint(base) != expected:
            raise UserError(
                f"the base LM {config['base']!r} differs from the one {save_dir} was trained on "
                "(weights fingerprint mismatch); restore that base or retrain the conditioned LM"
            )
        codebook = torch.zeros(settings.num_actions, settings.action_dim)  # its values are copied in below
        rebuild = {k: v for k, v in asdict(settings).items() if k not in ("model_type", "num_actions", "action_dim")}
        model = cls(base, codebook, base_reference=config["base"] if not config["base_saved"] else "", **rebuild)
        if config["base_saved"]:
            model._base_fingerprint = None
        else:
            model._base_fingerprint = expected
            model.base_reference = config["base"]
        expected = {k: tuple(v.shape) for k, v in model._trained_state().items()}
        if settings.base_mode == "lora":
            expected.update({f"lora.{k}": tuple(v.shape) for k, v in model.base.state_dict().items() if "lora_" in k})
        check_shapes(save_dir / WEIGHTS_FILE, stated, expected)
        state = load_file(str(save_dir / WEIGHTS_FILE))
        model._load_trained(state, save_dir)
        return model

    def warm_start(self, save_dir: str | os.PathLike) -> None:
        """Start from the adapters, codebook(s) and LoRA layers of a saved conditioned LM (e.g. the
        `pred` run: the reference's joint training starts from the LM trained on the frozen planner's
        predictions). Refuses one made for another base, k, codebook dimension or set of layers."""
        save_dir = Path(save_dir)
        if self._base_fingerprint is None:
            self._base_fingerprint = weights_fingerprint(self.base)  # frozen/lora: the base never changes
        check_warm_start(save_dir, asdict(self.settings), self._base_fingerprint)
        self._load_trained(load_file(str(save_dir / WEIGHTS_FILE)), save_dir)

    def _load_trained(self, state: dict[str, Tensor], save_dir: Path) -> None:
        """Copy saved codebook(s), adapters and LoRA layers into this model."""
        device = self.codebook.device
        with torch.no_grad():
            for name, tensor in self._trained_state().items():
                tensor.copy_(state[name].to(device))
            lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
            if lora:
                missing = set(lora) - set(self.base.state_dict())
                if missing:
                    raise UserError(f"{save_dir} has LoRA weights the rebuilt model lacks: {sorted(missing)[:3]}")
                self.base.load_state_dict(lora, strict=False)

    def _trained_state(self) -> dict[str, Tensor]:
        """The tensors a saved conditioned LM carries besides LoRA layers, by their file names."""
        state = {"codebook": self.codebook}
        state.update({f"adapters.{k}": v for k, v in self.adapters.state_dict(keep_vars=True).items()})
        if self.code_centre is not None:
            state["code_centre"] = self.code_centre
        if self.code_projection is not None:
            state["code_projection.weight"] = self.code_projection.weight
        return state


# ----------------------------------------------------------------------------- helpers
def _checkpointing(model: PreTrainedModel) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if flag is not None else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))

