"""The ``dilemma`` command line: pretrain, eval (knn, linear, occlusion, finetune), export, plot, inspect.

Every mistake a user can fix ends as one ``error: ...`` line and exit status 2, never a traceback.
Every evaluation prints its protocol next to its numbers and can write both to JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from dilemma.allocator import keep_freed_memory
from dilemma.errors import DilemmaError
from dilemma.files import atomic_write_text
from dilemma.redact import redact


def _pretrain(args) -> None:
    from dilemma.config import load_config
    from dilemma.distributed import is_distributed
    from dilemma.rundir import RunDir
    from dilemma.train.loop import pretrain

    overrides = list(args.set)
    for flag, key in [
        ("max_steps", "train.max_steps"),
        ("time_budget", "train.time_budget"),
        ("seed", "train.seed"),
        ("method", "method.name"),
        ("data", "data.source"),
        ("device", "train.device"),
        ("precision", "train.precision"),
    ]:
        value = getattr(args, flag)
        if value is not None:  # strings as typed (quoted: YAML would read 010 as 8, "a #1" as "a")
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    # a default name no other start can take: the time, and the pid (torchrun's, shared by its ranks)
    launcher = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    out = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{launcher}"
    base, resume = None, bool(args.resume)
    if args.resume and not args.out:
        flag = "--resume auto" if args.resume == "auto" else "--resume"
        raise DilemmaError(f"{flag} needs --out DIR: the run folder to continue")
    if args.resume == "auto":  # a restart (torchrun --max-restarts) runs the same command: continue if there is a run
        resume = RunDir(out).holds_checkpoint()
    elif args.resume:  # the checkpoint's config, then what the command line changes
        base = RunDir(out).resume_checkpoint()[1]["config"]
    recipe = _recipe(args.method, args.config, overrides) if args.method and base is None else []
    inputs = _pretrained_inputs(args.config, overrides) if base is None else []
    cfg = load_config(args.config, [*recipe, *inputs, *overrides], base=base)  # a new run (or its restart)
    if recipe:
        print(f"note: --method {args.method} comes with its recipe: {', '.join(recipe)} (--set a key to change it)",
              file=sys.stderr)  # fmt: skip
    if inputs:
        print(f"note: model.pretrained {cfg.model.pretrained} brings the model and input its weights were trained "
              f"with: {', '.join(inputs)} (--set a key to change it)", file=sys.stderr)  # fmt: skip
    try:
        pretrain(cfg, out, resume=resume)
    finally:
        if is_distributed():  # launched by torchrun: leave the process group cleanly
            import torch.distributed

            torch.distributed.destroy_process_group()


def _not_given(settings: list[str], config: str | None, overrides: list[str]) -> list[str]:
    """``section.key=value`` settings less the keys the config file or ``overrides`` give."""
    from dilemma.config import keys_set_in

    given = {kv.partition("=")[0].strip() for kv in overrides} | keys_set_in(config)
    return [kv for kv in settings if kv.partition("=")[0] not in given]


def _recipe(method: str, config: str | None, overrides: list[str]) -> list[str]:
    """The built-in ``method``'s recipe (``Method.recipe``) where not given."""
    from dilemma.methods import METHODS

    return _not_given(list(METHODS[method].recipe), config, overrides) if method in METHODS else []


def _pretrained_inputs(config: str | None, overrides: list[str]) -> list[str]:
    """The model and input contract of the weights ``model.pretrained`` names
    (``weights.pretrained_inputs``) where not given, read before the config is checked: its image
    and patch size may be what make it valid."""
    from dilemma.config import given_value
    from dilemma.weights import pretrained_inputs

    spec = given_value("model.pretrained", config, overrides)
    spec = getattr(spec, "text", spec)  # a name YAML would read as a number
    if not isinstance(spec, str) or not spec:
        return []
    settings = [f"{key}={json.dumps(value)}" for key, value in pretrained_inputs(spec).items()]
    return _not_given(settings, config, overrides)


def _to_run(path, values: dict | None = None, pictures=()) -> None:
    """A read-out or picture made for a run goes to its tracker runs too (``train.loggers``)."""
    from dilemma.train.later_readouts import log_to_run

    log_to_run(path, values or {}, [Path(p) for p in pictures])


def _write_json(path: str | None, results: list[dict]) -> None:
    if path:
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def _checkpoints(args, drop_path_rate: float | None = None):
    """Yield ``(path, encoder on the device, config, splits, device)`` for each ``--checkpoint``."""
    from dilemma.build import load_splits
    from dilemma.distributed import resolve_device
    from dilemma.weights import encoder_from_checkpoint

    device = resolve_device(args.device)
    used = _eval_settings(args)
    for path in args.checkpoint:
        encoder, cfg = encoder_from_checkpoint(path, drop_path_rate=drop_path_rate, method=args.method)
        _say_other_settings(path, cfg.eval, used)
        splits = load_splits(cfg, source=args.data)
        yield str(path), encoder.to(device), cfg, splits, device


# The read-out settings that change a number (not its speed), as a run's config may hold them
RESULT_SETTINGS = ("knn_k", "knn_temperature", "linear_epochs", "linear_lr", "occlusion_fractions", "shuffle_grids",
                   "position_fractions", "detection_misplace_prob", "seed")  # fmt: skip


