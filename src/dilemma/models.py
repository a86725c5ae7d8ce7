"""A timm Vision Transformer driven with explicit token indices.

DILEMMA (arXiv 2204.04788, Sec. 3) needs two things a stock ViT forward cannot do: run on a
*subset* of the patch tokens (sparsity) and give some of them the positional embedding (PE) of
another location (misplacement). ``ViTEncoder`` does both through timm's public modules
(``patch_embed``, ``pos_embed``, ``cls_token``, ``blocks``, ``norm``) without forking the model.
The authors' code built the indices but never passed them into the embedding step
(``docs/method.md``, "Defects of the authors' code"); here they are the forward's own arguments.

The same holds for timm's ``Eva`` class, whose models (DINOv3, EVA-02, ``vit_*_rope_*``) carry
positions as rotary embeddings (RoPE): a token's queries and keys are rotated by its position's
angles in every block. There, sparsity gathers the kept tokens' angles, and a misplaced token is
rotated with the angles of the position it is told (and gets that position's row of an additive
table too, where the model has both); prefix tokens stay unrotated, as timm leaves them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dilemma.errors import DilemmaError

POS_EMBEDS = ("sincos", "learned")
GLOBAL_POOLS = ("token", "avg", "max", "avgmax")  # timm's, without attention pooling


@dataclass
class ModelConfig:
    """The ``model`` config section."""

    name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer
    img_size: int = 28  # images are resized to this; must be divisible by patch_size
    patch_size: int = 4
    in_chans: int = 1
    depth: Optional[int] = 6  # override the model's depth (null: keep timm's)
    pos_embed: str = "sincos"  # sincos (fixed 2D, MoCo v3) or learned (timm's)
    global_pool: Optional[str] = None  # the image embedding: null = the model's own (the class token); or avg, ...
    class_token: Optional[bool] = None  # null = the model's own; false: patch tokens only (I-JEPA's ViT)
    drop_path_rate: float = 0.0
    # The input contract, as timm's pretrained_cfg states it (and the export writes it):
    mean: list[float] = field(default_factory=lambda: [0.5])  # per channel (one value: every channel)
    std: list[float] = field(default_factory=lambda: [0.5])
    crop_pct: float = 1.0  # evaluation: short side resized to img_size / crop_pct, centre crop (files)
    pretrained: str = ""  # start from: a run folder, a .safetensors / .pth file, or a timm name with local weights


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    """``values`` (one per channel, or one for all) as a ``(C, 1, 1)`` float tensor beside ``like``."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.tensor(values, dtype=dtype, device=like.device).view(-1, 1, 1)


def standardize(pixels: torch.Tensor, mean=(0.5,), std=(0.5,)) -> torch.Tensor:
    """Floats in [0, 1] ``(..., C, H, W)`` -> ``(x - mean) / std`` per channel (one value: every
    channel), in place. Python scalars, not a tensor of them: copying one to a GPU would wait for
    the work queued there."""
    channels = pixels.shape[-3]
    mean, std = (list(v) * channels if len(v) == 1 else list(v) for v in (mean, std))
    for c, (m, s) in enumerate(zip(mean, std, strict=True)):
        pixels[..., c, :, :].sub_(m).div_(s)
    return pixels


def normalize(images: torch.Tensor, mean=(0.5,), std=(0.5,)) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float ``(x / 255 - mean) / std`` per channel (one value: every channel)."""
    return standardize(images.float() / 255.0, mean, std)


def sincos_pos_embed_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding, ``(H * W, dim)`` in row-major patch order (MoCo v3, MAE)."""
    if dim % 4:
        raise DilemmaError(f"sin-cos positional embedding needs an embed dim divisible by 4, got {dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    out_w = cols.flatten()[:, None] * omega[None]
    out_h = rows.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1).float()


def _with_positions(x, patch_pe: torch.Tensor | None, positions: torch.Tensor | None, no_position=None):
    """Kept tokens ``x`` ``(B, K, D)`` plus their PE rows ``patch_pe`` ``(L, D)`` (none for rotary-only
    models): token i gets row ``positions[b, i]``, which differs from keep[b, i] exactly for the
    misplaced tokens; all rows in order when ``positions`` is None (dense). A token without a position
    (-1, position prediction) gets ``no_position`` ``(D,)`` instead (zero when not given)."""
    if positions is None:
        return x if patch_pe is None else x + patch_pe.unsqueeze(0)
    if patch_pe is None and no_position is None:
        return x
    pe = 0.0 if patch_pe is None else patch_pe[positions.clamp(min=0)]  # (L, D)[(B, K)] -> (B, K, D)
    unplaced = (positions < 0).unsqueeze(-1)  # (B, K, 1)
    return x + torch.where(unplaced, 0.0 if no_position is None else no_position, pe)  # promoted as the PE rows


