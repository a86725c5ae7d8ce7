"""The ``dilemma`` command line: ``pretrain`` and ``eval knn``.

Every mistake a user can fix ends as one ``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dilemma.errors import DilemmaError


def _pretrain(args) -> None:
    from dilemma.config import load_config
    from dilemma.train.checkpoint import load_checkpoint
    from dilemma.train.loop import pretrain

    overrides = list(args.set)
    for flag, key in [("max_steps", "train.max_steps"), ("time_budget", "train.time_budget"), ("seed", "train.seed"),
                      ("method", "method.name"), ("data", "data.source"), ("device", "train.device")]:
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    base = None
    if args.resume:
        if not args.out:
            raise DilemmaError("--resume needs --out DIR: the run folder to continue")
        last = out / "checkpoints" / "last.pt"
        if not last.exists():
            raise DilemmaError(f"--resume: no checkpoint in {str(out)!r} (expected {last}); start without --resume")
        base = load_checkpoint(last)["config"]
    cfg = load_config(args.config, overrides, base=base)
    pretrain(cfg, out, resume=args.resume)


def _eval_knn(args) -> None:
    from dilemma.data import load_source
    from dilemma.eval.knn import knn_eval
    from dilemma.train.loop import resolve_device
    from dilemma.train.model_io import encoder_from_checkpoint

    device = resolve_device(args.device)
    results = []
    for path in args.checkpoint:
        encoder, cfg = encoder_from_checkpoint(path)
        splits = load_source(args.data or cfg.data.source, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                             val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
        result = knn_eval(encoder.to(device), splits, k=args.k, temperature=args.temperature,
                          batch_size=args.batch_size, device=device)
        print(f"{path}: {result.line()}")
        results.append({"checkpoint": str(path), "data": splits.name, "knn_top1": result.top1,
                        "knn_top5": result.top5, "protocol": result.protocol})
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        except OSError as err:
            raise DilemmaError(f"cannot write {args.json!r}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dilemma", description="Self-supervised ViT pretraining with DILEMMA.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pretrain", help="pretrain a ViT (defaults: MoCo v3 + DILEMMA on the embedded Animal-MNIST)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4")
    p.add_argument("--out", help="run folder (default: runs/<date-time>)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training wall-clock")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--method", help="method.name")
    p.add_argument("--data", help="data.source: embedded name, MNIST-IDX folder or image folder")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.set_defaults(run=_pretrain)

    ev = commands.add_parser("eval", help="evaluate frozen backbones").add_subparsers(dest="protocol", required=True)
    k = ev.add_parser("knn", help="weighted kNN on frozen class-token features (k=20, T=0.07)")
    k.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s) or run folder(s)")
    k.add_argument("--data", help="data source (default: the one the checkpoint was trained on)")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--device", default="auto")
    k.add_argument("--json", help="also write the results to this JSON file")
    k.set_defaults(run=_eval_knn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DilemmaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