def _say_other_settings(path, saved, used) -> None:
    """A run configured with other read-out settings than the ones used (the command's, the same for
    every checkpoint it compares): say which, so a number is never read under the wrong ones."""
    differ = [(key, getattr(saved, key), getattr(used, key)) for key in RESULT_SETTINGS
              if getattr(saved, key) != getattr(used, key)]  # fmt: skip
    if differ:
        theirs = ", ".join(f"eval.{key}={a}" for key, a, _ in differ)
        ours = ", ".join(f"{b}" for *_, b in differ)
        print(
            f"note: {path} was configured with {theirs}; this read-out uses {ours} (the defaults and this "
            "command's flags, the same for every checkpoint: pass them as flags or --set eval.* to use the run's)",
            file=sys.stderr,
        )


# An eval flag and the eval setting it overrides (``eval.<key>``; fine-tuning: ``eval.finetune.<key>``).
EVAL_FLAGS = {
    "k": "knn_k",
    "temperature": "knn_temperature",
    "batch_size": "batch_size",
    "epochs": "linear_epochs",
    "lr": "linear_lr",
    "fractions": "occlusion_fractions",
    "grids": "shuffle_grids",
    "position_fractions": "position_fractions",
    "seed": "seed",
}
FINETUNE_FLAGS = (
    "epochs", "batch_size", "lr", "layer_decay", "weight_decay", "drop_path", "label_smoothing",
    "warmup_epochs", "auto_augment", "mixup", "cutmix", "reprob",
)  # fmt: skip


def _eval_settings(args):
    """The read-out settings: the ``eval`` section's defaults, this command's ``--set eval.x=...``,
    then its flags (``--protocol`` first for fine-tuning: the flags and --set still win)."""
    import dataclasses

    from dilemma.config import load_config, validate_eval
    from dilemma.eval.finetune import preset

    if bad := [text for text in args.set if not text.strip().startswith("eval.")]:
        raise DilemmaError(f"eval commands take --set eval.<key>=<value> only, got {bad[0]!r}")
    settings = load_config(None, args.set).eval
    flags = {"finetune": {f: getattr(args, f) for f in FINETUNE_FLAGS}} if args.run is _eval_finetune else {}
    if args.run is _eval_finetune:
        named = {text.split("=", 1)[0].strip().removeprefix("eval.finetune.") for text in args.set}
        base = preset(type(settings.finetune)(), args.protocol)
        chosen = {key: getattr(settings.finetune, key) for key in named if hasattr(base, key)}
        finetune = dataclasses.replace(base, **chosen, **{k: v for k, v in flags["finetune"].items() if v is not None})
        settings = dataclasses.replace(
            settings, finetune=finetune, seed=args.seed if args.seed is not None else settings.seed
        )
    else:
        given = {EVAL_FLAGS[f]: getattr(args, f) for f in EVAL_FLAGS if getattr(args, f, None) is not None}
        settings = dataclasses.replace(settings, **given)
    validate_eval(settings)
    return settings


def _loading(args, device, splits) -> dict:
    """Batch size, device and decoding processes (default: up to 8 for image files, none for data in memory)."""
    from dilemma.data import FileImageSet

    workers = args.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if isinstance(splits.train, FileImageSet) else 0
    return {"device": device, "num_workers": workers}


def _show_progress(args) -> bool:
    return not args.no_progress


def _labelled(results: list[dict], configs: list[dict]) -> list[dict]:
    """Each result with its run's label (method and arm; ``report.labels``) before its other keys."""
    from dilemma.report import labels

    names = labels(configs, [r["checkpoint"] for r in results])
    return [{"checkpoint": r["checkpoint"], "label": name, **r} for r, name in zip(results, names, strict=True)]


def _print_side_by_side(results: list[dict], lines) -> None:
    """Several runs' read-outs as one table (``report``); one run's were printed as it finished."""
    if len(results) > 1:
        print("\n".join(lines(results)))


def _eval_knn(args) -> None:
    from dilemma.eval.knn import knn_eval
    from dilemma.report import knn_lines

    settings, results, configs = _eval_settings(args), [], []
    for path, encoder, cfg, splits, device in _checkpoints(args):
        result = knn_eval(
            encoder, splits, settings, **_loading(args, device, splits), show_progress=_show_progress(args)
        )
        if len(args.checkpoint) == 1:
            print(f"{path}: {result.line()}")
        _to_run(path, {"knn_top1": result.top1, "knn_top5": result.top5})
        configs.append(cfg.to_dict())
        results.append(
            {"checkpoint": path, "data": splits.name, "knn_top1": result.top1, "knn_top5": result.top5,
             "protocol": result.protocol}
        )  # fmt: skip
    results = _labelled(results, configs)
    _print_side_by_side(results, knn_lines)
    _write_json(args.json, results)


def _eval_linear(args) -> None:
    from dilemma.eval.features import extract_features
    from dilemma.eval.knn import require_labels
    from dilemma.eval.linear import linear_protocol, train_linear_probe
    from dilemma.report import linear_lines

    s, results, configs = _eval_settings(args), [], []
    for path, encoder, cfg, splits, device in _checkpoints(args):
        require_labels(splits, "the linear probe")
        bars = ("train features", "val features") if _show_progress(args) else (None, None)
        loading = {**_loading(args, device, splits), "batch_size": s.batch_size, "l2_normalize": False}
        train_f, train_y = extract_features(encoder, splits.train, **loading, desc=bars[0])
        val_f, val_y = extract_features(encoder, splits.val, **loading, desc=bars[1])
        probe = train_linear_probe(
            train_f, train_y, len(splits.classes), epochs=s.linear_epochs, lr=s.linear_lr, seed=s.seed
        )
        top1 = probe.top1(val_f, val_y)
        protocol = (
            linear_protocol(s.linear_epochs, s.linear_lr, encoder.embedding_kind())
            + f"; {splits.name} train {len(splits.train)} / val {len(splits.val)}"
        )
        if len(args.checkpoint) == 1:
            print(f"{path}: linear top-1 {top1:.2f}%  [{protocol}]")
        _to_run(path, {"linear_top1": top1})
        configs.append(cfg.to_dict())
        results.append({"checkpoint": path, "data": splits.name, "linear_top1": top1, "protocol": protocol})
    results = _labelled(results, configs)
    _print_side_by_side(results, linear_lines)
    _write_json(args.json, results)


