"""CLIP: a ViT image tower and a causal byte-level text transformer trained contrastively.

``encode_image``/``encode_text`` give L2-normalised (N, embed_dim) embeddings; ``clip_loss`` is the
symmetric InfoNCE of Radford et al. The distributed form (``clip_loss(..., gathered=True)``)
all-gathers both towers' features from every rank with gradients flowing back
(``torch.distributed.nn.functional.all_gather``) and scores this rank's rows against the global
batch, as OpenCLIP's ``local_loss``: each rank holds an (n, N) logit block, not the (N, N) matrix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.tokenizer import Tokenizer
from models.vit import LAYER_NORM_EPS, VIT_SIZES, Block, VisionTransformer, init_transformer_weights

__all__ = ["CLIP", "clip_loss", "save_clip", "load_clip", "TextTransformer"]

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class TextTransformer(nn.Module):
    """Token + learned position embeddings, causal pre-LN blocks, final LN, pooled at EOT."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, num_heads: int, eot_id: int):
        super().__init__()
        self.eot_id = eot_id
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.blocks.apply(init_transformer_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) ids → (N, width): the final-normed hidden state at each row's EOT."""
        if tokens.shape[1] != self.context_length:
            raise ValueError(f"expected {self.context_length} tokens per text, got {tokens.shape[1]}")
        x = self.token_embed(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # argmax over (ids == EOT) finds the first EOT; a row without one (never from Tokenizer) pools the last token.
        is_eot = tokens == self.eot_id
        where = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
        return x[torch.arange(x.shape[0], device=x.device), where]


class CLIP(nn.Module):
    """Image tower (``VisionTransformer``, class-token pooled) + text tower, linear projections to a
    shared ``embed_dim``, and a learned temperature ``logit_scale`` (log(1/0.07), clamped to ln 100)."""

    def __init__(self, embed_dim: int = 64, image_size: int = 28, patch_size: int = 4, in_chans: int = 1,
                 vision_size: str = "nano", vision_width: int | None = None, vision_depth: int | None = None,
                 vision_heads: int | None = None, context_length: int = 64, vocab_size: int = Tokenizer.vocab_size,
                 eot_id: int = Tokenizer.eot, text_width: int = 64, text_depth: int = 2, text_heads: int = 4):
        super().__init__()
        size = VIT_SIZES[vision_size] if vision_size in VIT_SIZES else None
        if size is None:
            raise ValueError(f"unknown vision_size {vision_size!r}; valid sizes: {', '.join(VIT_SIZES)}")
        self.visual = VisionTransformer(
            img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=vision_width or size.embed_dim, depth=vision_depth or size.depth,
            num_heads=vision_heads or size.num_heads, mlp_ratio=size.mlp_ratio, global_pool="token")
        self.text = TextTransformer(vocab_size, context_length, text_width, text_depth, text_heads, eot_id)
        self.image_proj = nn.Linear(self.visual.embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.visual.embed_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.embed_dim = embed_dim

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "text.pos_embed", "text.token_embed.weight"} | {f"visual.{n}" for n in self.visual.no_weight_decay()}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              gathered: bool | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over image→text and text→image logits (mean of the two).

    ``logit_scale`` is the multiplier (already exponentiated, as ``CLIP.forward`` returns it).
    ``gathered``: None → distributed when a process group with more than one rank is initialised;
    True/False forces it. Distributed: features of every rank are all-gathered with gradients, this
    rank's n rows are scored against all N columns, and the labels are offset by rank * n. Every rank
    must hold the same n. The result is this rank's mean; DDP's gradient averaging over ranks then
    gives exactly the gradient of the single-process loss over the global batch.
    """
    import torch.distributed as dist

    if gathered is None:
        gathered = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    n = image_features.shape[0]
    if gathered:
        from torch.distributed.nn.functional import all_gather

        all_images = torch.cat(all_gather(image_features), dim=0)
        all_texts = torch.cat(all_gather(text_features), dim=0)
        offset = dist.get_rank() * n
    else:
        all_images, all_texts, offset = image_features, text_features, 0
    logits_per_image = logit_scale * image_features @ all_texts.T  # (n, N)
    logits_per_text = logit_scale * text_features @ all_images.T  # (n, N)
    labels = torch.arange(n, device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


REQUIRED_INFO = ("image_size", "channels", "mean", "std", "embed_dim", "context_length", "model_kwargs")


def save_clip(path: str | Path, model: CLIP, tokenizer: Tokenizer, info: dict[str, Any]) -> None:
    """Weights, tokenizer state and ``info`` (geometry, normalisation, constructor kwargs) in one file,
    loadable with plain torch (``weights_only=True``)."""
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"save_clip: info lacks {missing}")
    payload = {"format": "patchflow-clip/1", "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "tokenizer": tokenizer.state(), "info": info}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_clip(path: str | Path, map_location: str = "cpu") -> tuple[CLIP, Tokenizer, dict[str, Any]]:
    """The model (eval mode), its tokenizer and the info saved with it."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is named, whatever torch raised
        raise ValueError(f"{path}: not a readable CLIP file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != "patchflow-clip/1":
        raise ValueError(f"{path}: not a patchflow CLIP file")
    info = payload["info"]
    model = CLIP(**info["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, Tokenizer.from_state(payload["tokenizer"]), info
