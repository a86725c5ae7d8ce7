"""Position prediction (``dilemma.task=predict``, DropPos / MP3) beside detection, at the tensor level
and on runs: who is asked, what enters the encoder, the loss, its switches, and DropPos."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dilemma.cli import main
from dilemma.position_task import position_loss, position_metrics, position_targets
from dilemma.pretext import Dilemma, sample_tokens
from tests.conftest import TINY, embedded_views, tiny_method

PREDICT = ("dilemma.task=predict", "dilemma.position_drop_prob=0.5")


def test_unplaced_tokens_are_drawn_with_the_detection_flags_and_keep_the_same_keep_sets():
    detect = sample_tokens(64, 49, 0.5, 0.3, generator=torch.Generator().manual_seed(1))
    predict = sample_tokens(64, 49, 0.5, 0.0, unplace_prob=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(detect.keep, predict.keep)  # the arms differ in the task only
    assert torch.equal(detect.misplaced, predict.unplaced) and not predict.misplaced.any()
    assert torch.equal(predict.positions[~predict.unplaced], predict.keep[~predict.unplaced])
    assert (predict.positions[predict.unplaced] == -1).all() and 0.2 < predict.unplaced.float().mean() < 0.4


def test_the_encoder_input_carries_no_position_exactly_where_asked():
    """At the encoder's input: an unplaced token is its patch embedding + the no-position embedding,
    every other kept token its patch embedding + its own PE row; prefix tokens untouched."""
    method, _ = tiny_method("mocov3", *PREDICT)
    encoder, dilemma = method.encoder, method.dilemma
    images = torch.randn(6, 1, 28, 28)
    sample = dilemma.sample(6, generator=torch.Generator().manual_seed(0))
    no_position = dilemma.no_position_embedding
    with torch.no_grad():
        x = encoder.tokens(images, sample.keep, sample.positions, no_position=no_position)
        x = x[:, encoder.num_prefix_tokens :]  # (B, K, D): the kept patch tokens
        content = encoder.vit.patch_embed(images)  # (B, L, D) without any PE
        content = content.gather(1, sample.keep.unsqueeze(-1).expand(-1, -1, content.shape[-1]))
        pe = encoder.vit.pos_embed[0, encoder.num_prefix_tokens :][sample.keep]  # true rows
    unplaced = sample.unplaced
    assert unplaced.any() and (~unplaced).any()
    assert torch.allclose(x[~unplaced], (content + pe)[~unplaced], atol=1e-6)
    assert torch.allclose(x[unplaced], content[unplaced] + no_position, atol=1e-6)


def test_a_rotary_token_without_a_position_is_not_rotated():
    from tests.test_rope import _encoder

    encoder = _encoder("vit_small_patch16_rope_224")
    sample = sample_tokens(4, 49, 0.5, 0.0, unplace_prob=0.5, generator=torch.Generator().manual_seed(0))
    angles = encoder.rotary(torch.randn(4, 1, 28, 28), sample.keep, sample.positions)[:, 0]  # (B, K, R)
    table = encoder.vit.rope.get_embed(shape=[7, 7])
    half = table.shape[-1] // 2
    asked = sample.unplaced
    assert torch.equal(angles[asked][:, :half], torch.zeros_like(angles[asked][:, :half]))  # sin 0
    assert torch.equal(angles[asked][:, half:], torch.ones_like(angles[asked][:, half:]))  # cos 1
    assert torch.equal(angles[~asked], table[sample.keep][~asked])


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_the_loss_is_the_direct_computation(sigma):
    grid = (3, 4)
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 5, 11, 3, 7], [1, 2, 4, 6, 8]])
    asked = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    per_image = []
    for b in range(2):
        terms = []
        for k in range(5):
            if not asked[b, k]:
                continue
            r, c = divmod(int(labels[b, k]), 4)
            if sigma == 0:
                target = torch.zeros(12)
                target[labels[b, k]] = 1.0
            else:
                target = torch.tensor([math.exp(-((r - j // 4) ** 2 + (c - j % 4) ** 2) / sigma**2) for j in range(12)])
                target = target / target.sum()
            terms.append(-(target * F.log_softmax(logits[b, k], dim=-1)).sum())
        per_image.append(torch.stack(terms).mean())
    direct = torch.stack(per_image).mean()
    assert torch.allclose(position_loss(logits, labels, asked, grid, sigma), direct, atol=1e-6)
    if sigma:  # the neighbours of position 5 (row 1, column 1) share the label, by distance
        target = position_targets(torch.tensor(5), grid, sigma)
        assert torch.isclose(target[4], target[1]) and target[5] > target[4] > target[0]
        assert target.sum().item() == pytest.approx(1.0)


def test_metrics_top1_top5_and_distance():
    logits = torch.full((3, 12), -10.0)
    logits[0, 5] = logits[1, 0] = logits[2, 11] = 10.0  # predictions 5, 0, 11
    metrics = position_metrics(logits, torch.tensor([5, 3, 7]), (3, 4))  # true 5, 3 (0,3), 7 (1,3)
    assert metrics["pos_top1"] == pytest.approx(100 / 3)
    assert metrics["pos_dist"] == pytest.approx((0 + 3 + 1) / 3)  # 0 -> 3: 3 columns; 11 -> 7: 1 row
    assert metrics["pos_top5"] >= metrics["pos_top1"]


def test_share_zero_means_no_head_and_no_change_to_the_tokens():
    off = Dilemma(192, 49, drop_rate=0.5, task="predict", position_drop_prob=0.0)
    assert off.position_head is None and off.no_position is None and off.head is None
    sparse = Dilemma(192, 49, misplace_prob=0.0, drop_rate=0.5)
    a = off.sample(8, generator=torch.Generator().manual_seed(3))
    b = sparse.sample(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.positions, a.keep) and torch.equal(b.positions, b.keep)
    none = Dilemma(192, 49, misplace_prob=0.2, drop_rate=0.5, task="none")
    assert none.head is None and none.position_head is None and not none.sample(2).unplaced.any()


def test_a_head_trained_on_shuffled_labels_stays_at_chance():
    """Trained on positions shuffled among the tokens, the head predicts held-out tokens at chance (no
    leak through the head, the loss or the token order); the same head and training read true
    positions off tokens that carry their PE (a positive control: the probe can learn)."""
    method, cfg = tiny_method("mocov3", "dilemma.task=predict", "dilemma.position_drop_prob=1.0")
    images = embedded_views(cfg, 64)[0]
    sample = method.dilemma.sample(64, generator=torch.Generator().manual_seed(0))
    no_position = method.dilemma.no_position_embedding
    with torch.no_grad():
        _, unplaced = method.encoder(images, sample.keep, sample.positions, no_position=no_position)
        _, placed = method.encoder(images, sample.keep, sample.keep)  # the same tokens at their own places
    labels = sample.keep.reshape(-1)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    half = len(labels) // 2

    def held_out_top1(tokens, targets):
        features = tokens.reshape(-1, tokens.shape[-1])
        torch.manual_seed(0)
        head = torch.nn.Linear(features.shape[1], 49)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(head(features[:half]), targets[:half]).backward()
            opt.step()
        return (head(features[half:]).argmax(-1) == targets[half:]).float().mean().item()

    chance = 1 / 49
    assert held_out_top1(unplaced, shuffled) < 3 * chance  # ~2 %
    assert held_out_top1(placed, shuffled) < 3 * chance
    assert held_out_top1(placed, labels) > 0.5


def test_every_trainable_parameter_takes_part_in_predict():
    for name, extra in [("mocov3", PREDICT), ("ijepa", (*PREDICT, "model.global_pool=avg", "model.class_token=false",
                        "dilemma.drop_rate=0")), ("ibot", PREDICT), ("droppos", ())]:  # fmt: skip
        method, cfg = tiny_method(name, *extra)
        method(embedded_views(cfg, 8), 0.3, torch.Generator().manual_seed(0)).loss.backward()
        idle = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert not idle, (name, idle)
        assert method.dilemma.no_position.embedding.grad.abs().sum() > 0


def _run(tmp_path, *sets, steps=4):
    out = tmp_path / "r"
    args = [a for kv in [*TINY, *sets, "eval.knn_at_end=false", "train.log_every=1"] for a in ("--set", kv)]
    assert main(["pretrain", "--out", str(out), "--max-steps", str(steps), *args]) == 0
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_the_position_metrics_and_the_decaying_width(tmp_path, capsys):
    out, records = _run(tmp_path, *PREDICT, "dilemma.position_smoothing=2")
    logged = records[:-1]
    assert all({"pos_ce", "pos_top1", "pos_top5", "pos_dist", "pos_sigma"} <= set(r) for r in logged)
    assert "det_bce" not in logged[0]
    sigmas = [r["pos_sigma"] for r in logged]
    assert sigmas[0] == pytest.approx(2.0) and sigmas == sorted(sigmas, reverse=True) and sigmas[-1] < 2.0
    assert "position prediction q=0.5 sigma=2 r=0.75" in capsys.readouterr().err
    assert main(["inspect", str(out), "--num-images", "2"]) == 0
    assert (out / "positions.png").stat().st_size > 0


@pytest.mark.parametrize(
    "sets, words",
    [
        ((), "p=0.2 r=0.75"),  # DILEMMA, the default
        (("dilemma.misplace_prob=0",), "p=0 r=0.75"),  # sparsity alone, said as DILEMMA's switches
        (("dilemma.task=predict", "dilemma.position_drop_prob=0"), "no position task, r=0.75"),  # q = 0: nothing runs
        (("dilemma.task=none",), "no position task, r=0.75"),
        (("dilemma.weight=0",), "no position task, r=0.75"),
    ],
)
def test_the_start_line_says_the_task_that_runs(sets, words):
    from dilemma.build import _pretext_words
    from dilemma.config import load_config

    assert _pretext_words(load_config(None, list(sets)).dilemma) == words


def test_resume_is_exact_with_the_width_schedule(tmp_path):
    import shutil

    from dilemma.rundir import load_checkpoint

    common = [*PREDICT, "dilemma.position_smoothing=1", "train.ckpt_every=2"]
    straight, _ = _run(tmp_path / "a", *common)
    stopped = tmp_path / "b" / "r"
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000002.pt", stopped / "checkpoints" / "last.pt")
    args = [a for kv in [*TINY, *common, "eval.knn_at_end=false", "train.log_every=1"] for a in ("--set", kv)]
    assert main(["pretrain", "--out", str(stopped), "--resume", "--max-steps", "4", *args]) == 0
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt")["model"] for run in (straight, stopped))
    assert all(torch.equal(value, b[key]) for key, value in a.items())


def test_droppos_runs_with_its_recipe_and_refuses_without_its_task(tmp_path, capsys):
    out = tmp_path / "r"
    args = [a for kv in [*TINY, "eval.knn_at_end=false", "train.log_every=1"] for a in ("--set", kv)]
    assert main(["pretrain", "--out", str(out), "--method", "droppos", "--max-steps", "2", *args]) == 0
    err = capsys.readouterr().err
    assert "dilemma.task=predict" in err and "position prediction q=0.75 sigma=1 r=0.75" in err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["pos_ce"] == record["loss"] and record["pos_sigma"] == 1.0 and "pos_top1" in record
    bad = ["pretrain", "--out", str(tmp_path / "x"), "--max-steps", "1", "--set", "method.name=droppos", *args]
    assert main(bad) == 2
    assert "DropPos predicts positions: set dilemma.task=predict" in capsys.readouterr().err


def test_droppos_attentive_weights_sum_to_one_per_image_and_favour_the_class_tokens_neighbours():
    method, cfg = tiny_method("droppos")
    images = embedded_views(cfg, 4)[0]
    keep = method.dilemma.sample(4, generator=torch.Generator().manual_seed(0)).keep
    weights = method.attention_weights(images, keep)
    assert weights.shape == keep.shape and torch.allclose(weights.sum(1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        cls, patches = method.encoder(images)
    similarity = F.cosine_similarity(cls.unsqueeze(1), patches, dim=-1).gather(1, keep)
    assert torch.equal(weights.argmax(1), similarity.argmax(1))


def test_local_crops_cannot_be_asked_their_positions(tmp_path, capsys):
    args = [a for kv in [*TINY, *PREDICT, "method.dino.local_dilemma=true", "eval.knn_at_end=false"]
            for a in ("--set", kv)]  # fmt: skip
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--method", "dino", "--max-steps", "1", *args]) == 2
    assert "keep method.dino.local_dilemma=false" in capsys.readouterr().err


def test_only_the_tokens_without_a_position_are_asked():
    dilemma = Dilemma(8, 16, drop_rate=0.5, task="predict", position_drop_prob=0.5, grid=(4, 4))
    sample = dilemma.sample(4, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(4, 8, 8)
    loss, _ = dilemma.loss(tokens, sample)
    other = tokens.clone()
    other[~sample.unplaced] += 5.0  # the tokens that kept their position: not asked, no effect
    assert torch.equal(dilemma.loss(other, sample)[0], loss)
    other[sample.unplaced] += 5.0
    assert not torch.equal(dilemma.loss(other, sample)[0], loss)


def test_detection_keeps_its_plain_mean_bit_for_bit():
    """Task detect is the BCE it always was: the plain mean (no per-image weighting) when nothing is
    left out, so runs made before the position task existed compute the same loss."""
    dilemma = Dilemma(8, 16, misplace_prob=0.3, drop_rate=0.5)
    sample = dilemma.sample(4, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(4, 8, 8)
    direct = F.binary_cross_entropy_with_logits(dilemma.head(tokens).float(), sample.misplaced.float())
    assert torch.equal(dilemma.loss(tokens, sample)[0], direct)


def test_a_vanishing_width_is_one_hot_not_nan():
    target = position_targets(torch.tensor([3, 7]), (3, 4), 1e-30)
    assert torch.equal(target, F.one_hot(torch.tensor([3, 7]), 12).float())