class ViTEncoder(nn.Module):
    """Wraps a timm ``VisionTransformer``; ``forward(images, keep, positions)`` returns
    ``(class_embedding (B, D), patch_embeddings (B, K, D))`` after the final norm.

    - ``keep`` ``(B, K)`` long: which patches of each image enter the encoder (None = all L).
    - ``positions`` ``(B, K)`` long: whose PE each kept token gets (None = its own, i.e. ``keep``).
    - ``masked`` ``(B, K)`` bool with ``mask_token`` ``(D,)``: tokens shown as the mask token (iBOT).

    ``embed`` (same arguments) returns the image embedding alone, and skips work nobody reads.

    Prefix tokens (class, registers) are never dropped or corrupted; where the ViT has a PE row
    for them they keep their own. The class embedding is pooled as the timm model pools (``pool``).
    Images of another size (e.g. DINO's local crops) get the patch PE resampled to their grid,
    as DINO does; indices then refer to that grid. ``normalize`` turns uint8 images into its input
    (``model.mean`` / ``model.std``).
    """

    def __init__(self, vit: VisionTransformer | Eva, mean=(0.5,), std=(0.5,)):
        super().__init__()
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise DilemmaError(
                f"expected a timm VisionTransformer or Eva (RoPE) model, got {type(vit).__name__}: "
                "see the README for the timm families that work"
            )
        if vit.pos_embed is None and getattr(vit, "rope", None) is None:
            raise DilemmaError("the ViT has neither a positional embedding nor rotary positions; DILEMMA needs one")
        if vit.patch_drop is not None and not isinstance(vit.patch_drop, nn.Identity):
            raise DilemmaError("set patch_drop_rate=0: token dropping is done by dilemma, with known indices")
        vit.patch_embed.strict_img_size = False  # other sizes are checked in check_images
        self.vit = vit
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.grid_size = tuple(vit.patch_embed.grid_size)
        self.num_patches = vit.patch_embed.num_patches
        self.img_size = tuple(vit.patch_embed.img_size)
        self.in_chans = vit.patch_embed.proj.in_channels
        self.embed_dim = vit.embed_dim
        self.mean, self.std = tuple(mean), tuple(std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> this encoder's input."""
        return normalize(images, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """This encoder's input -> pixels in [0, 1] (for pictures)."""
        return (x * _per_channel(self.std, x) + _per_channel(self.mean, x)).clamp(0, 1)

    def grid_of(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch = self.vit.patch_embed.patch_size
        return image_size[0] // patch[0], image_size[1] // patch[1]

    def _split_pos_embed(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(prefix PE or None, patch PE (H * W, D))`` from timm's ``pos_embed``, resampled to ``grid``
        (``(None, None)`` for a model with rotary positions only)."""
        pe = self.vit.pos_embed
        if pe is None:
            return None, None
        prefix_pe = None if self.vit.no_embed_class else pe[0, : self.num_prefix_tokens]
        patch_pe = pe[:, pe.shape[1] - self.num_patches :]
        if grid != self.grid_size:
            patch_pe = resample_abs_pos_embed(patch_pe, list(grid), list(self.grid_size), num_prefix_tokens=0)
        return prefix_pe, patch_pe[0]

    def check_images(self, images: torch.Tensor) -> None:
        patch = self.vit.patch_embed.patch_size
        if (
            images.ndim != 4
            or images.shape[1] != self.in_chans
            or images.shape[-2] % patch[0]
            or images.shape[-1] % patch[1]
            or images.shape[-1] == 0
        ):
            raise DilemmaError(
                f"images of shape {tuple(images.shape)} do not fit this ViT: expected (B, {self.in_chans}, H, W) "
                f"with H and W multiples of the patch size {patch[0]} "
                f"(trained at {self.img_size[0]}x{self.img_size[1]}); "
                "set model.img_size / model.in_chans to match the data"
            )

    def tokens(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        no_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The blocks' input ``(B, P + K, D)``: prefix tokens, then the kept patch tokens with their PE.
        ``masked`` ``(B, K)`` bool: kept tokens whose patch content is replaced by ``mask_token`` ``(D,)``
        before the PE is added (iBOT's masked image modelling). ``positions`` -1: a token without a
        position, given ``no_position`` ``(D,)`` in place of its PE (position prediction)."""
        self.check_images(images)
        vit = self.vit
        x = vit.patch_embed(images)  # (B, L, D), patches in row-major order, no PE yet
        x = x.flatten(1, 2) if x.ndim == 4 else x  # a dynamic_img_size model gives (B, H, W, D)
        batch, _, dim = x.shape
        prefix_pe, patch_pe = self._split_pos_embed(self.grid_of(tuple(images.shape[-2:])))  # patch_pe: (L, D)
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != batch:
                raise DilemmaError(f"keep must be (B={batch}, K) indices, got {tuple(keep.shape)}")
            # Sparsity: only the kept patches go on, (B, L, D) -> (B, K, D); dropped ones cost nothing.
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
            positions = keep if positions is None else positions
        if masked is not None:
            if masked.shape != x.shape[:2] or mask_token is None:
                raise DilemmaError(
                    f"masked must match the kept tokens {tuple(x.shape[:2])} and come with a mask_token, "
                    f"got {tuple(masked.shape)}"
                )
            x = torch.where(masked.unsqueeze(-1), mask_token.to(x.dtype), x)  # (B, K, D): content hidden
        if positions is not None and positions.shape != x.shape[:2]:
            raise DilemmaError(
                f"positions must match the kept tokens {tuple(x.shape[:2])}, got {tuple(positions.shape)}"
            )
        x = _with_positions(x, patch_pe, positions, no_position)

        # Prefix tokens (class, registers) are never dropped or corrupted; they get their own PE rows.
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)  # (B, P, D)
            if prefix_pe is not None:
                prefix = prefix + prefix_pe.unsqueeze(0)
            x = torch.cat([prefix, x], dim=1)  # (B, P + K, D)
        return vit.norm_pre(vit.pos_drop(x))

    def rotary(self, images: torch.Tensor, keep: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """The rotary angles (sin and cos, concatenated) of the patch tokens ``tokens`` returns, or None
        for a ViT without rotary positions: token i of image b gets those of ``positions[b, i]`` (the
        position it is told; ``keep`` when None), so a misplaced token is rotated as if it were
        there. ``(L, R)`` for all tokens at their own places (timm's own call), else ``(B, 1, K, R)``;
        per-block angles (timm's ``rope_mixed``): ``(depth, heads, L, R)`` or ``(depth, B, heads, K, R)``."""
        rope = getattr(self.vit, "rope", None)
        if rope is None:
            return None
        table = rope.get_embed(shape=list(self.grid_of(tuple(images.shape[-2:]))))  # (L, R); mixed (depth, h, L, R)
        positions = keep if positions is None else positions
        if positions is None:
            return table
        unplaced = (positions < 0).unsqueeze(-1)  # (B, K, 1): no position (-1) -> not rotated
        half = table.shape[-1] // 2
        unrotated = torch.cat([table.new_zeros(half), table.new_ones(half)])  # (R,): sin 0, cos 1 (timm's layout)
        if getattr(self.vit, "rope_mixed", False):
            angles = torch.where(unplaced, unrotated, table[:, :, positions.clamp(min=0)])  # (depth, h, B, K, R)
            return angles.permute(0, 2, 1, 3, 4)  # (depth, B, h, K, R)
        angles = torch.where(unplaced, unrotated, table[positions.clamp(min=0)])  # (L, R)[(B, K)] -> (B, K, R)
        return angles.unsqueeze(1)  # (B, 1, K, R): one set of angles for every head

    def _run(self, blocks, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """``blocks`` over ``x``; Eva's blocks also take the rotary angles (per block where mixed)."""
        checkpointed = self.vit.grad_checkpointing and self.training and torch.is_grad_enabled()
        if rope is None:
            if checkpointed:
                for block in blocks:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                return x
            return blocks(x)
        mixed = getattr(self.vit, "rope_mixed", False)
        for i, block in enumerate(blocks):
            angles = rope[i] if mixed else rope
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, rope=angles, use_reentrant=False)
            else:
                x = block(x, rope=angles)
        return x

    def forward(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        no_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens(images, keep, positions, masked, mask_token, no_position)
        x = self.vit.norm(self._run(self.vit.blocks, x, self.rotary(images, keep, positions)))
        return self.pool(x), x[:, self.num_prefix_tokens :]  # (B, D), (B, K, D)

    def embed(
        self, images: torch.Tensor, keep: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``forward(...)[0]``, the image embedding ``(B, D)``, for callers that read no patch output
        (EMA teachers, evaluation features). Where the embedding is the class token and the last
        block is timm's pre-norm ``Block``, that block's MLP runs for the class token alone: the
        patch tokens' outputs are never read (11 % of a dense forward's FLOPs at depth 6, 5 % at depth 12)."""
        blocks = self.vit.blocks
        if not self._class_token_pooled() or type(blocks[-1]).forward is not Block.forward:
            return self(images, keep, positions)[0]
        last = blocks[-1]
        x = self._run(blocks[:-1], self.tokens(images, keep, positions))
        # Block.forward with the attention output cut to the class token: its keys and values still
        # come from every token; everything after attention is per token.  (B, N, D) -> (B, 1, D)
        x = x[:, :1] + last.drop_path1(last.ls1(last.attn(last.norm1(x))[:, :1]))
        x = x + last.drop_path2(last.ls2(last.mlp(last.norm2(x))))
        return self.vit.fc_norm(self.vit.norm(x)[:, 0])

    def embedding_kind(self) -> str:
        """What ``pool`` reads, in words (for protocol strings)."""
        vit = self.vit
        if getattr(vit, "attn_pool", None) is not None:
            return "attention-pooled tokens"
        if vit.global_pool in ("avg", "max", "avgmax"):
            return f"{vit.global_pool}-pooled patch tokens"
        return "final-norm class tokens" if vit.cls_token is not None else "avg-pooled patch tokens"

    def _class_token_pooled(self) -> bool:
        """Whether ``pool`` reads the class token only (see there)."""
        vit = self.vit
        return (
            getattr(vit, "attn_pool", None) is None
            and vit.global_pool not in ("avg", "max", "avgmax")
            and vit.cls_token is not None
        )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding from all tokens ``(B, P + K, D)`` as timm's ``forward_head(...,
        pre_logits=True)`` makes it: the model's ``global_pool`` over the (kept) patch tokens or the
        class token, then ``fc_norm`` (a LayerNorm in average-pooling ViTs, else the identity)."""
        vit, patches = self.vit, x[:, self.num_prefix_tokens :]
        if getattr(vit, "attn_pool", None) is not None:  # 'map': attention pooling over all tokens
            pooled = vit.attn_pool(x)
        elif vit.global_pool == "avg":
            pooled = patches.mean(dim=1)
        elif vit.global_pool == "max":
            pooled = patches.amax(dim=1)
        elif vit.global_pool == "avgmax":
            pooled = 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        else:  # 'token', or no pooling: the class token, or the mean patch token without one
            pooled = x[:, 0] if vit.cls_token is not None else patches.mean(dim=1)
        return vit.fc_norm(pooled)


def create_encoder(
    name: str = "vit_tiny_patch16_224",
    *,
    img_size: int = 28,
    patch_size: int = 4,
    in_chans: int = 1,
    pos_embed: str = "sincos",
    mean=(0.5,),
    std=(0.5,),
    **model_kwargs,
) -> ViTEncoder:
    """``timm.create_model(name, img_size=..., patch_size=..., in_chans=...)`` wrapped as a ``ViTEncoder``.

    ``pos_embed='sincos'`` freezes the PE to fixed 2D sin-cos (MoCo v3 / MAE; class-token row zero);
    ``'learned'`` keeps timm's trainable PE (the authors' DILEMMA code).
    """
    if pos_embed not in POS_EMBEDS:
        raise DilemmaError(f"model.pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if img_size <= 0 or patch_size <= 0 or img_size % patch_size:
        raise DilemmaError(
            f"image size {img_size} is not divisible by patch size {patch_size}: "
            f"choose e.g. img_size={math.ceil(img_size / patch_size) * patch_size} "
            f"or a patch size that divides {img_size}"
        )
    if not timm.is_model(name):
        raise DilemmaError(f"unknown timm model {name!r}; see timm.list_models('vit_*')")

    try:
        vit = timm.create_model(
            name,
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            # Eva: rotary angles built for each grid asked for (DINO's local crops), not cached for one
            **{"num_classes": 0, **({"dynamic_img_size": True} if _is_eva(name) else {}), **model_kwargs},
        )
    except (TypeError, AssertionError, ValueError) as err:  # a model of another kind, or sizes it cannot take
        raise DilemmaError(
            f"timm model {name!r} could not be made with img_size={img_size}, patch_size={patch_size}, "
            f"in_chans={in_chans} ({str(err) or type(err).__name__}): dilemma drives ViTs with one token per patch "
            "(timm's VisionTransformer or Eva); hierarchical, hybrid and convolutional backbones have none"
        ) from None
    encoder = ViTEncoder(vit, mean, std)
    if pos_embed == "sincos" and vit.pos_embed is not None:  # rotary positions only: nothing to fix
        _fix_sincos(encoder)
    return encoder


def _fix_sincos(encoder: ViTEncoder) -> None:
    """The additive PE as fixed 2D sin-cos on the patch rows, zero on the prefix rows, not trained."""
    pe = encoder.vit.pos_embed
    with torch.no_grad():
        pe.zero_()
        pe[0, pe.shape[1] - encoder.num_patches :] = sincos_pos_embed_2d(encoder.grid_size, encoder.embed_dim)
    pe.requires_grad_(False)


def _is_eva(name: str) -> bool:
    """Whether timm makes ``name`` with its ``Eva`` class (rotary positions: DINOv3, EVA-02, ``vit_*_rope_*``)."""
    return timm.models.get_arch_name(name) in _eva_models()


@functools.lru_cache(maxsize=1)
def _eva_models() -> frozenset[str]:
    return frozenset(timm.list_models(module="eva"))


def timm_kwargs(model_cfg: ModelConfig) -> dict:
    """The ``timm.create_model`` keyword arguments of a ``ModelConfig`` (without ``drop_path_rate``, a
    training setting): what ``build_encoder`` creates and what an exported backbone is loaded into."""
    kwargs = {
        "img_size": model_cfg.img_size,
        "patch_size": model_cfg.patch_size,
        "in_chans": model_cfg.in_chans,
        "num_classes": 0,
    }
    if model_cfg.depth is not None:
        kwargs["depth"] = model_cfg.depth
    if model_cfg.global_pool is not None:
        kwargs["global_pool"] = model_cfg.global_pool
    if model_cfg.class_token is not None:
        kwargs["class_token"] = model_cfg.class_token
    return kwargs


def build_encoder(model_cfg: ModelConfig, **overrides) -> ViTEncoder:
    """``create_encoder`` from a ``ModelConfig``; ``overrides`` replace its fields (e.g. ``drop_path_rate``)."""
    model_cfg = dataclasses.replace(model_cfg, **overrides)
    return create_encoder(
        model_cfg.name,
        pos_embed=model_cfg.pos_embed,
        mean=model_cfg.mean,
        std=model_cfg.std,
        drop_path_rate=model_cfg.drop_path_rate,
        **timm_kwargs(model_cfg),
    )


def load_backbone(encoder: ViTEncoder, state: dict, source: str) -> str:
    """Copy pretrained ViT weights (timm's names, or any layout timm's ViT checkpoint filter reads)
    into ``encoder``: positional embedding and patch kernel resampled to this model's grid, an RGB
    patch embedding adapted to 1 channel, the classifier dropped, a sin-cos PE kept fixed.
    Returns a one-line summary; weights that do not fit the model are an error."""
    from timm.models import adapt_input_conv, eva, vision_transformer

    vit, state = encoder.vit, dict(state)
    checkpoint_filter_fn = (eva if isinstance(vit, Eva) else vision_transformer).checkpoint_filter_fn
    conv = state.get("patch_embed.proj.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] != encoder.in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(encoder.in_chans, conv.float())
    has_token, wants_token = "cls_token" in state, vit.cls_token is not None
    if "pos_embed" in state and has_token != wants_token:  # timm's layout, the other kind of ViT
        raise DilemmaError(
            f"{source}: the pretrained ViT {'has a' if has_token else 'has no'} class token and this model "
            f"{'has one' if wants_token else 'has none'}: start a model like it (model.class_token="
            f"{str(has_token).lower()}, model.global_pool={'token' if has_token else 'avg'})"
        )
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as err:  # noqa: BLE001 - a layout timm cannot convert
        raise DilemmaError(f"{source}: not a ViT state dict timm can read ({err})") from None
    state = {k: v for k, v in state.items() if not k.startswith("head")}  # the classifier is not the backbone
    fixed_pe = vit.pos_embed is not None and not vit.pos_embed.requires_grad  # sin-cos: keep ours
    if fixed_pe:
        state.pop("pos_embed", None)
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise DilemmaError(f"{source} does not fit model {vit.__class__.__name__} as configured: {detail}") from None
    missing = [k for k in missing if not k.startswith("head") and not (fixed_pe and k == "pos_embed")]
    if missing or unexpected:
        raise DilemmaError(
            f"{source} does not fit the configured model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    kept = " (positional embedding: fixed sin-cos, not loaded)" if fixed_pe else ""
    return f"pretrained: {len(state)} tensors from {source}{kept}"
