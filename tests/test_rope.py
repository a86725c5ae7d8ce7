"""ViTs with rotary positions (timm's ``Eva`` class: DINOv3, EVA-02, ``vit_*_rope_*``) as encoders:
dense equal to timm, sparsity gathering the kept tokens' angles as timm's own patch dropout does,
and a misplaced token rotated exactly as if its patch were at the position it is told."""

import json

import pytest
import safetensors
import timm
import torch

from dilemma.cli import main
from dilemma.methods import METHODS
from dilemma.models import create_encoder
from dilemma.pretext import sample_tokens
from tests.conftest import TINY

# one of each kind: rotary only with registers (DINOv3), rotary + an additive table (EVA-02, and
# timm's rope_ape without a class-token row), per-block learned frequencies (rope_mixed)
FAMILIES = [
    "vit_small_patch16_dinov3",
    "eva02_tiny_patch14_224",
    "vit_small_patch16_rope_ape_224",
    "vit_small_patch16_rope_mixed_224",
]


def _encoder(name: str):
    """A random-init model whose outputs depend on positions: at timm's init the layer scales
    (1e-5 in DINOv3) and the attention logits are so small that a rotation changes outputs by ~1e-6;
    with layer scales of 1 and larger attention weights it changes them by O(1), so the tests below
    can tell one position from another."""
    torch.manual_seed(0)
    encoder = create_encoder(name, depth=2, pos_embed="learned").eval()
    with torch.no_grad():
        for block in encoder.vit.blocks:
            for name_, param in block.named_parameters():
                if name_.startswith(("gamma_", "ls1.", "ls2.")):
                    param.fill_(1.0)
            for layer in block.attn.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(4.0)
    return encoder


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_forward_is_timms(name):
    encoder, x = _encoder(name), torch.randn(3, 1, 28, 28)
    vit = encoder.vit
    with torch.no_grad():
        embedding, patches = encoder(x)
        features = vit.forward_features(x)  # (B, P + L, D) after the final norm
        assert torch.equal(embedding, vit.forward_head(features, pre_logits=True))
        assert torch.equal(patches, features[:, vit.num_prefix_tokens :])
        assert torch.equal(encoder.embed(x), embedding)