def _eval_occlusion(args) -> None:
    from dilemma.eval.occlusion import occlusion_curve, tracker_numbers
    from dilemma.report import occlusion_lines

    settings, results, configs = _eval_settings(args), [], []
    for path, encoder, cfg, splits, device in _checkpoints(args):
        loading = _loading(args, device, splits)
        curve = occlusion_curve(encoder, splits, settings, **loading, show_progress=_show_progress(args))
        if len(args.checkpoint) == 1:
            print(f"{path}: occlusion  [{curve.protocol}]")
            print("  kept  tokens   kNN top-1   linear top-1")
            for p in curve.points:
                print(
                    f"  {p['keep_fraction'] * 100:4.0f}%  {p['tokens']:6d}   "
                    f"{p['knn_top1']:8.2f}%   {p['linear_top1']:8.2f}%"
                )
        configs.append(cfg.to_dict())
        results.append({"checkpoint": path, "data": splits.name, "points": curve.points, "protocol": curve.protocol})
        _to_run(path, tracker_numbers(curve.points))
    results = _labelled(results, configs)
    _print_side_by_side(results, occlusion_lines)
    _write_json(args.json, results)
    if args.plot:
        from dilemma.viz import plot_occlusion

        print(f"wrote {plot_occlusion(results, args.plot)}")
        for result in results:
            _to_run(result["checkpoint"], pictures=[args.plot])


def _eval_finetune(args) -> None:
    from dilemma.eval.finetune import finetune
    from dilemma.eval.knn import require_labels
    from dilemma.export import model_card, save_timm_folder

    if args.save and len(args.checkpoint) > 1:
        raise DilemmaError("--save takes one --checkpoint")
    settings = _eval_settings(args)
    results = []
    for path, encoder, cfg, splits, device in _checkpoints(args, drop_path_rate=settings.finetune.drop_path):
        require_labels(splits, "fine-tuning")
        result = finetune(
            encoder,
            splits,
            settings.finetune,
            seed=settings.seed,
            device=device,
            num_workers=_loading(args, device, splits)["num_workers"],
            show_progress=_show_progress(args),
        )
        print(f"{path}: fine-tune top-1 {result.top1:.2f}%  [{result.protocol}]")
        _to_run(path, {"finetune_top1": result.top1})
        results.append(
            {
                "checkpoint": path,
                "data": splits.name,
                "finetune_top1": result.top1,
                "history": result.history,
                "protocol": result.protocol,
            }
        )
        if args.save:
            card = model_card(
                cfg, path, f"Fine-tuned on {splits.name} ({len(splits.classes)} classes): {result.protocol}."
            )
            print(save_timm_folder(encoder.vit, cfg.model, args.save, card, label_names=splits.classes))
    _write_json(args.json, results)


def _print_robustness(path: str, report) -> None:
    """One run's panels as rows: what was done to the val images, kNN and linear top-1."""
    print(f"{path}: robustness (chance {report.chance:.1f}%)")
    for protocol in report.protocols.values():
        print(f"  [{protocol}]")
    print("  corruption                 kNN top-1   linear top-1")
    rows = [(f"patch shuffle {p['grid']} x {p['grid']}", p) for p in report.patch_shuffle]
    rows += [(f"position shuffle q = {p['fraction']:g}", p) for p in report.position_shuffle]
    rows += [(f"tokens kept {p['keep_fraction']:.0%}", p) for p in report.token_drop]
    for name, p in rows:
        print(f"  {name:<26} {p['knn_top1']:8.2f}%   {p['linear_top1']:8.2f}%")
    if report.detection_auroc is not None:
        print(f"  detection AUROC            {report.detection_auroc:.4f} (chance 0.5)")


def _eval_robustness(args) -> None:
    from dilemma.build import load_splits
    from dilemma.distributed import resolve_device
    from dilemma.eval.robustness import robustness
    from dilemma.report import robustness_lines
    from dilemma.weights import method_from_checkpoint

    settings, results, configs, device = _eval_settings(args), [], [], resolve_device(args.device)
    for path in args.checkpoint:
        method, cfg = method_from_checkpoint(path, method=args.method)
        splits = load_splits(cfg, source=args.data)
        head = method.dilemma.head
        detector = None if head is None else (method.encoder, head, cfg.dilemma.drop_rate)
        report = robustness(
            method.evaluated_encoder().to(device), splits, settings, detector=detector,
            **_loading(args, device, splits), show_progress=_show_progress(args),
        )  # fmt: skip
        if len(args.checkpoint) == 1:
            _print_robustness(str(path), report)
        configs.append(cfg.to_dict())
        results.append({"checkpoint": str(path), "data": splits.name, **report.to_dict()})
        _to_run(path, report.numbers())
    results = _labelled(results, configs)
    _print_side_by_side(results, robustness_lines)
    _write_json(args.json, results)
    if args.plot:
        from dilemma.viz import plot_robustness

        print(f"wrote {plot_robustness(results, args.plot)}")
        for result in results:
            _to_run(result["checkpoint"], pictures=[args.plot])


