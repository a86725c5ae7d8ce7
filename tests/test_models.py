"""The ViT really receives the kept tokens and the corrupted positions (docs/method.md, defects 1 and 5)."""

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

from dilemma.errors import DilemmaError
from dilemma.models import create_encoder, sincos_pos_embed_2d
from dilemma.pretext import sample_tokens

LAYOUTS = [{}, {"no_embed_class": True}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_dense_forward_equals_timm(tiny_encoder, layout, pos_embed):
    enc = tiny_encoder(pos_embed=pos_embed, **layout).eval()
    x = torch.randn(3, 1, 28, 28)
    cls, patches = enc(x)
    reference = enc.vit.forward_features(x)
    assert torch.allclose(patches, reference[:, enc.num_prefix_tokens :], atol=1e-6)
    # the image embedding as timm pools it (class token, or mean of patches then fc_norm)
    assert torch.allclose(cls, enc.vit.forward_head(reference, pre_logits=True), atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_receive_kept_tokens_with_corrupted_positions(tiny_encoder, layout):
    enc = tiny_encoder(pos_embed="learned", **layout).eval()
    with torch.no_grad():
        enc.vit.pos_embed.normal_()
    x = torch.randn(4, 1, 28, 28)
    s = sample_tokens(4, enc.num_patches, 0.75, 0.5, generator=torch.Generator().manual_seed(0))
    assert s.misplaced.any()
    seen = {}
    enc.vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach()))
    enc(x, keep=s.keep, positions=s.positions)

    vit, prefix = enc.vit, enc.num_prefix_tokens
    pe = vit.pos_embed[0]
    patch_pe = pe if vit.no_embed_class else pe[prefix:]
    tokens = vit.patch_embed(x)
    expected = torch.stack([tokens[b, s.keep[b]] + patch_pe[s.positions[b]] for b in range(4)])
    assert seen["x"].shape == (4, prefix + s.keep.shape[1], enc.embed_dim)
    assert torch.allclose(seen["x"][:, prefix:], expected, atol=1e-6)
    if prefix:  # prefix tokens keep their own PE (if any) and are never dropped
        own = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
        prefix_tokens = torch.cat(own, dim=1)[0] + (0 if vit.no_embed_class else pe[:prefix])
        assert torch.allclose(seen["x"][:, :prefix], prefix_tokens.expand(4, -1, -1), atol=1e-6)


@pytest.mark.parametrize("layout", [*LAYOUTS, {"block_fn": ResPostBlock}])
def test_embed_is_the_full_forwards_image_embedding(tiny_encoder, layout):
    """``embed`` skips the last block's MLP for the patch tokens exactly where the embedding is the
    class token of a pre-norm block, and gives ``forward``'s embedding, values and gradients."""
    enc = tiny_encoder(**layout).double()  # float64: the two paths' round-off stays far below the tolerances
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    s = sample_tokens(3, enc.num_patches, 0.75, 0.5, generator=torch.Generator().manual_seed(0))
    params = [p for p in enc.parameters() if p.requires_grad]
    mlp_tokens = []
    enc.vit.blocks[-1].mlp.register_forward_pre_hook(lambda module, args: mlp_tokens.append(args[0].shape[1]))
    shortcut = enc.vit.has_class_token and "block_fn" not in layout
    for keep, positions in ((None, None), (s.keep, s.positions)):
        full = enc(x, keep, positions)[0]
        full_grads = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
        embedded = enc.embed(x, keep, positions)
        grads = torch.autograd.grad(embedded.square().sum(), params, allow_unused=True)
        assert torch.allclose(embedded, full, rtol=1e-10, atol=1e-10)
        for g, g_full in zip(grads, full_grads, strict=True):
            assert (g is None) == (g_full is None) and (g is None or torch.allclose(g, g_full, rtol=1e-10, atol=1e-10))
        tokens = enc.num_prefix_tokens + (enc.num_patches if keep is None else keep.shape[1])
        assert mlp_tokens[-2:] == [tokens, 1 if shortcut else tokens]


def test_one_changed_position_changes_the_output(tiny_encoder):
    enc = tiny_encoder().eval()
    x = torch.randn(1, 1, 28, 28)
    keep = torch.tensor([[0, 5, 10, 20, 48]])
    cls_a, patches_a = enc(x, keep=keep)
    moved = keep.clone()
    moved[0, 2] = 30  # token from patch 10 now carries the PE of position 30
    cls_b, patches_b = enc(x, keep=keep, positions=moved)
    assert patches_a.shape == (1, 5, enc.embed_dim)
    assert not torch.allclose(cls_a, cls_b) and not torch.allclose(patches_a, patches_b)
    # and the result equals a forward where that patch's pixels really sit at position 30
    assert torch.allclose(enc(x, keep=keep, positions=keep)[0], cls_a)


def test_sparse_forward_returns_k_tokens_and_batch_equals_single(tiny_encoder):
    enc = tiny_encoder().eval()
    x = torch.randn(5, 1, 28, 28)
    s = sample_tokens(5, 49, 0.75, 0.3, generator=torch.Generator().manual_seed(1))
    cls, patches = enc(x, keep=s.keep, positions=s.positions)
    assert patches.shape == (5, 12, enc.embed_dim) and cls.shape == (5, enc.embed_dim)
    for b in range(5):  # each image with its own indices, alone, gives the same result
        cls_b, patches_b = enc(x[b : b + 1], keep=s.keep[b : b + 1], positions=s.positions[b : b + 1])
        assert torch.allclose(cls_b[0], cls[b], atol=1e-5) and torch.allclose(patches_b[0], patches[b], atol=1e-5)


def test_sincos_is_fixed_and_distinct(tiny_encoder):
    enc = tiny_encoder(pos_embed="sincos")
    assert not enc.vit.pos_embed.requires_grad
    pe = sincos_pos_embed_2d((7, 7), 32)
    assert pe.shape == (49, 32) and torch.cdist(pe, pe).add(torch.eye(49)).min() > 0.1
    assert torch.allclose(enc.vit.pos_embed[0, 1:], pe) and (enc.vit.pos_embed[0, 0] == 0).all()
    assert tiny_encoder(pos_embed="learned").vit.pos_embed.requires_grad


def test_any_timm_vit_with_overrides():
    enc = create_encoder("vit_small_patch16_224", img_size=32, patch_size=8, in_chans=3, depth=1)
    cls, patches = enc(torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 384) and patches.shape == (2, 16, 384)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"img_size": 30, "patch_size": 4}, "not divisible"),
        ({"pos_embed": "rope"}, "pos_embed"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(DilemmaError, match=match):
        create_encoder("vit_tiny_patch16_224", **{"depth": 1, **kwargs})


def test_unknown_model_and_wrong_image_size(tiny_encoder):
    with pytest.raises(DilemmaError, match="unknown timm model"):
        create_encoder("vit_tinny_patch16_224")
    with pytest.raises(DilemmaError, match="do not fit"):
        tiny_encoder()(torch.randn(2, 1, 30, 30))
