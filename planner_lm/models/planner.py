"""The planner: predicts the writing action of the next sentence from the sentences before it.

It reads the *cached* embeddings of the previous sentences (the sentence encoder is frozen, so
re-encoding text at every step, as the reference implementation does, buys nothing). Per example:

1. the previous <= S sentence vectors plus one learned "document start" vector;
2. a linear projection to `model_dim` and a learned embedding of each vector's distance to the
   target sentence (1 = the sentence right before it). The position table starts with a small
   standard deviation (about a tenth of the norm of a projected unit-norm sentence vector), so
   positions tell the encoder *where* a sentence is without drowning *what* it says (the
   reference's sinusoidal positions have ~20x the norm of the content);
3. `num_layers` transformer encoder layers (pre-LN), read out as a masked mean over the valid
   vectors (`pooling="mean"`, the reference's choice) or at the slot of the sentence right before
   the target (`pooling="last"`);
4. a policy head over the k actions whose weights start as the k-means centroids; the input
   projection starts as the identity (when the widths match), so the head reads the context in
   the space the centroids live in.

Measured with `bench/bench_planner_quality.py` (test top-1 minus "copy the previous sentence's
action"): reading out at the previous sentence did not beat the mean (demo corpus +3.5 vs +4.4
points, long documents +1.6 vs +3.5), and a "copy prior" on the logits made it worse; what made
the planner lose to copying was training at 10x the paper's learning rate for two epochs (one
epoch of 1e-3 already overfits: +1.3 and +1.7 points). See README, "The pretrain-planner stage".

Plain torch only: the Lightning wrapper lives in `planner_lm.lit.planner`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from planner_lm.errors import UserError
from planner_lm.models.hub import (HUB_SETTINGS, ConfigRules, HubArtefact, check_shapes, header_shapes, integer,
                                   number, one_of, optional, read_config, text_map)

PLANNER_DIR = "planner"
"""The planner's folder inside a stage directory: `config.json`, `model.safetensors`, `README.md`."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Wikipedia sentences average ~25 GPT-2 tokens, so 6 previous sentences cover about the
# 128-token context window of the paper (whose first sentence is usually truncated).
DEFAULT_CONTEXT_SENTENCES = 6

POOLINGS = ("mean", "last")
"""How the context is read out: averaged over all slots (the reference), or at the previous sentence's slot."""

CONFIG_RULES: ConfigRules = {
    "embedding_dim": integer(1, 1 << 16), "num_actions": integer(1, 1 << 16), "context_sentences": integer(0, 4096),
    "model_dim": optional(integer(1, 1 << 16)), "num_layers": integer(0, 64), "num_heads": integer(1, 256),
    "ffn_dim": integer(1, 1 << 18), "dropout": number(0.0, 1.0), "pooling": one_of(*POOLINGS), "upstream": text_map(),
}
"""What a saved planner's `config.json` may hold (checked before anything is built from it)."""


