"""I-JEPA: multi-block masks, the predictor given target positions and never target tokens, the
loss against a direct computation, the target encoder, DILEMMA on the context tokens, and the
average-pooled ViT without a class token that I-JEPA reads out."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from dilemma.cli import main
from dilemma.config import load_config
from dilemma.errors import DilemmaError
from dilemma.masks import batch_draws, cut_contexts, multi_block_masks
from dilemma.pretext import GlobalBatchRows, PositionDraws, misplace_tokens
from dilemma.weights import encoder_from_checkpoint
from tests.conftest import IJEPA_RECIPE, TINY, embedded_views, tiny_method


def _ijepa(*overrides):
    return tiny_method("ijepa", *IJEPA_RECIPE, *overrides)


def _as_sets(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``(B, ...)`` patch indices -> ``(B, L)`` bool membership."""
    return torch.zeros(indices.shape[0], num_patches, dtype=torch.bool).scatter(1, indices.flatten(1), True)


def test_multi_block_masks_follow_the_paper():
    masks = multi_block_masks(64, (14, 14), generator=torch.Generator().manual_seed(0))
    again = multi_block_masks(64, (14, 14), generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks.context, again.context) and torch.equal(masks.targets, again.targets)
    batch, blocks, per_block = masks.targets.shape
    assert (batch, blocks) == (64, 4) and 0.15 * 196 * 0.8 <= per_block <= 0.2 * 196 * 1.2  # one size per batch
    context, targets = masks.context, _as_sets(masks.targets, 196)
    assert not (context & targets).any()  # the context never sees a target patch
    assert (context.sum(dim=1) >= 10).all()
    cut = cut_contexts(context, torch.rand(64, 196, generator=torch.Generator().manual_seed(1)))
    assert cut.shape[1] == context.sum(dim=1).min() and (cut.diff(dim=1) > 0).all()  # the smallest; sorted, distinct
    assert context.gather(1, cut).all()  # a subset of each context
    # every target block is a filled rectangle: h rows of w consecutive columns
    rows, cols = masks.targets // 14, masks.targets % 14
    height = rows.amax(-1) - rows.amin(-1) + 1
    width = cols.amax(-1) - cols.amin(-1) + 1
    assert ((height * width) == per_block).all() and (masks.targets.sort(-1).values.diff(dim=-1) > 0).all()


def test_multi_block_masks_are_the_same_however_the_batch_is_split():
    def draw(rows, generator):
        masks = multi_block_masks(rows, (7, 7), generator=generator)
        position = PositionDraws.draw(rows, 49, generator=generator)
        return masks.context, masks.targets, position.order, position.flag, position.other

    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    whole = batch_draws(GlobalBatchRows(gen, 6, torch.arange(6)), 6, draw)
    gen.set_state(state)
    half = batch_draws(GlobalBatchRows(gen, 6, torch.tensor([1, 3, 5])), 3, draw)
    assert all(torch.equal(w[1::2], h) for w, h in zip(whole, half, strict=True))


def test_a_context_is_never_empty_and_degenerate_grids_are_refused():
    # 2 x 2 patches, four 1-patch targets: often every place of the 1-patch context is a target
    masks = multi_block_masks(256, (2, 2), target_scale=(0.25, 0.25), generator=torch.Generator().manual_seed(0))
    targets = _as_sets(masks.targets, 4)
    covered = targets.all(dim=1)
    assert covered.any() and masks.context.any(dim=1).all()  # the fallback: the block keeps its targets
    overlap = (masks.context & targets).any(dim=1)
    # ... only where every patch of the chosen block was a target (a context is never part target)
    assert overlap.any() and not (masks.context & ~targets)[overlap].any()
    context = torch.ones(4, 49, dtype=torch.bool)
    context[2] = False
    with pytest.raises(DilemmaError, match="lost every patch to the target blocks"):  # a direct caller's
        cut_contexts(context, torch.rand(4, 49))
    with pytest.raises(DilemmaError, match="leave no room for a context"):
        load_config(None, ["method.name=ijepa", "method.ijepa.targets=6"])
    with pytest.raises(DilemmaError, match="target blocks can cover all 4 patches"):
        _ijepa("model.patch_size=14")


