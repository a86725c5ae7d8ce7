"""The sampler, labels and loss of the DILEMMA pretext (docs/method.md, defects 2-5 among them)."""

import math

import pytest
import torch

from dilemma.errors import DilemmaError
from dilemma.pretext import Dilemma, auroc, binary_entropy, detection_loss, num_kept, sample_tokens

CASES = [(b, L, r) for b in (1, 3, 16) for L in (49, 16, 7) for r in (0.0, 0.3, 0.5, 0.75, 0.9) if L * (1 - r) >= 1]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("batch,L,r", CASES)
def test_sampler_shapes_and_rules(batch, L, r):
    p = 0.4
    s = sample_tokens(batch, L, r, p, generator=_gen())
    K = math.floor(L * (1 - r) + 1e-9)
    assert s.keep.shape == s.positions.shape == s.misplaced.shape == (batch, K)
    assert s.keep.dtype == s.positions.dtype == torch.long and s.misplaced.dtype == torch.bool
    for b in range(batch):
        keep = s.keep[b].tolist()
        assert len(set(keep)) == K and keep == sorted(keep)
        assert all(0 <= i < L for i in keep) and all(0 <= i < L for i in s.positions[b].tolist())
    # Labels are exactly "position differs from the token's own" (defect 2: never own position).
    assert torch.equal(s.misplaced, s.positions != s.keep)


@pytest.mark.parametrize("r", [0.5, 0.75, 0.9])
def test_wrong_positions_come_from_dropped_without_replacement(r):
    L, p = 49, 0.5
    s = sample_tokens(64, L, r, p, generator=_gen(1))
    for b in range(64):
        kept = set(s.keep[b].tolist())
        wrong = s.positions[b][s.misplaced[b]].tolist()
        if len(wrong) <= L - len(kept):
            assert not set(wrong) & kept, "wrong positions must be dropped positions"
            assert len(set(wrong)) == len(wrong), "no two tokens of an image share a PE"
            assert len(set(s.positions[b].tolist())) == len(kept)


