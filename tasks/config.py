"""One typed config system for every stage and every preset.

Presets are YAML files in ``configs/presets``; each is validated against :class:`PipelineConfig`,
so an unknown key or a bad value fails with the dotted path of the field before any work starts.
Command-line overrides (``mae.train.steps=50``) are merged into the preset before validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models.sizes import MAE_DECODER_SIZES, VIT_SIZES, parse_dit_name

from data_shards.errors import BadInputError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
DATA_ROOT_ENV = "PATCHFLOW_DATA_ROOT"
DEFAULT_DATA_ROOT = ".patchflow"
# Every VAE here (TAEF2 and the small one trained in its place) maps H x W images to H/8 x W/8 latents.
VAE_DOWNSAMPLE = 8


class ConfigError(BadInputError, ValueError):
    """A preset, override or config file that does not validate; the message names the field."""

    default_hint = ("correct the value named above (--set dotted.key=value); "
                    "`patchflow config --preset NAME` prints every field")


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(choice, bool) for choice in get_args(annotation))
    return any(_takes_bool(argument) for argument in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value))


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic's lax mode reads true as 1 and false as 0, so `--set mae.train.steps=true` would
        # train one step; a boolean is only accepted where the field itself is a boolean.
        annotation = cls.model_fields[info.field_name].annotation
        if _holds_bool(value) and not _takes_bool(annotation):
            shown = "true" if value is True else "false" if value is False else f"a boolean in {value!r}"
            raise ValueError(f"expected {_type_name(annotation)}, got {shown} (true/false are only for yes/no fields)")
        return value


class SourceConfig(StrictModel):
    """Where the images come from and how many of them to take."""

    kind: Literal["fashion_mnist", "image_folder", "caption_table", "webdataset"] = "fashion_mnist"
    path: str | None = Field(
        default=None,
        description="File or folder of the source; None lets fashion_mnist find or fetch its data.",
    )
    image_column: str = "file"
    caption_column: str = "name"
    caption_template: str = Field(
        default="{caption}",
        description="Python format string over the table's columns; {caption} is the caption column.",
    )
    label_column: str | None = None
    caption_templates: list[str] | None = Field(
        default=None, description="caption_table: several format strings per row; the caption stored is all of them "
                                  "joined by newlines, and training picks one at random each time it sees the pair.")
    split_group: Literal["none", "emoji"] = Field(
        default="none", description="caption_table: 'emoji' carves val by group so skin-tone/gender/hair variants of "
                                    "one emoji (same name before ':', same codepoints without modifiers) share a split.")
    emoji_column: str = "emoji"
    empty_captions: Literal["error", "keep"] = Field(
        default="error", description="caption_table: a blank caption is an error naming the row, or kept and counted.")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_train: int | None = Field(default=None, gt=0)
    max_val: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)


def _known_vit_size(name: str) -> str:
    """A ViT size name from models/sizes.py (one table for the config check and the model builders)."""
    if name not in VIT_SIZES or name not in MAE_DECODER_SIZES:
        raise ValueError(f"unknown ViT size {name!r}; allowed: {', '.join(VIT_SIZES)}")
    return name


class ShardConfig(StrictModel):
    """The sharding stage: source → WebDataset tar shards plus a manifest."""

    source: SourceConfig = SourceConfig()
    samples_per_shard: int = Field(default=2000, gt=0)
    max_shard_bytes: int = Field(default=64 * 2**20, gt=1024)
    seed: int = 0
    workers: int = Field(default=2, ge=1, description="Processes encoding/validating images.",
                         json_schema_extra={"execution_only": True})  # shards come out byte-identical
    output: str | None = Field(
        default=None, description="An object-store prefix (s3://bucket/path, gs://..., any writable fsspec URL) the "
        "shards are uploaded to, under the stage's key, each as it is finished and the manifest last; the stage "
        "folder keeps the manifest and training reads the shards from there. None: the shards stay in the stage folder.")

    @field_validator("output")
    @classmethod
    def _writable_location(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith(("http://", "https://", "pipe:")) or "://" not in value):
            raise ValueError(f"{value!r} is not an object-store prefix like s3://bucket/shards (HTTP is read-only; "
                             f"a local folder needs no output: the shards stay in the data root)")
        return value.rstrip("/") if value else value


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay (or a flat lr); lr = base_lr × global batch / 256
    under MAE's linear scaling rule, or base_lr as it is with ``lr_scaling: none``."""

    base_lr: float = Field(default=1.5e-4, gt=0)
    lr_scaling: Literal["linear", "none"] = Field(
        default="linear", description="linear: lr = base_lr × global batch / 256 (MAE); none: lr = base_lr.")
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="After warmup: cosine decay to min_lr, or the peak lr until the end.")
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(default=0, ge=0)
    clip_grad: float | None = Field(default=None, gt=0)
    accum_steps: int = Field(default=1, ge=1)