def _eval_shape_bias(args) -> None:
    from dilemma.distributed import resolve_device
    from dilemma.eval.shape_bias import shape_bias_eval
    from dilemma.weights import encoder_from_checkpoint

    if args.data:
        raise DilemmaError("eval shape-bias reads its own cue-conflict set (Animal-Texture); drop --data")
    settings, results, configs, device = _eval_settings(args), [], [], resolve_device(args.device)
    for path in args.checkpoint:
        encoder, cfg = encoder_from_checkpoint(path, method=args.method)
        found = shape_bias_eval(
            encoder.to(device), cfg.data, settings, device=device, num_workers=args.workers or 0,
            show_progress=_show_progress(args),
        )  # fmt: skip
        print(f"{path}: shape bias  [{found['protocol']}]")
        for name in ("knn", "linear"):
            f = found[name]
            print(
                f"  {name:<6} shape bias {f['shape_bias']:.3f}  ({f['shape_decisions']} shape, "
                f"{f['texture_decisions']} texture decisions, {f['neither_share']:.1%} neither); agreeing val top-1 "
                f"{found['agreeing_val'][f'{name}_top1']:.2f}%"
            )
        configs.append(cfg.to_dict())
        results.append({"checkpoint": str(path), **found})
        _to_run(path, {f"shape_bias_{name}": found[name]["shape_bias"] for name in ("knn", "linear")})
    results = _labelled(results, configs)
    _write_json(args.json, results)
    if args.plot:
        from dilemma.viz import plot_shape_bias

        print(f"wrote {plot_shape_bias(results, args.plot)}")
        for result in results:
            _to_run(result["checkpoint"], pictures=[args.plot])


def _check_data(args) -> None:
    import collections
    import statistics

    from dilemma.data import list_image_source, load_source
    from dilemma.data.folders import scan_files
    from dilemma.data.shards import is_shard_folder
    from dilemma.data.sources import _find_idx

    source = Path(args.source).expanduser()
    if not source.exists():
        raise DilemmaError(f"{args.source!r} does not exist")
    if is_shard_folder(source):
        return _check_shards(source if source.is_dir() else source.parent, args)
    if args.verify:
        raise DilemmaError(
            f"--verify checks the checksums of a shard folder (dilemma shard); {args.source!r} is not one"
        )
    if source.is_dir() and _find_idx(source):  # decoded into memory when it is loaded: nothing to scan
        splits = load_source(str(source), img_size=28, in_chans=1, val_fraction=args.val_fraction)
        print(
            f"{source}: {'; '.join(splits.notes)}; {len(splits.classes)} classes; {len(splits.train)} train / "
            f"{len(splits.val)} val images, read whole into memory: nothing to decode file by file"
        )
        return
    train, val, notes = list_image_source(source, args.val_fraction, 0, skip_bad=True)
    classes = f"{len(train.classes)} classes" if train.classes else "unlabelled"
    print(f"{source}: {'; '.join(notes)}; {classes}; {len(train.paths)} train / {len(val.paths)} val images")
    bad, sides, modes = [], [], collections.Counter()
    bad += [tuple(entry.rsplit(": ", 1)) for entry in train.unreadable]  # "path: reason"
    for path, problem, size, mode in scan_files(train.paths + val.paths, args.workers, not args.no_progress):
        if problem:
            bad.append((path, problem))
        else:
            sides.append(min(size))
            modes[mode] += 1
    if sides:
        print(
            f"short side: min {min(sides)} / median {statistics.median(sides):g} / max {max(sides)} px; "
            f"modes: {', '.join(f'{m} {n}' for m, n in modes.most_common())}"
        )
    for path, problem in bad:
        print(f"bad: {path}: {problem}")
    print(f"{len(bad)} of {len(train.paths) + len(val.paths) + len(train.unreadable)} images cannot be used")
    if bad:
        raise SystemExit(1)


def _check_shards(folder: Path, args) -> None:
    """Each shard present, whole and matching its index (``--verify``: and its sha256); then every
    sample decoded. Every problem listed; exit status 1 when there is one."""
    from dilemma.data.shards import SPLITS, ShardImageSet, check_shard, read_manifest, scan_samples

    manifest = read_manifest(folder)
    entries = [entry for split in SPLITS for entry in manifest["splits"][split]["shards"]]
    counts = {split: manifest["splits"][split]["samples"] for split in SPLITS}
    print(
        f"{folder}: {len(entries)} shards of {manifest.get('made_from', {}).get('layout', '?')}; "
        f"{len(manifest['classes'])} classes; {counts['train']} train / {counts['val']} val samples"
    )
    bad = [problem for entry in entries if (problem := check_shard(folder, entry, args.verify))]
    total = sum(counts.values())
    if not bad:  # the samples of whole shards, decoded
        for split in SPLITS:
            images = ShardImageSet(folder, manifest, split, 224, 3, 1.0, skip_bad=True)
            bad += scan_samples(images, args.workers, not args.no_progress)
    for problem in bad:
        print(f"bad: {problem}")
    unchecked = "" if args.verify else " (checksums not checked: add --verify)"
    print(f"{len(bad)} problems in {len(entries)} shards of {total} samples{unchecked}")
    if bad:
        raise SystemExit(1)