class _KeepThese(torch.nn.Module):
    """timm's patch dropout with the keep indices chosen by the test (prefix tokens always kept)."""

    def __init__(self, keep: torch.Tensor, prefix: int):
        super().__init__()
        self.keep, self.prefix = keep, prefix

    def forward(self, x):
        patches = x[:, self.prefix :].gather(1, self.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, : self.prefix], patches], dim=1), self.keep


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_forward_gathers_the_kept_angles_as_timm_does(name):
    """Our sparse forward equals timm's forward with its own patch dropout keeping the same tokens
    (timm then gathers the rotary angles by the keep indices: ``apply_keep_indices_nlc``)."""
    encoder, x = _encoder(name), torch.randn(2, 1, 28, 28)
    keep = torch.stack([torch.randperm(49, generator=torch.Generator().manual_seed(i))[:12] for i in range(2)])
    keep = keep.sort(dim=1).values
    vit = encoder.vit
    with torch.no_grad():
        ours = encoder(x, keep)[1]
        vit.patch_drop = _KeepThese(keep, vit.num_prefix_tokens)
        reference = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_misplaced_token_is_rotated_as_if_its_patch_were_there(name):
    """Every token told another position (a permutation of the grid) gives what the image with its
    patch moved to that position gives there: the angles (and any additive row) follow ``positions``."""
    encoder, x = _encoder(name), torch.randn(2, 1, 28, 28)
    told = torch.stack([torch.randperm(49, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
    keep = torch.arange(49).expand(2, -1)
    # the image whose patch told[b, i] holds the content of patch i
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 1, 49, 4, 4)
    moved = torch.empty_like(patches)
    for b in range(2):
        moved[b, :, told[b]] = patches[b]
    moved = moved.reshape(2, 1, 7, 7, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 28, 28)
    with torch.no_grad():
        misplaced = encoder(x, keep, told)[1]  # (B, 49, D), token i at position told[b, i]
        real = encoder(moved)[1]  # (B, 49, D) in grid order
    assert torch.allclose(misplaced, real.gather(1, told.unsqueeze(-1).expand_as(real)), atol=1e-5)
    with torch.no_grad():  # and a token told another position than its own is not computed as at its own
        assert (misplaced - encoder(x)[1]).abs().max() > 0.05


def test_the_angles_each_block_gets_are_those_of_the_told_positions():
    encoder = _encoder("vit_small_patch16_rope_224")
    sample = sample_tokens(4, 49, 0.5, 0.3, generator=torch.Generator().manual_seed(0))
    table = encoder.vit.rope.get_embed(shape=[7, 7])  # (L, R)
    seen = []
    hook = encoder.vit.blocks[0].register_forward_pre_hook(lambda m, a, k: seen.append(k["rope"]), with_kwargs=True)
    with torch.no_grad():
        encoder(torch.randn(4, 1, 28, 28), sample.keep, sample.positions)
    hook.remove()
    (angles,) = seen  # (B, 1, K, R): one row per kept patch token; the prefix token is not rotated
    assert angles.shape == (4, 1, sample.keep.shape[1], table.shape[1])
    assert torch.equal(angles[:, 0], table[sample.positions])
    wrong = sample.misplaced  # misplaced: another position's angles, never their own
    assert wrong.any() and not torch.equal(angles[:, 0][wrong], table[sample.keep][wrong])
    assert torch.equal(angles[:, 0][~wrong], table[sample.keep][~wrong])


def _sets(*extra: str) -> list[str]:
    return [a for kv in [*TINY, *extra] for a in ("--set", kv)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_step_on_a_rope_vit(tmp_path, method):
    extra = ["model.name=vit_small_patch16_rope_224", f"method.name={method}", "eval.knn_at_end=false"]
    if method == "ijepa":
        extra += ["model.global_pool=avg", "model.class_token=false", "dilemma.drop_rate=0"]
    if method == "droppos":  # its task is in its recipe
        extra += list(METHODS[method].recipe)
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--max-steps", "1", *_sets(*extra)]) == 0


def test_dinov3_with_registers_exports_to_timm_with_equal_features(tmp_path):
    run, out = tmp_path / "r", tmp_path / "exported"
    extra = ["model.name=vit_small_patch16_dinov3", "eval.knn_at_end=false"]
    assert main(["pretrain", "--out", str(run), "--max-steps", "2", *_sets(*extra)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    from dilemma.weights import encoder_from_checkpoint

    encoder, _ = encoder_from_checkpoint(run)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(vit(x), encoder.eval().embed(x), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_small_patch16_dinov3"
    file = tmp_path / "backbone.safetensors"
    assert main(["export", str(run), "--out", str(file)]) == 0
    assert safetensors.safe_open(str(file), "pt").metadata()["timm_model"] == "vit_small_patch16_dinov3"


def test_a_dinov3_start_from_the_local_cache_without_network(tmp_path, monkeypatch, capsys):
    """``model.pretrained`` with a DINOv3 name: its weights from the Hugging Face cache (here random
    ones put where the cache keeps them), at this run's patch size and channels, no network."""
    import socket

    from dilemma.weights import pretrained_state
    from tests.test_real_data import _cache_timm_weights

    name = "vit_small_patch16_dinov3"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_timm_weights(tmp_path / "hub", name)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a network request was made"))
    state, where = pretrained_state(name)
    assert "rope.periods" not in state or state["rope.periods"].ndim == 1
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384) and "model.safetensors" in where
    run = tmp_path / "r"
    argv = ["pretrain", "--out", str(run), "--max-steps", "1", *_sets(f"model.name={name}", "model.depth=null",
            f"model.pretrained={name}", "eval.knn_at_end=false")]  # fmt: skip
    assert main(argv) == 0
    assert f"from {name}" in capsys.readouterr().err
    from dilemma.weights import encoder_from_checkpoint

    encoder, _ = encoder_from_checkpoint(run)  # started there: one warm-up step moves it little
    started = state["blocks.11.mlp.fc2.weight"]
    assert torch.allclose(encoder.vit.state_dict()["blocks.11.mlp.fc2.weight"], started, atol=1e-2)