class TrainConfig(StrictModel):
    """Settings the shared training engine reads, for every training stage.

    Fields marked ``execution_only`` change how a run executes, not what it computes, and stay out of
    the stage key (tasks/stage.py), so changing one reuses finished outputs. num_workers changes which
    worker slot reads which shard, so batches are drawn in another (equally seeded) order: an equally
    valid run, not a bit-identical one, and not worth re-training for. nproc_per_node and nnodes are
    NOT marked: the global batch is batch_size × world size, which sets the learning rate.
    """

    batch_size: int = Field(default=64, gt=0, description="Per-process micro-batch size.")
    steps: int = Field(default=100, gt=0, description="Optimizer steps.")
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(
        default=False, description="torch.compile the model for the training loop (worth it on a GPU with a large "
                                   "model; the first steps pay for compilation, and it needs a C++ compiler on CPU).",
        json_schema_extra={"execution_only": True})
    checkpoint_every: int = Field(default=100, gt=0, json_schema_extra={"execution_only": True})
    keep_checkpoints: int = Field(default=2, ge=1, json_schema_extra={"execution_only": True})
    log_every: int = Field(default=10, gt=0, json_schema_extra={"execution_only": True})
    eval_every: int = Field(default=100, gt=0)
    num_workers: int = Field(default=1, ge=0, description="Loader worker processes per rank.",
                             json_schema_extra={"execution_only": True})
    shuffle_buffer: int = Field(default=1000, ge=0)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    ema_warmup: bool = Field(
        default=False, description="EMA decay at step t is min(ema_decay, (1 + t) / (10 + t)), so a short run "
                                   "does not export weights that are still mostly the random init.")
    nproc_per_node: int = Field(default=1, ge=1)
    nnodes: int = Field(default=1, ge=1)
    rdzv_endpoint: str | None = Field(default=None, json_schema_extra={"execution_only": True})


class MAEConfig(StrictModel):
    """Masked-autoencoder pretraining of a ViT encoder."""

    encoder_size: str = "nano"
    image_size: int = Field(default=28, gt=0)
    patch_size: int = Field(default=4, gt=0)
    decoder_embed_dim: int = Field(default=64, gt=0)
    decoder_depth: int = Field(default=2, ge=1)
    decoder_num_heads: int = Field(default=4, ge=1)
    mask_ratio: float = Field(default=0.75, gt=0.0, lt=1.0)
    norm_pix_loss: bool = True
    drop_path: float = Field(default=0.0, ge=0.0, lt=1.0)
    train: TrainConfig = TrainConfig()

    @field_validator("encoder_size")
    @classmethod
    def _known_encoder_size(cls, value: str) -> str:
        return _known_vit_size(value)

    @model_validator(mode="after")
    def _patches_tile_image(self) -> "MAEConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_num_heads "
                             f"{self.decoder_num_heads}")
        return self