def _shard(args) -> None:
    from dilemma.data.sharding import make_indexes, make_shards

    if args.index:
        manifest = make_indexes(Path(args.source))
        shards = sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))
        print(f"indexed {shards} shards in {args.source}")
        return
    if not args.out:
        raise DilemmaError("dilemma shard SRC needs --out DIR: a new or empty folder for the shards")
    manifest = make_shards(
        args.source, Path(args.out), samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
        seed=args.seed, skip_bad=args.skip_bad, workers=args.workers, show_progress=not args.no_progress,
    )  # fmt: skip
    parts = manifest["splits"]
    skipped = f"; {len(manifest['skipped'])} unreadable files skipped" if manifest["skipped"] else ""
    print(
        f"wrote {len(parts['train']['shards']) + len(parts['val']['shards'])} shards to {args.out}: "
        f"{parts['train']['samples']} train / {parts['val']['samples']} val samples, "
        f"{len(manifest['classes'])} classes{skipped}; train on them with --data {args.out}"
    )


def _export(args) -> None:
    from dilemma.export import export_backbone

    snippet = export_backbone(args.checkpoint, args.out, method=args.method)
    print(f"wrote {args.out}; load it with:\n{snippet}")


def _plot(args) -> None:
    from dilemma.viz import plot_runs

    out = args.out or str(Path(args.run_dir[0]) / "curves.png")
    print(f"wrote {plot_runs(args.run_dir, out)}")
    for run in args.run_dir:
        _to_run(run, pictures=[out])


def _inspect(args) -> None:
    import torch

    from dilemma.build import load_splits
    from dilemma.data import spread_over_classes
    from dilemma.pretext import active_task, sample_tokens
    from dilemma.viz import inspect_detection
    from dilemma.weights import detection_head_from_checkpoint, encoder_from_checkpoint

    # the encoder the head was trained on
    encoder, cfg = encoder_from_checkpoint(args.checkpoint, student=True, method=args.method)
    splits = load_splits(cfg, source=args.data)
    images = encoder.normalize(splits.val.load(spread_over_classes(splits.val.labels, args.num_images)))
    d = cfg.dilemma
    if active_task(d.task, d.weight, d.misplace_prob, d.position_drop_prob) == "predict":
        return _inspect_positions(args, cfg, splits.name, images)
    head = detection_head_from_checkpoint(args.checkpoint, method=args.method)
    p = cfg.dilemma.misplace_prob if args.misplace_prob is None else args.misplace_prob
    r = cfg.dilemma.drop_rate if args.drop_rate is None else args.drop_rate
    sample = sample_tokens(
        images.shape[0], encoder.num_patches, r, p, generator=torch.Generator().manual_seed(args.seed)
    )
    ckpt = Path(args.checkpoint)
    out = args.out or str((ckpt if ckpt.is_dir() else ckpt.parent) / "detection.png")
    title = f"{cfg.method.name} + DILEMMA: detection on {splits.name} val, p={p}, r={r}"
    print(f"wrote {inspect_detection(encoder, head, images, sample, out, cfg.model.patch_size, title)}  (p={p}, r={r})")
    _to_run(ckpt, pictures=[out])


def _inspect_positions(args, cfg, data_name: str, images) -> None:
    """``dilemma inspect`` of a run that predicts positions: predicted against true positions."""
    import torch

    from dilemma.pretext import sample_tokens
    from dilemma.viz import inspect_positions
    from dilemma.weights import method_from_checkpoint

    method, _ = method_from_checkpoint(args.checkpoint, method=args.method)
    q = cfg.dilemma.position_drop_prob if args.misplace_prob is None else args.misplace_prob
    r = cfg.dilemma.drop_rate if args.drop_rate is None else args.drop_rate
    generator = torch.Generator().manual_seed(args.seed)
    sample = sample_tokens(images.shape[0], method.encoder.num_patches, r, 0.0, unplace_prob=q, generator=generator)
    ckpt = Path(args.checkpoint)
    out = args.out or str((ckpt if ckpt.is_dir() else ckpt.parent) / "positions.png")
    title = f"{cfg.method.name}: position prediction on {data_name} val, q={q}, r={r}"
    print(f"wrote {inspect_positions(method, images, sample, out, cfg.model.patch_size, title)}  (q={q}, r={r})")
    _to_run(ckpt, pictures=[out])


def _compare(args) -> None:
    from dilemma.compare import compare, parse_readouts

    compare(
        args.variant,
        seeds=args.seeds,
        out=Path(args.out),
        time_budget=args.time_budget,
        max_steps=args.max_steps,
        probe_epochs=args.probe_epochs,
        curve_points=args.curve_points,
        readouts=parse_readouts(args.readouts),
        config=args.config,
        overrides=args.set,
    )


TRUST_METHOD = (
    "the method the checkpoint was trained with, when it is kept in a file or module of your own "
    "(path/to/file.py:Class): reading a checkpoint never imports code unless you name it here"
)


def _eval_parser(ev, name: str, help: str, run) -> argparse.ArgumentParser:
    """An eval sub-command; its numbers default to the config's ``eval`` section (flags override it)."""
    p = ev.add_parser(name, help=help)
    p.add_argument(
        "--checkpoint", nargs="+", required=True, help="checkpoint file(s) or run folder(s); several are compared"
    )
    p.add_argument("--method", help=TRUST_METHOD)
    p.add_argument("--data", help="data source (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--set", action="append", default=[], metavar="eval.KEY=VALUE", help="override a read-out setting (eval.*)"
    )
    p.add_argument("--batch-size", type=int, help="images per forward (eval.batch_size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, help="eval.seed")
    p.add_argument("--workers", type=int, help="processes decoding images (default: up to 8 for image files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the results and protocol to this JSON file")
    p.set_defaults(run=run)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one ``error:`` line like every other."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")
    return text


