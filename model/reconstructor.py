"""ADTR's feature reconstructor (method §2), DETR-style.

Tokens (one per feature-map position) go through a transformer encoder; the decoder's input is a
learned auxiliary query per position, never the tokens themselves, so an anomalous token can only
reach the output through attention. A learned position embedding is added to queries and keys in
every attention layer.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ReconstructorConfig
from .scoring import cell_tokens


def channels_last(features: Tensor) -> Tensor:
    """(B, C, S, S) features in channels-last storage (the same tensor when they already are)."""
    return features.contiguous(memory_format=torch.channels_last)


def with_pos(x: Tensor, pos: Tensor) -> Tensor:
    return x + pos


def neighbor_mask(size: int, k: int) -> Tensor | None:
    """(size², size²) bool attention mask, True where query u may NOT look: key v within the k×k
    window centred on u (Chebyshev distance ≤ k // 2)."""
    if k <= 0:
        return None
    yx = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).view(-1, 2)
    return (yx[:, None, :] - yx[None, :, :]).abs().amax(-1) <= k // 2


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        q = k = with_pos(src, pos)
        src = self.norm1(src + self.drop1(self.self_attn(q, k, src, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, mask: Tensor | None = None,
                attended_queries: Tensor | None = None) -> Tensor:
        """`attended_queries`: this layer's self-attention block already applied to `tgt` (see
        `self_attend`), for the first layer at inference, where `tgt` is the same for every image."""
        tgt = self.self_attend(tgt, pos, mask) if attended_queries is None else attended_queries
        attended = self.cross_attn(with_pos(tgt, pos), with_pos(memory, pos), memory, attn_mask=mask,
                                   need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(attended))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))

    def self_attend(self, tgt: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        q = k = with_pos(tgt, pos)
        return self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, attn_mask=mask, need_weights=False)[0]))