class EvalConfig(StrictModel):
    """Linear probe, kNN and fine-tuning of a pretrained encoder, with baselines on the same split."""

    pool: Literal["token", "avg"] = "avg"
    feature_blocks: int = Field(
        default=1, gt=0, description="Probe/kNN features: pooled outputs of this many last encoder blocks, concatenated.")
    knn_k: int = Field(default=20, gt=0)
    knn_temperature: float = Field(default=0.07, gt=0)
    probe: Literal["logistic", "bn_linear"] = "logistic"
    probe_epochs: int = Field(default=100, gt=0)
    max_train_features: int | None = Field(default=None, gt=0, description="Cap on train images used for probe/kNN.")
    finetune: bool = True
    finetune_pool: Literal["token", "avg"] = Field(
        default="avg", description="Fine-tuned classifier's pooling: patch-token mean + fc_norm (MAE's recipe) or class token.")
    layer_decay: float = Field(default=0.75, gt=0, le=1)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    drop_path: float = Field(default=0.1, ge=0, lt=1)
    # Flip only: at these budgets (1-4 epochs of 28 px images) MAE's RandomResizedCrop(0.2, 1) costs more
    # than it regularises (demo, val split: 67.3% with crop+flip, 78.2% flip only; README, evaluate).
    finetune_augment: Literal["none", "flip", "crop_flip"] = Field(
        default="flip", description="Fine-tuning (and scratch) augmentation: none, horizontal flip, or MAE's crop + flip.")
    # betas (0.9, 0.999) as MAE's main_finetune.py; a preset that gives finetune_train.optim must repeat them,
    # or it gets pretraining's (0.9, 0.95) from OptimConfig.
    finetune_train: TrainConfig = TrainConfig(steps=200, batch_size=64, optim=OptimConfig(
        base_lr=1e-3, weight_decay=0.05, warmup_steps=20, betas=(0.9, 0.999)))


class VAEConfig(StrictModel):
    """The frozen VAE for latent diffusion: pretrained TAEF2 weights, or a small one trained here."""

    pretrained_dir: str | None = Field(
        default=None, description="Folder with taef2_encoder.pth and taef2_decoder.pth; 'auto' finds them in the shared "
                                  "data folder or the data root's downloads, or downloads them (SHA-256 pinned), else "
                                  "trains a small VAE; None trains a small VAE.")
    latent_channels: int = Field(default=8, gt=0, description="Latent width of the VAE trained when none is given.")
    width: int = Field(default=32, gt=0)
    image_size: int = Field(default=32, gt=0)
    train: TrainConfig = TrainConfig(steps=300, batch_size=64, optim=OptimConfig(base_lr=5e-4, weight_decay=0.0, warmup_steps=20))
    # TAEF2 was trained on natural images; 150 steps of its decoder on Fashion-MNIST took val PSNR from
    # 24.2 to 30.5 dB (README, vae). The encoder stays frozen, so the latents are TAEF2's own.
    decoder_finetune: TrainConfig | None = Field(
        default=None, description="With pretrained weights: train only the decoder on the train split with these "
                                  "settings (encoder frozen, latents unchanged); None uses the decoder as it is.")

    @model_validator(mode="after")
    def _downsamples_cleanly(self) -> "VAEConfig":
        if self.image_size % VAE_DOWNSAMPLE:
            raise ValueError(f"image_size {self.image_size} is not divisible by the VAE's downsampling factor "
                             f"{VAE_DOWNSAMPLE}")
        for name, train in (("train", self.train), ("decoder_finetune", self.decoder_finetune)):
            if train is not None and train.nproc_per_node * train.nnodes > 1:  # a small conv net: one process
                raise ValueError(f"vae.{name}: the VAE trains in one process; set nproc_per_node and nnodes to 1")
        return self