def test_dense_fallback_uses_other_positions_and_odd_middle_token():
    # r = 0: no dropped positions; every misplaced token, the middle one of odd L included, gets
    # a position different from its own (the authors' reversed permutation failed exactly here).
    L = 49
    s = sample_tokens(256, L, 0.0, 1.0, generator=_gen(2))
    assert s.misplaced.all()
    assert (s.positions != s.keep).all()
    middle = s.positions[:, L // 2]
    assert (middle != L // 2).all()
    # uniform over the other L - 1 positions: every other position is used for the middle token
    assert set(middle.tolist()) == set(range(L)) - {L // 2}


def test_fallback_per_image_when_too_few_dropped():
    # L = 10, r = 0.1: one dropped position; images with >= 2 misplaced tokens must fall back.
    s = sample_tokens(500, 10, 0.1, 0.5, generator=_gen(3))
    counts = s.misplaced.sum(1)
    assert (counts >= 2).any() and (counts == 1).any()
    for b in torch.nonzero(counts == 1).flatten().tolist():
        dropped = set(range(10)) - set(s.keep[b].tolist())
        assert set(s.positions[b][s.misplaced[b]].tolist()) <= dropped
    assert (s.positions[s.misplaced] != s.keep[s.misplaced]).all()


def test_each_image_gets_its_own_keep_set_and_positions():
    # Defect 5: indices were broadcast from one image to the whole batch.
    s = sample_tokens(32, 49, 0.75, 0.5, generator=_gen(4))
    assert len({tuple(row) for row in s.keep.tolist()}) == 32
    assert len({tuple(row) for row in s.positions.tolist()}) == 32


def test_misplacement_rate_and_keep_uniformity():
    L = 16
    s = sample_tokens(4000, L, 0.5, 0.2, generator=_gen(5))
    assert abs(s.misplaced.float().mean().item() - 0.2) < 0.01
    freq = torch.bincount(s.keep.flatten(), minlength=L).float() / s.keep.numel()
    assert (freq - 1 / L).abs().max() < 0.01
    per_image = s.misplaced.sum(1)
    assert per_image.min() < per_image.max(), "the count per image varies (Bernoulli flags)"


@pytest.mark.parametrize("r", [0.0, 0.75])
def test_p_zero_is_clean_and_p_one_flags_all(r):
    clean = sample_tokens(8, 49, r, 0.0, generator=_gen(6))
    assert not clean.misplaced.any() and torch.equal(clean.positions, clean.keep)
    assert sample_tokens(8, 49, r, 1.0, generator=_gen(6)).misplaced.all()


def test_generator_makes_it_deterministic():
    a = sample_tokens(4, 49, 0.75, 0.2, generator=_gen(7))
    b = sample_tokens(4, 49, 0.75, 0.2, generator=_gen(7))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.positions, b.positions)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ({"drop_rate": -0.1}, r"drop_rate must be in \[0, 1\)"),
        ({"misplace_prob": 1.5}, r"misplace_prob must be in \[0, 1\]"),
        ({"misplace_prob": -0.01}, r"misplace_prob must be in \[0, 1\]"),
        ({"drop_rate": 0.99}, "K = 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {"batch_size": 2, "num_patches": 49, "drop_rate": 0.5, "misplace_prob": 0.2} | kwargs
    with pytest.raises(DilemmaError, match=match):
        sample_tokens(**args)


def test_num_kept_floor_with_round_off():
    assert num_kept(10, 0.9) == 1  # 10 * 0.1 is 0.999... in floating point
    assert num_kept(49, 0.75) == 12 and num_kept(49, 0.0) == 49 and num_kept(7, 0.5) == 3


def test_entropy_and_constant_predictor():
    assert binary_entropy(0.2) == pytest.approx(0.5004, abs=1e-4)
    labels = torch.rand(10000, generator=_gen(8)) < 0.2
    const = torch.full((10000,), math.log(0.2 / 0.8))
    assert detection_loss(const, labels).item() == pytest.approx(binary_entropy(0.2), abs=0.01)


def test_auroc_matches_pairwise_definition():
    g = _gen(9)
    scores = torch.randint(0, 5, (300,), generator=g).float()  # many ties
    labels = torch.rand(300, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean().item()
    assert auroc(scores, labels) == pytest.approx(brute, abs=1e-6)
    assert auroc(torch.ones(10), torch.arange(10) < 3) == 0.5
    assert auroc(torch.arange(10.0), torch.arange(10) >= 5) == 1.0
    assert math.isnan(auroc(torch.arange(4.0), torch.zeros(4, dtype=torch.bool)))


@pytest.mark.parametrize("r", [0.0, 0.3, 0.75, 0.9])
def test_head_logits_match_label_shape(tiny_encoder, r):
    # Defect 3: the head saw L tokens while the labels had K columns.
    enc = tiny_encoder()
    pretext = Dilemma(enc.embed_dim, enc.num_patches, misplace_prob=0.2, drop_rate=r)
    s = pretext.sample(3, generator=_gen(10))
    _, patches = enc(torch.randn(3, 1, 28, 28), keep=s.keep, positions=s.positions)
    bce, metrics = pretext.loss(patches, s, with_metrics=True)
    assert patches.shape[1] == s.misplaced.shape[1] == num_kept(49, r)
    assert bce.ndim == 0 and torch.isfinite(bce) and set(metrics) == {"det_acc", "det_auroc"}


def test_baseline_switches():
    # Defect 4: p = 0 must run (no head, no loss) and p = 0, r = 0 is the identity.
    sparse_only = Dilemma(32, 49, misplace_prob=0.0, drop_rate=0.75)
    assert sparse_only.head is None and not sparse_only.identity
    s = sparse_only.sample(2)
    assert s.keep.shape == (2, 12) and not s.misplaced.any()
    assert sparse_only.loss(torch.randn(2, 12, 32), s) == (None, {})
    plain = Dilemma(32, 49, misplace_prob=0.0, drop_rate=0.0)
    assert plain.identity and plain.sample(2) is None