# The built-in methods' names, for --help without importing torch (a test holds them equal to
# dilemma.methods.METHODS).
METHOD_NAMES = ("mocov3", "dino", "simclr", "mae", "byol", "vicreg", "ibot", "ijepa", "droppos")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dilemma", description="Self-supervised ViT pretraining with DILEMMA.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "pretrain", help="pretrain a ViT (defaults: MoCo v3 + DILEMMA on the embedded Animal-MNIST)"
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4"
    )
    p.add_argument("--out", help="run folder (default: runs/<date-time>)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop after this much training wall-clock")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        type=_resume_mode,
        help="continue the run in --out from its last checkpoint; '--resume auto': continue it if --out holds one "
        "(of this config; another run's is refused), else start it (for restarts: torchrun --max-restarts)",
    )
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--method", help=f"method.name: {', '.join(METHOD_NAMES)}, or your own as path/to/file.py:ClassName")
    p.add_argument("--data", help="data.source: embedded name, MNIST-IDX folder, image folder or file list")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="train.precision (autocast; fp16 with a gradient scaler)"
    )
    p.set_defaults(run=_pretrain)

    ev = commands.add_parser("eval", help="evaluate backbones").add_subparsers(dest="protocol", required=True)
    k = _eval_parser(ev, "knn", "weighted kNN on frozen class-token features", _eval_knn)
    k.add_argument("--k", type=int, help="eval.knn_k")
    k.add_argument("--temperature", type=float, help="eval.knn_temperature")
    lin = _eval_parser(ev, "linear", "linear probe on frozen, cached class-token features", _eval_linear)
    lin.add_argument("--epochs", type=int, help="eval.linear_epochs")
    lin.add_argument("--lr", type=float, help="eval.linear_lr: base lr for batch 256")
    occ = _eval_parser(
        ev, "occlusion", "kNN and linear accuracy with only a fraction of each test image's tokens", _eval_occlusion
    )
    occ.add_argument("--fractions", type=float, nargs="+", help="eval.occlusion_fractions")
    occ.add_argument("--k", type=int, help="eval.knn_k")
    occ.add_argument("--temperature", type=float, help="eval.knn_temperature")
    occ.add_argument("--epochs", type=int, help="eval.linear_epochs: linear probe epochs")
    occ.add_argument("--plot", help="also draw the curves to this PNG (needs matplotlib)")
    ft = _eval_parser(ev, "finetune", "fine-tune all weights (layer decay, drop-path, label smoothing)", _eval_finetune)
    ft.add_argument(
        "--protocol",
        choices=["short", "mae"],
        default="short",
        help="starting values: short (eval.finetune: 5 epochs, small data) or mae (MAE's ImageNet recipe); "
        "--set eval.finetune.* and the flags below override them",
    )
    for flag, kind, text in [
        ("epochs", int, ""), ("lr", float, "peak lr for the whole batch"), ("layer-decay", float, ""),
        ("weight-decay", float, ""), ("drop-path", float, ""), ("label-smoothing", float, ""),
        ("warmup-epochs", float, ""), ("auto-augment", str, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1"),
        ("mixup", float, "mixup alpha (0: off)"), ("cutmix", float, "cutmix alpha (0: off)"),
        ("reprob", float, "random erasing probability"),
    ]:  # fmt: skip
        ft.add_argument(
            f"--{flag}", type=kind, help=f"eval.finetune.{flag.replace('-', '_')}" + (f": {text}" if text else "")
        )
    ft.add_argument("--save", help="write the fine-tuned model (with its classifier) to this new timm folder")
    rob = _eval_parser(
        ev, "robustness", "accuracy under patch shuffle, position shuffle and token drop; detection AUROC",
        _eval_robustness,
    )  # fmt: skip
    rob.add_argument("--grids", type=int, nargs="+", help="eval.shuffle_grids: g x g cells (default 1, 2, 4, ..)")
    rob.add_argument("--position-fractions", type=float, nargs="+", help="eval.position_fractions: q in [0, 1]")
    rob.add_argument("--fractions", type=float, nargs="+", help="eval.occlusion_fractions: tokens kept")
    rob.add_argument("--k", type=int, help="eval.knn_k")
    rob.add_argument("--temperature", type=float, help="eval.knn_temperature")
    rob.add_argument("--epochs", type=int, help="eval.linear_epochs: linear probe epochs")
    rob.add_argument("--plot", help="also draw the panels to this PNG (needs matplotlib)")
    sb = _eval_parser(
        ev, "shape-bias", "shape vs texture decisions on the Animal-Texture cue-conflict set", _eval_shape_bias
    )
    sb.add_argument("--k", type=int, help="eval.knn_k")
    sb.add_argument("--temperature", type=float, help="eval.knn_temperature")
    sb.add_argument("--epochs", type=int, help="eval.linear_epochs: linear probe epochs")
    sb.add_argument("--plot", help="also draw the shape bias of each checkpoint to this PNG (needs matplotlib)")

    cmp = commands.add_parser(
        "compare",
        help="train several variants at the same wall-clock budget over seeds, "
        "evaluate each (kNN, linear, occlusion), write a mean +- std table",
    )
    cmp.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=KEY=VALUE,...",
        help="a configuration: a name and its overrides, e.g. 'plain=dilemma.misplace_prob=0,dilemma.drop_rate=0'",
    )
    cmp.add_argument("--config", help="base YAML config for every variant")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    cmp.add_argument(
        "--time-budget", type=float, default=10.0, metavar="MINUTES", help="training wall-clock per run (default 10)"
    )
    cmp.add_argument(
        "--max-steps",
        type=int,
        help="also stop every run here (default: a train.max_steps given with --set or --config, else only the budget)",
    )
    cmp.add_argument("--probe-epochs", type=int, help="eval.linear_epochs for every read-out")
    cmp.add_argument(
        "--curve-points",
        type=int,
        default=4,
        help="kNN and linear at this many points over training, the last at the end (default 4)",
    )
    cmp.add_argument(
        "--readouts",
        default="knn,linear,occlusion",
        metavar="LIST",
        help="what to read out of each final backbone, comma-separated, or all: knn, linear, occlusion, "
        "patch-shuffle, position-shuffle, detection, shape-bias (Animal-Texture runs); kNN and linear always "
        "(default knn,linear,occlusion)",
    )
    cmp.add_argument("--out", required=True, help="folder for the runs, results.json, summary.md, occlusion.png")
    cmp.set_defaults(run=_compare)

    chk = commands.add_parser("check-data", help="decode every image of a folder or file list once; list the bad ones")
    chk.add_argument("source", help="image folder or file list")
    chk.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    chk.add_argument("--val-fraction", type=float, default=0.2, help="as data.val_fraction (for the counts)")
    chk.add_argument("--no-progress", action="store_true")
    chk.add_argument("--verify", action="store_true", help="a shard folder: also check every shard's sha256")
    chk.set_defaults(run=_check_data)

    sh = commands.add_parser(
        "shard", help="an image folder, file list or IDX set -> WebDataset tar shards with offset indexes"
    )
    sh.add_argument("source", help="what to convert (as data.source); with --index: a folder of tar shards")
    sh.add_argument("--out", help="a new or empty folder for the shards and manifest.json")
    sh.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000 (~110 MB of ImageNet JPEGs)")
    sh.add_argument(
        "--val-fraction", type=float, default=0.2, help="as data.val_fraction (sources without a val split)"
    )
    sh.add_argument("--seed", type=int, default=0, help="as data.split_seed; also orders the samples over the shards")
    sh.add_argument("--skip-bad", action="store_true", help="leave unreadable files out (counted) instead of stopping")
    sh.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes writing shards")
    sh.add_argument("--index", action="store_true", help="(re)make the offset indexes of the tars in SOURCE")
    sh.add_argument("--no-progress", action="store_true")
    sh.set_defaults(run=_shard)

    ex = commands.add_parser("export", help="write the backbone alone for timm (a local-dir / Hub folder, or a file)")
    ex.add_argument("checkpoint", help="checkpoint file or run folder")
    ex.add_argument(
        "--out", required=True, help="a new folder (timm.create_model('local-dir:FOLDER')) or a .safetensors file"
    )
    ex.add_argument("--method", help=TRUST_METHOD)
    ex.set_defaults(run=_export)

    pl = commands.add_parser("plot", help="training curves of one or more runs (PNG; needs matplotlib)")
    pl.add_argument("run_dir", nargs="+")
    pl.add_argument("--out", help="PNG file (default: RUN_DIR/curves.png)")
    pl.set_defaults(run=_plot)

    ins = commands.add_parser("inspect", help="which tokens the model flags as misplaced (PNG; needs matplotlib)")
    ins.add_argument("checkpoint", help="checkpoint file or run folder")
    ins.add_argument("--out", help="PNG file (default: beside the checkpoint, detection.png)")
    ins.add_argument("--data")
    ins.add_argument("--num-images", type=int, default=8)
    ins.add_argument("--misplace-prob", type=float, help="default: the checkpoint's p")
    ins.add_argument("--drop-rate", type=float, help="default: the checkpoint's r")
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument("--method", help=TRUST_METHOD)
    ins.set_defaults(run=_inspect)
    return parser


