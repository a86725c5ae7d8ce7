"""What limits misplaced-token detection: AUROC by what a token shows and where it was sent.

    python benchmarks/detection_study.py RUN [RUN ...] --out benchmarks/results/detection_study.md

For each run (a DILEMMA checkpoint), every val image gets the run's own token sample (p, r; seeded),
the student encoder and its detection head score every kept token, and the AUROC of P(misplaced)
is split by

- the token's own patch: *blank* (no pixel above ``--blank`` of the image's range: background on
  these silhouettes) or *content*;
- for a misplaced token, the patch at its wrong position in the original image: *blank* or
  *content*. A blank patch sent to a blank position carries no evidence at all: the only signal
  left is the position embedding itself, so that share of the positives bounds what any detector
  can do.

Negatives are always the correctly placed tokens of the same kind (own patch blank / content), so
each AUROC asks one question. Writes a markdown table with the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dilemma.build import load_splits
from dilemma.data import eval_batches
from dilemma.methods.mae import patchify
from dilemma.pretext import auroc, sample_tokens
from dilemma.rundir import load_checkpoint
from dilemma.weights import detection_head_from_checkpoint, encoder_from_checkpoint


@torch.no_grad()
def study(run: str, blank: float, seed: int, batch_size: int = 500) -> dict:
    encoder, cfg = encoder_from_checkpoint(run, student=True)
    head = detection_head_from_checkpoint(run)
    splits = load_splits(cfg)
    p, r = cfg.dilemma.misplace_prob, cfg.dilemma.drop_rate
    generator = torch.Generator().manual_seed(seed)
    scores, misplaced, own_blank, target_blank = [], [], [], []
    for pixels, _ in eval_batches(splits.val, batch_size):
        images = encoder.normalize(pixels)
        s = sample_tokens(images.shape[0], encoder.num_patches, r, p, generator=generator)
        _, patches = encoder(images, keep=s.keep, positions=s.positions)
        scores.append(head(patches).flatten())
        # a patch is blank when none of its pixels rises above `blank` of the [-1, 1] range
        is_blank = patchify(images, cfg.model.patch_size).amax(dim=-1) < -1 + 2 * blank  # (B, L)
        own_blank.append(is_blank.gather(1, s.keep).flatten())
        target_blank.append(is_blank.gather(1, s.positions).flatten())  # for placed tokens: their own patch
        misplaced.append(s.misplaced.flatten())
    scores, misplaced = torch.cat(scores), torch.cat(misplaced)
    own_blank, target_blank = torch.cat(own_blank), torch.cat(target_blank)

    def split_auroc(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, int]:
        keep = positives | negatives
        return auroc(scores[keep], positives[keep]), int(positives.sum())

    placed = ~misplaced
    rows = {
        "all tokens": split_auroc(misplaced, placed),
        "own patch blank": split_auroc(misplaced & own_blank, placed & own_blank),
        "own patch content": split_auroc(misplaced & ~own_blank, placed & ~own_blank),
        "blank sent to blank": split_auroc(misplaced & own_blank & target_blank, placed & own_blank),
        "blank sent to content": split_auroc(misplaced & own_blank & ~target_blank, placed & own_blank),
        "content sent to blank": split_auroc(misplaced & ~own_blank & target_blank, placed & ~own_blank),
        "content sent to content": split_auroc(misplaced & ~own_blank & ~target_blank, placed & ~own_blank),
    }
    return {
        "run": run,
        "pos_embed": cfg.model.pos_embed,
        "p": p,
        "r": r,
        "steps": load_checkpoint(run)["step"],
        "blank_share": float(own_blank.float().mean()),
        "rows": rows,
        "data": f"{splits.name} val ({len(splits.val)})",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--blank", type=float, default=0.1, help="a patch is blank below this fraction of the range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [study(run, args.blank, args.seed) for run in args.runs]
    names = list(results[0]["rows"])
    lines = [
        "# What limits misplaced-token detection",
        "",
        f"Val images: {results[0]['data']}; each run's own p and r, token draws seeded ({args.seed}); a patch is "
        f"blank when no pixel exceeds {args.blank:.0%} of the intensity range. Positives: misplaced tokens of the "
        "row's kind; negatives: correctly placed tokens whose own patch is of the same kind (blank / content). "
        "Cells: AUROC (number of positives).",
        "",
        "| row | "
        + " | ".join(f"{Path(r['run']).name} ({r['pos_embed']} PE, {r['steps']} steps)" for r in results)
        + " |",
        "|---|" + "---:|" * len(results),
    ]
    for name in names:
        cells = [f"{r['rows'][name][0]:.3f} ({r['rows'][name][1]})" for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shares = ", ".join(f"{Path(r['run']).name} {r['blank_share']:.0%}" for r in results)
    lines += ["", f"Share of kept tokens whose own patch is blank: {shares}.", ""]
    lines += ["Produced by: python benchmarks/detection_study.py " + " ".join(sys.argv[1:])]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