def test_misplacement_on_a_given_keep_set():
    masks = multi_block_masks(256, (7, 7), generator=torch.Generator().manual_seed(0))
    keep = cut_contexts(masks.context, torch.rand(256, 49, generator=torch.Generator().manual_seed(2)))
    sample = misplace_tokens(keep, PositionDraws.draw(256, 49, generator=torch.Generator().manual_seed(1)), 0.3)
    assert torch.equal(sample.keep, keep) and torch.equal(sample.misplaced, sample.positions != keep)
    assert abs(sample.misplaced.float().mean().item() - 0.3) < 0.03
    # a wrong position is one the encoder does not see (enough dropped positions at 7 x 7)
    wrong = torch.where(sample.misplaced, sample.positions, keep)
    assert not (_as_sets(keep, 49).gather(1, wrong) & sample.misplaced).any()


def test_the_predictor_gets_target_positions_never_target_tokens():
    method, cfg = _ijepa("dilemma.misplace_prob=1.0")
    images = embedded_views(cfg, 8)[0]
    seen = []
    method.predictor.register_forward_hook(lambda module, args, out: seen.append((args, out)))
    method((images,), 0.3, torch.Generator().manual_seed(0))
    (context_tokens, context_positions, target_positions), prediction = seen[0]
    sample, targets = method.sample(8, torch.Generator().manual_seed(0), "cpu")
    context = sample.keep
    assert torch.equal(target_positions, targets) and torch.equal(context_positions, context)
    assert sample.misplaced.all() and not torch.equal(sample.positions, context)  # encoder: wrong PEs; predictor: true
    # new pixels in every target patch: the same predictions (no target token reaches the predictor),
    # other targets for the loss
    patched = images.clone().unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 7, 7, 4, 4) views of the patches
    for b in range(8):
        for index in targets[b].flatten().tolist():
            patched[b, :, index // 7, index % 7] = torch.randn(1, 4, 4)
    changed = patched.permute(0, 1, 2, 4, 3, 5).reshape(images.shape)
    assert not torch.equal(changed, images)
    out = method((changed,), 0.3, torch.Generator().manual_seed(0))
    assert torch.allclose(seen[1][1], prediction, atol=1e-6)
    # ... while the positions do steer the predictions
    moved = method.predictor(context_tokens, context_positions, (target_positions + 1) % 49)
    assert not torch.allclose(moved, prediction, atol=1e-4)
    assert out.loss.isfinite()


def test_loss_is_the_direct_computation_and_the_target_encoder_gets_no_gradient():
    method, cfg = _ijepa()
    images = embedded_views(cfg, 8)[0]
    context_in, target_in = [], []
    method.encoder.vit.blocks[0].register_forward_pre_hook(lambda m, a: context_in.append(a[0].shape[:2]))
    method.target_encoder.vit.blocks[0].register_forward_pre_hook(lambda m, a: target_in.append(a[0].shape[:2]))
    out = method((images,), 0.3, torch.Generator().manual_seed(0), True)
    out.loss.backward()
    sample, targets = method.sample(8, torch.Generator().manual_seed(0), "cpu")
    context = sample.keep
    assert context_in == [(8, context.shape[1])] and target_in == [(8, 49)]  # no class token; target dense
    frozen = list(method.target_encoder.parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    # every trainable parameter takes part (DDP without find_unused_parameters needs it): the
    # encoder's final norm of an average-pooling ViT (fc_norm) too, through the predictor's input
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    with torch.no_grad():
        _, tokens = method.encoder(images, context, sample.positions)
        tokens = method.encoder.vit.fc_norm(tokens)  # the LayerNorm an average-pooling ViT ends in
        prediction = method.predictor(tokens, context, targets)
        full = method.target_encoder.vit.fc_norm(method.target_encoder(images)[1])
        squared = []
        for b in range(8):
            for m in range(targets.shape[1]):
                for t in range(targets.shape[2]):
                    target = F.layer_norm(full[b, targets[b, m, t]], (full.shape[-1],))
                    squared.append((prediction[b, m, t] - target).pow(2).mean())
        expected = torch.stack(squared).mean()
    assert torch.allclose(out.logs["ssl_loss"], expected, atol=1e-6)
    assert out.logs["context_tokens"] == context.shape[1]


def test_drop_rate_keeps_a_share_of_the_context():
    dense, _ = _ijepa()
    sparse, _ = _ijepa("dilemma.drop_rate=0.5")
    full = dense.sample(32, torch.Generator().manual_seed(0), "cpu")[0].keep
    half = sparse.sample(32, torch.Generator().manual_seed(0), "cpu")[0].keep
    assert half.shape[1] == full.shape[1] // 2
    assert (_as_sets(half, 49) & ~_as_sets(full, 49)).sum() == 0  # a subset of the same contexts


def test_loss_goes_down_on_a_fixed_batch():
    method, cfg = _ijepa()
    images = embedded_views(cfg, 16)[0]
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        out = method((images,), 1.0, torch.Generator().manual_seed(0))  # momentum 1: fixed targets
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.logs["ssl_loss"].item())
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, [round(v, 3) for v in losses]


def test_average_pooled_backbone_without_class_token_exports_to_timm(tmp_path):
    run = tmp_path / "run"
    sets = [a for kv in [*TINY, *IJEPA_RECIPE, "eval.knn_at_end=false"] for a in ("--set", kv)]
    assert main(["pretrain", "--method", "ijepa", "--out", str(run), "--max-steps", "2", *sets]) == 0
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    meta = safetensors.safe_open(str(out), "pt").metadata()
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs["global_pool"] == "avg" and kwargs["class_token"] is False
    vit = timm.create_model(meta["timm_model"], **kwargs).eval()
    vit.load_state_dict(safetensors.torch.load_file(out), strict=True)
    encoder, _ = encoder_from_checkpoint(run)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(vit(x), encoder.embed(x), atol=1e-5)  # timm's avg pool + fc_norm = our read-out
    assert "avg-pooled patch tokens" in encoder.embedding_kind()


@pytest.mark.parametrize("name", ["ijepa", "mae"])
def test_method_flag_brings_the_recipe_of_its_config_file(name):
    """``Method.recipe`` is what configs/<name>_dilemma.yaml sets outside the method's own section."""
    from dilemma.methods import METHODS

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}_dilemma.yaml").to_dict()
    flagged = load_config(None, [f"method.name={name}", *METHODS[name].recipe]).to_dict()
    for section in ("model", "data", "dilemma", "optim"):
        assert flagged[section] == shipped[section], section


def test_method_flag_applies_the_recipe_unless_a_key_is_given(tmp_path, capsys):
    from dilemma.rundir import load_checkpoint

    run, sets = tmp_path / "run", ["--set", "eval.knn_at_end=false", "--set", "train.show_progress=false"]
    argv = ["pretrain", "--method", "ijepa", "--out", str(run), "--max-steps", "1", *sets]
    assert main([*argv, "--set", "data.hflip=true", "--set", "model.depth=1"]) == 0
    saved = load_checkpoint(run)["config"]
    assert saved["model"]["global_pool"] == "avg" and saved["model"]["class_token"] is False
    assert saved["dilemma"]["drop_rate"] == 0 and saved["data"]["hflip"] is True  # --set wins
    err = capsys.readouterr().err
    assert "note: --method ijepa comes with its recipe: model.global_pool=avg," in err and "hflip" not in err