class LatentConfig(StrictModel):
    """Pre-extraction of VAE latents into shards (once; DiT training never re-encodes)."""

    hflip_copy: bool = True
    samples_per_shard: int = Field(default=5000, gt=0)
    batch_size: int = Field(default=64, gt=0)
    splits: list[Literal["train", "val", "test"]] = ["train", "val"]


class DiTOptimConfig(OptimConfig):
    """DiT's recipe (Peebles & Xie): AdamW at a constant 1e-4 (the paper's value at batch 256, not
    rescaled by batch), betas (0.9, 0.999), no weight decay, no warmup."""

    base_lr: float = Field(default=1e-4, gt=0)
    lr_scaling: Literal["linear", "none"] = "none"
    schedule: Literal["cosine", "constant"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class DiTTrainConfig(TrainConfig):
    """The engine's settings with DiT's defaults, so a preset that sets only a few keys of ``dit.train``
    keeps DiT's recipe for the rest: EMA 0.9999 with warm-up, and :class:`DiTOptimConfig`."""

    steps: int = Field(default=500, gt=0, description="Optimizer steps.")
    optim: DiTOptimConfig = DiTOptimConfig()
    ema_decay: float | None = Field(default=0.9999, gt=0, lt=1)
    ema_warmup: bool = True

    @model_validator(mode="before")
    @classmethod
    def _unset_fields_take_dit_defaults(cls, value: Any) -> Any:
        # A plain TrainConfig handed in (tests, code) keeps only what its author set; the rest is DiT's.
        return value.model_dump(exclude_unset=True) if isinstance(value, TrainConfig) else value


class DiTConfig(StrictModel):
    """Class-conditional diffusion transformer on the latents, sampling with classifier-free guidance."""

    model: str = "DiT-N/2"
    learn_sigma: bool = Field(
        default=False, description="Also predict the variance, trained with the hybrid loss (MSE + VLB term) "
                                   "and used by DDPM sampling.")
    class_dropout_prob: float = Field(default=0.1, ge=0, lt=1)
    num_timesteps: int = Field(default=1000, gt=1)
    schedule: Literal["linear", "cosine"] = "linear"
    cfg_scale: float = Field(default=4.0, ge=1.0, description="Classifier-free guidance scale (1 = no guidance).")
    sampler: Literal["ddim", "ddpm"] = Field(
        default="ddim", description="ddim: deterministic (eta 0); ddpm: ancestral, with the learned or a fixed variance.")
    sample_steps: int = Field(default=50, gt=0, description="Sampler steps for samples and the quality score.")
    sample_variance: Literal["fixed_small", "fixed_large"] = Field(
        default="fixed_large", description="DDPM step variance without learn_sigma: posterior beta~_t, or beta_t (DiT).")
    samples_per_class: int = Field(default=20, gt=0)
    classifier_steps: int = Field(default=300, gt=0, description="Steps of the small CNN the stage trains on real images to score its samples (batch 64).")
    train: DiTTrainConfig = DiTTrainConfig()

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        parse_dit_name(value)
        return value

    @property
    def patch_size(self) -> int:
        return parse_dit_name(self.model)[1]

    @model_validator(mode="after")
    def _guidance_needs_a_null_class(self) -> "DiTConfig":
        # Without label dropout the model never learns the null class, so guidance would extrapolate from noise.
        if self.cfg_scale > 1 and self.class_dropout_prob == 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} needs class_dropout_prob > 0 (got 0): guidance uses the "
                             f"null class that label dropout trains; set cfg_scale: 1 or class_dropout_prob: 0.1")
        return self