class Planner(nn.Module, HubArtefact, **HUB_SETTINGS):
    """Next-action policy over cached sentence embeddings.

    Args:
        embedding_dim: dimension of the cached sentence embeddings (from the embed stage).
        num_actions: number of writing actions k (from the cluster stage).
        context_sentences: how many previous sentences of the document the planner sees (S).
        model_dim: width of the transformer; defaults to `embedding_dim`.
        num_layers: number of transformer encoder layers.
        num_heads: attention heads per layer (must divide `model_dim`).
        ffn_dim: hidden size of each layer's feed-forward block.
        dropout: dropout inside the encoder layers.
        pooling: `mean` (masked mean over the context, as the reference) or `last` (read out at
            the sentence right before the target).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_actions: int,
        context_sentences: int = DEFAULT_CONTEXT_SENTENCES,
        model_dim: int | None = None,
        num_layers: int = 1,
        num_heads: int = 2,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        model_dim = model_dim or embedding_dim
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if embedding_dim <= 0 or num_actions <= 0 or context_sentences < 0 or num_layers < 0:
            raise ValueError(
                f"Planner needs positive embedding_dim/num_actions and non-negative "
                f"context_sentences/num_layers, got {embedding_dim=}, {num_actions=}, "
                f"{context_sentences=}, {num_layers=}"
            )
        if model_dim % num_heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by num_heads {num_heads}")
        self.config: dict[str, Any] = dict(
            embedding_dim=embedding_dim,
            num_actions=num_actions,
            context_sentences=context_sentences,
            model_dim=model_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            pooling=pooling,
        )
        self.pooling = pooling
        self.embedding_dim = embedding_dim
        self.num_actions = num_actions
        self.context_sentences = context_sentences
        self.upstream: dict[str, Any] = {}  # manifest hashes of the stages it was trained from

        # Stands for "the document starts here"; unit-norm-ish like a real sentence vector.
        self.doc_start = nn.Parameter(torch.randn(embedding_dim) / embedding_dim**0.5)
        self.input_proj = nn.Linear(embedding_dim, model_dim)
        # Distance d to the target sentence (1..S for sentences, up to S+1 for the start vector)
        # is stored at row d-1.
        self.positions = nn.Embedding(context_sentences + 1, model_dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                model_dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True
            )
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(model_dim)
        # The head lives in the embedding space so it can start as the k-means codebook.
        self.output_proj = nn.Identity() if model_dim == embedding_dim else nn.Linear(model_dim, embedding_dim)
        self.head = nn.Linear(embedding_dim, num_actions)
        self.reset_position_scale()
        if model_dim == embedding_dim:
            # the head starts in the embedding space (centroids): let the context arrive there
            # unscrambled instead of through a random projection
            with torch.no_grad():
                self.input_proj.weight.copy_(torch.eye(model_dim))
                self.input_proj.bias.zero_()

    def set_dropout(self, p: float) -> None:
        """Every dropout of the encoder: the `nn.Dropout` modules and the attention-probability
        dropout, which `nn.MultiheadAttention` keeps as a plain float attribute."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, nn.MultiheadAttention):
                module.dropout = p

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_position_scale(self, fraction: float = 0.1) -> None:
        """Initialise positions at `fraction` of the typical norm of a projected sentence vector.

        A unit-norm input through the default-initialised projection has a norm of about
        `sqrt(model_dim / (3 * embedding_dim))`; positions start at a tenth of that.
        """
        model_dim = self.positions.embedding_dim
        content_norm = (model_dim / (3.0 * self.embedding_dim)) ** 0.5
        self.positions.weight.normal_(0.0, fraction * content_norm / model_dim**0.5)

    @torch.no_grad()
    def init_head_from_centroids(self, centroids: Tensor) -> None:
        """Start the policy head as the k-means codebook (one row per action); bias zero."""
        centroids = torch.as_tensor(centroids)
        expected = (self.num_actions, self.embedding_dim)
        if tuple(centroids.shape) != expected:
            raise ValueError(f"centroids have shape {tuple(centroids.shape)}, the planner expects {expected}")
        self.head.weight.copy_(centroids.to(self.head.weight))
        self.head.bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, context: Tensor, mask: Tensor) -> Tensor:
        """Logits over the k actions for the sentence that follows each context.

        Args:
            context: `[B, S', D]` embeddings of previous sentences, oldest first (S' <= S).
                `planner_lm.data.contexts.gather_contexts` right-aligns them (the sentence just
                before the target in the last slot), but any layout works as long as valid
                slots keep document order: distances are counted from the mask.
            mask: `[B, S']` True where the slot holds a real previous sentence. A row with no
                valid slot (the first sentence of a document) sees only the start vector.

        Returns:
            `[B, k]` logits.
        """
        if context.dim() != 3 or mask.shape != context.shape[:2]:
            raise ValueError(f"expected context [B,S,D] and mask [B,S], got {tuple(context.shape)} and {tuple(mask.shape)}")
        if context.shape[1] > self.context_sentences:
            raise ValueError(f"context has {context.shape[1]} sentences, the planner was built for at most {self.context_sentences}")
        batch = context.shape[0]
        mask = mask.bool()
        start = self.doc_start.to(context.dtype).expand(batch, 1, -1)
        tokens = torch.cat([start, context], dim=1)  # [B, 1+S', D]
        valid = torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        # distance of each valid vector to the target = number of valid vectors from it onwards
        distance = valid.flip(1).long().cumsum(1).flip(1)
        # the start vector sits just before the oldest valid sentence
        distance = distance.clamp(min=1) - 1
        x = self.input_proj(tokens) + self.positions(distance)
        padding = ~valid
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        x = self.final_norm(x)
        if self.pooling == "last":
            # the newest valid slot: the previous sentence, or the start vector at a document start
            newest = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(1)
            pooled = x[torch.arange(batch, device=x.device), newest]
        else:
            weights = valid.to(x.dtype).unsqueeze(-1)
            pooled = (x * weights).sum(1) / weights.sum(1)
        return self.head(self.output_proj(pooled))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, upstream: dict[str, Any] | None = None,
                        **hub_kwargs: Any) -> Path:
        """Write the planner folder (weights as safetensors, constructor kwargs and the upstream
        manifest hashes as JSON, a model card); `push_to_hub=True, repo_id=...` also uploads it."""
        if upstream is not None:
            self.upstream = dict(upstream)
        super().save_pretrained(save_directory, **hub_kwargs)
        return Path(save_directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(save_directory / WEIGHTS_FILE))
        config = {**self.config, "upstream": self.upstream}
        (save_directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **hub_kwargs: Any) -> Planner:
        """A planner from its folder, a stage directory holding one, or a Hub repository id."""
        path = Path(pretrained)
        if (path / PLANNER_DIR / CONFIG_FILE).is_file():
            path = path / PLANNER_DIR
        if path.exists() and not (path / CONFIG_FILE).is_file():
            raise UserError(f"no planner at {path}; run `make pretrain-planner` first")
        return cls._load_folder(cls.local_folder(path if path.exists() else str(pretrained), **hub_kwargs))

    @classmethod
    def _load_folder(cls, folder: Path) -> Planner:
        if (folder / PLANNER_DIR / CONFIG_FILE).is_file():  # a repository holding the planner beside an LM
            folder = folder / PLANNER_DIR
        config = read_config(folder / CONFIG_FILE, CONFIG_RULES, required=("embedding_dim", "num_actions"))
        upstream = config.pop("upstream", {})
        weights = folder / WEIGHTS_FILE
        stated = header_shapes(weights)
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated before they match the file
                shell = cls(**config)
        except ValueError as err:
            raise UserError(f"{folder / CONFIG_FILE}: {err}") from err
        check_shapes(weights, stated, {name: tuple(t.shape) for name, t in shell.state_dict().items()})
        planner = cls(**config)
        planner.load_state_dict(load_file(str(weights)))
        planner.upstream = upstream
        return planner