# Command-line numbers: (low, high, how the ends count). Checked for every sub-command that has the
# argument; None: no bound on that side. "[]": both ends allowed, "(]" low excluded, and so on.
SEED_BOUND = 2**31
ARG_BOUNDS = {
    "k": (1, None, "[]"),
    "epochs": (1, 100_000, "[]"),
    "batch_size": (1, None, "[]"),
    "workers": (0, None, "[]"),  # and at most config.max_workers()
    "probe_epochs": (1, None, "[]"),
    "curve_points": (1, 99, "[]"),
    "max_steps": (1, None, "[]"),
    "num_images": (1, 256, "[]"),
    "time_budget": (0, 10_000_000, "(]"),
    "lr": (0, 100, "(]"),
    "temperature": (0, None, "(]"),
    "seed": (0, SEED_BOUND, "[)"),
    "val_fraction": (0, 1, "()"),
    "samples_per_shard": (1, 10_000_000, "[]"),
    "misplace_prob": (0, 1, "[]"),
    "drop_rate": (0, 1, "[)"),
    "layer_decay": (0, 1, "(]"),
    "weight_decay": (0, None, "[]"),
    "drop_path": (0, 1, "[)"),
    "label_smoothing": (0, 1, "[)"),
    "warmup_epochs": (0, 100_000, "[]"),
    "mixup": (0, 100, "[]"),  # Beta(alpha, alpha); 0: off, and no alpha below 1e-3 (checked below)
    "cutmix": (0, 100, "[]"),
    "reprob": (0, 1, "[]"),
}


def _in_range(value, low, high, ends: str) -> bool:
    above = low is None or (value > low if ends[0] == "(" else value >= low)
    below = high is None or (value < high if ends[1] == ")" else value <= high)
    return above and below