class CLIPConfig(StrictModel):
    """Contrastive image-text training on the pairs dataset (a ViT image tower, a causal byte-level text tower)."""

    vision_size: str = "nano"
    image_size: int = Field(default=28, gt=0, description="Image tower input; the pairs are resized to it.")
    patch_size: int = Field(default=4, gt=0)
    channels: Literal[1, 3] = Field(default=1, description="1: the pairs are read as grey (the MAE's geometry).")
    text_width: int = Field(default=64, gt=0)
    text_depth: int = Field(default=2, ge=1)
    text_heads: int = Field(default=4, ge=1)
    context_length: int = Field(default=96, ge=3, description="Byte tokens per caption incl. SOT and EOT (Twemoji names reach 80 bytes).")
    embed_dim: int = Field(default=64, gt=0)
    image_init: Literal["mae", "random"] = Field(
        default="mae", description="mae: the image tower starts from the mae_pretrain stage's encoder (geometry must match).")
    baseline: bool = Field(default=True, description="With image_init mae, also train from random init to measure the difference.")
    baseline_steps: int | None = Field(default=None, gt=0, description="Steps of the random-init baseline; None = train.steps.")
    eval_batch_size: int = Field(default=256, gt=0, json_schema_extra={"execution_only": True})  # whole-split eval, no drop_last
    zero_shot_templates: list[str] = ["an emoji of {label}", "{label}", "a picture in the {label} category"]
    query_examples: int = Field(default=4, gt=0, description="Text queries in the logged top-5 retrieval picture.")
    train: TrainConfig = TrainConfig(steps=200, batch_size=64, optim=OptimConfig(
        base_lr=5e-4, lr_scaling="none", weight_decay=0.1, warmup_steps=20, betas=(0.9, 0.98)))

    @field_validator("vision_size")
    @classmethod
    def _known_vision_size(cls, value: str) -> str:
        return _known_vit_size(value)

    @model_validator(mode="after")
    def _patches_tile_image(self) -> "CLIPConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        return self