class Reconstructor(nn.Module):
    """(B, C, S, S) features → (target, reconstruction), both (B, C, S, S) in normalized space.

    The feature normalization (per-position or per-channel mean, per-channel std) is fitted on the
    training features with `fit_normalization` and stored as buffers, so it travels in the checkpoint.
    """

    # Buffers (`register_buffer` below): declared so the type checker sees tensors, not `Tensor | Module`.
    attn_mask: Tensor | None
    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, channels: int, feature_size: int, cfg: ReconstructorConfig):
        super().__init__()
        self.cfg, self.channels, self.feature_size = cfg, channels, feature_size
        d, n = cfg.hidden_dim, feature_size * feature_size
        self.input_proj = nn.Conv2d(channels, d, kernel_size=1)
        self.output_proj = nn.Conv2d(d, channels, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.empty(1, n, d))
        self.query_embed = nn.Parameter(torch.empty(1, n, d))
        layer_args = (d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(cfg.num_decoder_layers))
        mask = neighbor_mask(feature_size, cfg.neighbor_mask)
        if mask is not None and mask.all():
            raise ValueError(f"neighbor_mask {cfg.neighbor_mask} hides the whole {feature_size}x{feature_size} grid")
        self.register_buffer("attn_mask", mask, persistent=False)
        # Channels-last storage: with features in the same layout (`forward` puts them there), every
        # per-cell step below and in the scorer runs on contiguous memory, and the tokens are a view.
        shape = (1, channels, feature_size, feature_size)
        self.register_buffer("feature_mean", torch.zeros(shape).contiguous(memory_format=torch.channels_last))
        self.register_buffer("feature_std", torch.ones(shape).contiguous(memory_format=torch.channels_last))
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.query_embed, std=0.02)
        for p in self.parameters():
            if p.dim() > 1 and p is not self.pos_embed and p is not self.query_embed:
                nn.init.xavier_uniform_(p)
        if cfg.zero_init_output:
            nn.init.zeros_(self.output_proj.weight)
            nn.init.zeros_(self._output_bias())

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        """Fit the feature normalization on training features (N, C, S, S)."""
        if self.cfg.feature_norm == "none":
            return
        if self.cfg.feature_norm in ("position", "position_std"):
            mean = features.mean(dim=0, keepdim=True)
        else:
            mean = features.mean(dim=(0, 2, 3), keepdim=True)
        std_dims = (0,) if self.cfg.feature_norm == "position_std" else (0, 2, 3)
        std = (features - mean).pow(2).mean(dim=std_dims, keepdim=True).sqrt()
        if self.cfg.feature_norm == "position_std":
            # A cell that hardly varies in training (a black background) would turn any later change
            # there into a huge error: its std may not fall below a fraction of its channel's.
            channel_std = std.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
            std = torch.maximum(std, self.cfg.std_floor * channel_std)
        std = std.clamp_min(1e-6)
        self.feature_mean.copy_(mean.expand_as(self.feature_mean))
        self.feature_std.copy_(std.expand_as(self.feature_std))

    def _attended_queries(self) -> Tensor:
        """The first decoder layer's self-attention over the auxiliary queries, (1, S*S, D).

        Its input (the queries, the position embedding) is the same for every image, so at inference
        it is computed once and kept (measured: one attention of three, ~1.5 of 8.6 ms per batch of 4
        on one CPU thread). Kept for the parameters it was computed from and the autocast it ran
        under: an in-place change to them (an optimizer step, `load_state_dict`) bumps their version;
        a move or cast, and any switch to training mode (where all learning happens, whatever the
        optimizer's way of writing), drop it. Parameters without a version (made under
        `torch.inference_mode`) are never kept for.
        """
        layer = cast(DecoderLayer, self.decoder[0])  # nn.ModuleList indexes to a plain Module
        params = (self.query_embed, self.pos_embed, *layer.self_attn.parameters(), *layer.norm1.parameters())
        device = self.query_embed.device.type
        autocast = (torch.is_autocast_enabled(device),
                    torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        return self._kept("_query_cache", params, (autocast,),
                          lambda: layer.self_attend(self.query_embed, self.pos_embed, self.attn_mask))

    def outputs_the_mean(self) -> bool:
        """True while the output projection is all zeros (untrained, zero-initialized): the reconstruction is
        then each cell's training mean (0 in the normalized space) whatever the input, and inference skips
        the transformer for it (exact, not an approximation). Kept per the projection's version, like the
        decoder's first-layer queries."""
        weight, bias = self.output_proj.weight, self._output_bias()
        return self._kept("_mean_cache", (weight, bias), (), lambda: not bool(weight.any()) and not bool(bias.any()))

    def _output_bias(self) -> Tensor:
        """The output projection's bias (a Conv2d's bias is optional; this one is built with it)."""
        bias = self.output_proj.bias
        if bias is None:
            raise RuntimeError("the reconstructor's output projection has no bias")
        return bias

    _CACHES = ("_query_cache", "_mean_cache")  # derived from parameters by `_kept`; never saved

    def _kept(self, name: str, params, extra: tuple, compute):
        """`compute()` (under no_grad), kept under `name` for as long as `params` are the same tensors at the
        same version and `extra` is unchanged. Parameters without a version (inference tensors) are never
        kept for; a move, cast or switch of mode drops every kept value (`_apply`, `train`)."""
        try:
            key = (*extra, *((p.data_ptr(), p._version) for p in params))
        except RuntimeError:  # inference tensors track no version
            key = None
        cached = self.__dict__.get(name)
        if key is None or cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, compute())
            if key is not None:
                self.__dict__[name] = cached
        return cached[1]

    def train(self, mode: bool = True) -> Reconstructor:
        for name in self._CACHES:
            self.__dict__.pop(name, None)
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        for name in self._CACHES:
            self.__dict__.pop(name, None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self._CACHES:
            state.pop(name, None)
        return state

    def normalize(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if features.shape[1:] != self.feature_mean.shape[1:]:
            raise ValueError(f"features are {tuple(features.shape[1:])}, the reconstructor was built for "
                             f"{tuple(self.feature_mean.shape[1:])}")
        target = self.normalize(channels_last(features))  # (B, C, S, S), channels-last storage
        if not (self.training or torch.is_grad_enabled()) and self.outputs_the_mean():
            return target, torch.zeros_like(target)  # what the transformer would compute, without it
        b, _, s, _ = target.shape
        tokens = cell_tokens(target)  # (B, S*S, C), a view of channels-last storage
        if self.training and self.cfg.jitter_scale > 0 and torch.rand(()) < self.cfg.jitter_prob:
            # UniAD's feature jitter: noise ∝ each token's norm, only on the input, never the target.
            scale = tokens.norm(dim=2, keepdim=True) / tokens.shape[2] * self.cfg.jitter_scale
            tokens = tokens + torch.randn_like(tokens) * scale
        if self.training and self.cfg.input_dropout > 0:
            # Dinomaly's noisy bottleneck: input values dropped (and the rest scaled), never the target's.
            tokens = F.dropout(tokens, self.cfg.input_dropout, training=True)
        # The 1×1 projections as matrix products on the tokens (the same weights and arithmetic as the
        # convolutions, whose modules keep the checkpoint's names and shapes).
        memory = F.linear(tokens, self.input_proj.weight.flatten(1), self.input_proj.bias)  # (B, S*S, D)
        pos = self.pos_embed
        for layer in self.encoder:
            memory = layer(memory, pos, self.attn_mask)
        out = self.query_embed.expand(b, -1, -1)  # (B, S*S, D): the auxiliary query
        # The kept first-layer queries carry no autograd graph: only where nothing is learned.
        keep = not (self.training or torch.is_grad_enabled())
        for i, layer in enumerate(self.decoder):
            first = self._attended_queries().expand(b, -1, -1) if i == 0 and keep else None
            out = layer(out, memory, pos, self.attn_mask, first)
        recon = F.linear(out, self.output_proj.weight.flatten(1), self.output_proj.bias)  # (B, S*S, C)
        return target, recon.transpose(1, 2).unflatten(2, (s, s))  # both (B, C, S, S), channels-last storage


def reconstruction_loss(target: Tensor, reconstruction: Tensor) -> Tensor:
    """L_norm (eq. 1) as a plain MSE: ||f − f̂||² / (C·H·W), averaged over the batch."""
    return F.mse_loss(reconstruction, target)


def hard_mining_loss(target: Tensor, reconstruction: Tensor, fraction: float) -> Tensor:
    """The MSE over each image's worst-reconstructed `fraction` of cells only (at least one cell): cells
    already reconstructed well give no gradient (the hard-mining idea of Dinomaly and EfficientAD's
    hard loss). fraction 1 is `reconstruction_loss`."""
    per_cell = (reconstruction - target).pow(2).mean(dim=1).flatten(1)  # (B, S*S)
    k = max(1, round(fraction * per_cell.shape[1]))
    return per_cell.topk(k, dim=1, sorted=False).values.mean()


@torch.no_grad()
def residual_energy(model: Reconstructor, features: Tensor, batch: int = 32) -> Tensor:
    """Per-cell squared residual ‖t − f̂‖² in the model's normalized space t: (N, C, S, S) → (N, S, S)."""
    was_training = model.training
    model.eval()
    device = model.feature_std.device
    out = []
    for i in range(0, len(features), batch):
        target, recon = model(features[i : i + batch].to(device))
        out.append((target.float() - recon.float()).pow(2).sum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def deviation_energy(model: Reconstructor, features: Tensor, batch: int = 32) -> float:
    """Σ‖t − m‖² over images and cells: what predicting each cell's mean m would leave, in the model's
    normalized space t. m is the per-cell TRAINING mean (0 in that space) when the normalization is per
    position, which is what an untrained (zero-output) reconstructor predicts; under a per-channel or no
    normalization the reconstructor keeps no per-cell mean, and m is these features' own."""
    total, total_sq, count = torch.zeros((), dtype=torch.float64), 0.0, 0  # total: Σ t, per channel and cell
    device = model.feature_std.device
    for i in range(0, len(features), batch):
        t = model.normalize(channels_last(features[i : i + batch].to(device))).double().cpu()
        total, total_sq, count = total + t.sum(dim=0), total_sq + float(t.pow(2).sum()), count + t.shape[0]
    if not count or model.cfg.feature_norm in ("position", "position_std"):
        return total_sq
    # Σ_n ‖t_n − t̄‖² = Σ_n ‖t_n‖² − N ‖t̄‖²
    return total_sq - float((total / count).pow(2).sum()) * count


def explained_variance(model: Reconstructor, features: Tensor, batch: int = 32) -> float:
    """1 − MSE(f, f̂) / MSE(f, mean): the share of the features' variation around each cell's training mean
    that the reconstruction predicts (≈ 0 for an untrained model, which outputs that mean; 1 for a perfect
    reconstruction; negative when it does worse than the mean). In the normalized space the model trains
    in; see `deviation_energy` for the mean."""
    return _share_explained(residual_energy(model, features, batch), deviation_energy(model, features, batch))


def _share_explained(residual: Tensor, deviation: float) -> float:
    """1 − Σ residual energy / the energy left by predicting each cell's mean."""
    return 1.0 - float(residual.double().sum()) / max(deviation, 1e-12)


def defect_residual_ratio(residual: Tensor, cell_masks: Tensor, normal: Tensor) -> float | None:
    """Mean residual energy of defect cells (`cell_masks`, (N, S, S) bool, images with defects) over that
    of every cell of normal images (`normal`, (N, S, S) residual energy). None without defect cells.
    A reconstructor that models normals and fails on defects drives it up."""
    if not bool(cell_masks.any()) or normal.numel() == 0:
        return None
    return float(residual[cell_masks].mean() / normal.mean().clamp_min(1e-12))


def cell_masks(masks, feature_size: int, coverage: float = 0.25) -> Tensor:
    """Pixel masks (N, H, W) bool → (N, S, S) bool: the grid cells at least `coverage` covered by defect."""
    m = torch.as_tensor(masks, dtype=torch.float32).unsqueeze(1)
    return F.adaptive_avg_pool2d(m, feature_size)[:, 0] >= coverage


def reconstruction_report(model: Reconstructor, features: Tensor, labels, masks=None,
                          batch: int = 32) -> dict[str, float | int | None]:
    """What the reconstructor explains on a labelled set: the explained variance of its normals and, when
    pixel `masks` (N, H, W) are given, the residual energy of defect cells over normal images' cells."""
    normal = torch.as_tensor(labels) == 0
    out: dict[str, float | int | None] = {"explained_variance": None, "defect_residual_ratio": None,
                                          "normals": int(normal.sum())}
    if int(normal.sum()) < 2:
        return out
    residual = residual_energy(model, features, batch)
    deviation = deviation_energy(model, features[normal], batch)
    out["explained_variance"] = _share_explained(residual[normal], deviation)
    if masks is not None and bool((~normal).any()):
        defect_cells = cell_masks(torch.as_tensor(masks)[~normal], model.feature_size)
        out["defect_residual_ratio"] = defect_residual_ratio(residual[~normal], defect_cells, residual[normal])
    return out