def _check_number(flag: str, value, low, high, ends: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DilemmaError(f"{flag} must be a finite number, got {value}")
    if not _in_range(value, low, high, ends):
        if high is None:
            bound = f"{'>' if ends[0] == '(' else '>='} {low}"
        else:
            bound = f"in {ends[0]}{low}, {high}{ends[1]}"
        raise DilemmaError(f"{flag} must be {bound}, got {value}")


def _check_output(flag: str, value: str, new_folder: bool = False) -> None:
    """An output path, checked before the work whose result it receives."""
    path = Path(value)
    parent = path.parent
    if new_folder and path.exists():
        raise DilemmaError(f"{flag} {value!r} already exists; give a new folder (nothing is overwritten)")
    if not new_folder and path.is_dir():
        raise DilemmaError(f"{flag} {value!r} is a folder; give a file name")
    if not parent.is_dir():
        raise DilemmaError(f"cannot write {value!r}: {str(parent)!r} is not an existing folder")
    try:  # what the file system itself says (a read-only mount, permissions, a full quota)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise DilemmaError(f"cannot write {value!r}: {err.strerror or err}") from None


def _check_auto_augment(spec: str) -> None:
    """timm's RandAugment spec, parsed by timm itself, with at most 20 ops per image."""
    import re

    from timm.data.auto_augment import rand_augment_transform

    ops = re.search(r"-n(\d+)", spec)
    if not spec.startswith("rand") or (ops and int(ops.group(1)) > 20):
        raise DilemmaError(
            f"--auto-augment {spec!r}: give a timm RandAugment spec such as rand-m9-mstd0.5-inc1 (n <= 20)"
        )
    try:
        rand_augment_transform(spec, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception as err:  # noqa: BLE001 - timm's parser asserts
        raise DilemmaError(
            f"--auto-augment {spec!r} is not a RandAugment spec timm reads ({err or 'bad field'})"
        ) from None


def check_args(args) -> None:
    """Ranges and finiteness of numeric arguments, so no value reaches torch as a traceback or a
    meaningless result; output paths (pictures, JSON, saved models) before any work is done.
    (compare checks its own variant names.)"""
    from dilemma.config import max_workers

    for name, (low, high, ends) in ARG_BOUNDS.items():
        value = getattr(args, name, None)
        if value is not None:
            _check_number("--" + name.replace("_", "-"), value, low, high, ends)
    if getattr(args, "workers", None) is not None and args.workers > max_workers():
        raise DilemmaError(
            f"--workers {args.workers} is more than {max_workers()} (4 per usable CPU core, at least 16): each "
            "worker is a process with its own memory"
        )
    for name in ("mixup", "cutmix"):
        alpha = getattr(args, name, None)
        if alpha is not None and 0 < alpha < 1e-3:
            raise DilemmaError(f"--{name} must be 0 (off) or at least 0.001, got {alpha}")
    if getattr(args, "auto_augment", None):
        _check_auto_augment(args.auto_augment)
    for fraction in getattr(args, "fractions", None) or []:
        _check_number("--fractions", fraction, 0, 1, "(]")
    for seed in getattr(args, "seeds", None) or []:
        _check_number("--seeds", seed, 0, SEED_BOUND, "[)")
    picture = {_plot: "out", _inspect: "out", _eval_occlusion: "plot", _eval_robustness: "plot"}.get(
        getattr(args, "run", None)
    )
    value = getattr(args, picture, None) if picture else None
    if value:
        if Path(value).suffix.lower() != ".png":
            raise DilemmaError(f"--{picture} {value!r}: pictures are PNG files; give a name ending in .png")
        _check_output(f"--{picture}", value)
    if getattr(args, "json", None):
        if Path(args.json).suffix.lower() != ".json":
            raise DilemmaError(f"--json {args.json!r}: the results are JSON; give a name ending in .json")
        _check_output("--json", args.json)
    if getattr(args, "run", None) is _export:  # a folder, or one .safetensors file: the name says which
        suffix = Path(args.out).suffix.lower()
        if suffix in (".pt", ".pth", ".bin", ".ckpt", ".json", ".png", ".npz"):
            raise DilemmaError(
                f"--out {args.out!r}: an export is a folder (timm local-dir) or a .safetensors file, "
                f"not a {suffix} file"
            )
        _check_output("--out", args.out, new_folder=suffix != ".safetensors")
    if getattr(args, "save", None):
        _check_output("--save", args.save, new_folder=True)


def _report_internal_error(err: BaseException) -> None:
    """One line for a bug of ours, the traceback kept in a file; never fails itself."""
    import tempfile
    import traceback

    where = "not saved"
    try:
        fd, path = tempfile.mkstemp(prefix="dilemma-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(redact(" ".join(map(str, sys.argv)) + "\n\n" + traceback.format_exc()))
        where = f"saved to {path}"
    except Exception:  # noqa: BLE001 - no temp folder, full disk: the one line still goes out
        pass
    try:
        first = str(err).splitlines()[0][:300] if str(err) else ""
    except Exception:  # noqa: BLE001 - an exception whose str() fails
        first = ""
    print(f"error: internal error ({type(err).__name__}: {redact(first)}); traceback {where}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names in any encoding print, escaped, instead of raising
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # large tensors reuse freed memory instead of page-faulting fresh pages each step
    try:
        check_args(args)
        args.run(args)
    except DilemmaError as err:
        message = redact(str(err)).replace("\r", "\\r").replace("\n", "\\n")  # a name with a newline: one line still
        print(f"error: {message}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug of ours: one line, the traceback kept for the report
        _report_internal_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