class IndexTarget(StrictModel):
    """One index to build: which dataset's split, embedded by which trained encoder, under which name."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                      description="What `patchflow query --index NAME` opens; files are NAME.faiss and NAME.meta.json.")
    dataset: Literal["images", "pairs"] = Field(description="images: the shard stage's dataset; pairs: the image-text pairs.")
    encoder: Literal["mae", "clip"] = Field(description="mae: mean patch token of the MAE encoder; clip: CLIP image tower.")
    split: str = "train"


class IndexConfig(StrictModel):
    """FAISS nearest-neighbour indexes over embedded splits (cosine similarity on L2-normalised vectors)."""

    targets: list[IndexTarget] = []
    target_recall: float = Field(default=0.95, gt=0.0, le=1.0,
                                 description="nprobe/efSearch is raised until recall@10 vs exact search reaches this.")
    factory: str | None = Field(default=None, description="A faiss index_factory string for every target; None chooses "
                                                          "by size: Flat < 1k, HNSW32 < 10k, IVF{4*sqrt(N)},Flat, IVF-PQ over budget.")
    memory_budget_mb: float = Field(default=1024.0, gt=0, description="Index size above which vectors are PQ-compressed.")
    batch_size: int = Field(default=256, gt=0, description="Images per encoder forward while embedding.")
    recall_queries: int = Field(default=500, gt=0, description="Vectors sampled as queries to measure recall@10 against exact search.")

    @model_validator(mode="after")
    def _unique_names(self) -> "IndexConfig":
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"index target names must be unique; repeated: {dupes}")
        return self


STAGES = ("shard", "mae_pretrain", "evaluate", "vae", "encode_latents", "dit_train", "clip_train", "index")
StageName = Literal["shard", "mae_pretrain", "evaluate", "vae", "encode_latents", "dit_train", "clip_train", "index"]
# The stages whose outputs a stage reads; the shard stage always runs. clip_train's MAE input and the
# index's encoders depend on other settings and are checked with them.
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "evaluate": ("mae_pretrain",), "encode_latents": ("vae",), "dit_train": ("vae", "encode_latents"),
}


# (section, field) of every TrainConfig a pipeline stage trains with (not the DiT judge's: it is a measuring instrument).
TRAINING_SECTIONS = (("mae", "train"), ("evaluate", "finetune_train"), ("vae", "train"), ("vae", "decoder_finetune"),
                     ("dit", "train"), ("clip", "train"))


class PipelineConfig(StrictModel):
    """The whole pipeline: one section per stage, plus where outputs go."""

    preset: str = "custom"
    data_root: str = DEFAULT_DATA_ROOT
    stages: list[StageName] = list(STAGES)
    shard: ShardConfig = ShardConfig()
    mae: MAEConfig = MAEConfig()
    evaluate: EvalConfig = EvalConfig()
    vae: VAEConfig = VAEConfig()
    latents: LatentConfig = LatentConfig()
    dit: DiTConfig = DiTConfig()
    pairs: ShardConfig | None = Field(
        default=None, description="The image-text pairs dataset (sharded by the shard stage, cached on its own key); "
                                  "without it clip_train does not run.")
    clip: CLIPConfig = CLIPConfig()
    index: IndexConfig = IndexConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", exclude=True,
        description="Sets train.precision of every training stage that leaves it at auto. bf16: bf16 autocast, also "
        "on a CPU with native bf16 (the demo's training stages 20% faster on an Intel Xeon with AMX; README, "
        "Precision); fp32: full precision, also on CUDA. auto: each stage's own setting, whose auto is bf16 on CUDA "
        "and fp32 on a CPU (the same results on every CPU). Left out of written configs, which carry each stage's "
        "resolved value instead.")
    concurrent_stages: int = Field(
        default=1, ge=1, description="How many stages may run at once. 1: one after another in the pipeline's "
        "process. More: independent branches overlap (vae -> encode_latents -> dit_train beside mae_pretrain -> "
        "evaluate), each stage in a process of its own with an equal share of the cores. How a run executes, "
        "not what it computes: no stage's key holds it.")

    @model_validator(mode="after")
    def _precision_reaches_every_stage(self) -> "PipelineConfig":
        # Written into the stages' own train sections, so each stage's key holds the precision it trains in.
        if self.precision == "auto":
            return self
        for section_name, field_name in TRAINING_SECTIONS:
            section = getattr(self, section_name)
            train = getattr(section, field_name)
            if train is not None and train.precision == "auto":
                # Copies, never the caller's objects; model_copy does not validate, so this validator
                # does not run again (a plain assignment would, under validate_assignment).
                resolved = train.model_copy(update={"precision": self.precision})
                object.__setattr__(self, section_name, section.model_copy(update={field_name: resolved}))
        return self

    @model_validator(mode="after")
    def _sections_agree(self) -> "PipelineConfig":
        # Checks across sections, so a mismatch fails at load rather than after the stages before it ran.
        problems = [*self._stage_list_problems(), *self._evaluate_problems(), *self._dit_problems(),
                    *self._clip_problems(), *self._index_problems()]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def _stage_list_problems(self) -> list[str]:
        # A stage whose upstream is not selected would be skipped silently and the run would exit 0.
        return [f"stages: {stage} needs {needed} (its upstream) in the stage list, which is {self.stages}; "
                f"add {needed} (a stage that finished before is reused, not rerun)"
                for stage in self.stages for needed in STAGE_UPSTREAM.get(stage, ()) if needed not in self.stages]

    def _evaluate_problems(self) -> list[str]:
        depth = VIT_SIZES[self.mae.encoder_size].depth
        if "evaluate" not in self.stages or self.evaluate.feature_blocks <= depth:
            return []
        return [f"evaluate.feature_blocks={self.evaluate.feature_blocks} exceeds the depth {depth} of the "
                f"mae.encoder_size={self.mae.encoder_size!r} encoder; allowed: 1..{depth}"]

    def _dit_problems(self) -> list[str]:
        latent_size = self.vae.image_size // VAE_DOWNSAMPLE
        if "dit_train" not in self.stages or latent_size % self.dit.patch_size == 0:
            return []
        patches = [p for p in range(1, latent_size + 1) if latent_size % p == 0]
        return [f"dit.model={self.dit.model!r}: patch size {self.dit.patch_size} does not tile the {latent_size}x"
                f"{latent_size} latents of vae.image_size={self.vae.image_size} (/{VAE_DOWNSAMPLE}); allowed patch "
                f"sizes: {patches}, or a vae.image_size that is a multiple of {VAE_DOWNSAMPLE * self.dit.patch_size}"]

    def _clip_problems(self) -> list[str]:
        if "clip_train" not in self.stages or self.pairs is None or self.clip.image_init != "mae":
            return []
        fix = "or set clip.image_init=random"
        if "mae_pretrain" not in self.stages:
            return [f"clip.image_init='mae' needs mae_pretrain in stages (stages: {self.stages}); add it, {fix}"]
        pairs = [("clip.vision_size", self.clip.vision_size, "mae.encoder_size", self.mae.encoder_size),
                 ("clip.image_size", self.clip.image_size, "mae.image_size", self.mae.image_size),
                 ("clip.patch_size", self.clip.patch_size, "mae.patch_size", self.mae.patch_size)]
        # Channels may differ: a grey MAE's patch projection is spread over RGB when it is loaded.
        return [f"clip.image_init='mae' starts the image tower from the MAE encoder, but {clip_field}={clip_value!r} "
                f"differs from {mae_field}={mae_value!r}; set {clip_field}: {mae_value!r}, {fix}"
                for clip_field, clip_value, mae_field, mae_value in pairs if clip_value != mae_value]

    def _index_problems(self) -> list[str]:
        if "index" not in self.stages:
            return []
        has_clip = "clip_train" in self.stages and self.pairs is not None
        datasets = {"images": True, "pairs": has_clip}  # the pipeline always shards images
        encoders = {"mae": "mae_pretrain" in self.stages, "clip": has_clip}
        problems = []
        for i, target in enumerate(self.index.targets):
            where = f"index.targets[{i}] ({target.name!r})"
            if not datasets[target.dataset]:
                problems.append(f"{where}: dataset {target.dataset!r} is not produced by this run (pairs needs a "
                                f"pairs: section and clip_train in stages; stages: {self.stages})")
            if not encoders[target.encoder]:
                needs = "mae_pretrain in stages" if target.encoder == "mae" else "clip_train in stages and a pairs: section"
                problems.append(f"{where}: encoder {target.encoder!r} is not trained by this run (needs {needs}; "
                                f"stages: {self.stages})")
        return problems


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"mae.train.steps=50"`` → (["mae", "train", "steps"], 50); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw)


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(origin: str, error: ValidationError) -> str:
    lines = [f"invalid config ({origin}):"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        # Checks across sections have no single location: their messages name the fields themselves.
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def resolve_data_root(
    data_root: str | os.PathLike[str] | None = None, fallback: str | None = None
) -> Path:
    """Flag beats ``PATCHFLOW_DATA_ROOT`` beats the preset's value beats ``./.patchflow``."""
    chosen = data_root or os.environ.get(DATA_ROOT_ENV) or fallback or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser().resolve()


def load_config(
    preset: str = "demo",
    overrides: list[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> PipelineConfig:
    """Build the validated config for a preset name or a YAML file path, plus overrides."""
    preset_path = Path(preset)
    if preset_path.suffix not in (".yaml", ".yml"):
        preset_path = PRESET_DIR / f"{preset}.yaml"
    if not preset_path.is_file():
        raise ConfigError(
            f"unknown preset {preset!r} (no file {preset_path}); choose one of {available_presets()}"
        )
    try:
        tree = yaml.safe_load(preset_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{preset_path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{preset_path}: top level must be a mapping")
    tree.setdefault("preset", preset_path.stem)
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    tree["data_root"] = str(resolve_data_root(data_root, fallback=tree.get("data_root")))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(preset_path), exc)) from None
