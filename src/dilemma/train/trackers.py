"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow (``train.loggers``).

Only rank 0 tracks. Each tracker gets the resolved config and the provenance once, then every
number of ``metrics.jsonl`` under the same name and step (the final record, with the end-of-run
kNN, too) and the run's pictures. A resumed run continues the same tracker runs: what resuming
needs (the W&B run id, the MLflow run id and tracking URI) is kept in ``RUN_DIR/trackers.json`` and
in each checkpoint. Each tracker skips the steps it already holds (logged before the run stopped;
the resume recomputes them, identically on CPU) and is sent the ones it missed from
``metrics.jsonl`` (a tracker that had failed, or one added on resume), so its step axis has no
duplicates and no gaps.

A tracker that fails (no network, server gone, full disk in its folder) costs one warning and is
switched off for the rest of the run: ``metrics.jsonl`` and the checkpoints never wait on it.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from dilemma.config import TrackingConfig
from dilemma.errors import DilemmaError
from dilemma.files import atomic_write_text
from dilemma.redact import redact

STATE_FILE = "trackers.json"


def numbers(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, less its step."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


# where each tracker library's code lives (its threads' tracebacks pass through these folders)
LIBRARY_FOLDERS = {"tensorboard": ("/tensorboard/", "/torch/utils/tensorboard/"), "wandb": ("/wandb/",),
                   "mlflow": ("/mlflow/",)}  # fmt: skip


def _library_of(trace) -> str | None:
    """The tracker whose library raised in a traceback (its innermost frame of theirs), or None."""
    import traceback

    for frame, _ in reversed(list(traceback.walk_tb(trace))):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for name, folders in LIBRARY_FOLDERS.items():
            if any(folder in path for folder in folders):
                return name
    return None


def _sound_state(state) -> dict:
    """Tracker state (``trackers.json``, a checkpoint's ``trackers``: untrusted input) with its damaged
    or ill-typed entries dropped: a tracker without one starts a new run."""
    if not isinstance(state, dict):
        return {}

    def sound(name, entry):
        if name == "held_up_to":
            return isinstance(entry, int) and not isinstance(entry, bool)
        if name == "status":
            return isinstance(entry, str)
        return isinstance(entry, dict) and isinstance(entry.get("logged_up_to", -1), int)

    return {name: entry for name, entry in state.items() if isinstance(name, str) and sound(name, entry)}


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


def _client(uri: str | None):
    """An MlflowClient for ``uri``; with none set anywhere, MLflow's own default, else (mlflow-skinny
    cannot open its default sqlite store) a file store in ./mlruns, said once. File stores are
    allowed explicitly: MLflow 3 keeps them behind MLFLOW_ALLOW_FILE_STORE."""
    from mlflow.tracking import MlflowClient

    if uri is None:
        try:
            return MlflowClient()
        except Exception:  # noqa: BLE001 - the installed MLflow cannot open its default store
            uri = Path("mlruns").resolve().as_uri()
            print(
                f"note: mlflow: no tracking URI set (train.tracking.tracking_uri or MLFLOW_TRACKING_URI) and this "
                f"MLflow cannot open its default store: using the file store {uri}",
                file=sys.stderr,
            )
    if _is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _existing_store(uri) -> str | None:
    """A tracking URI read back from a run folder (untrusted): a local file store only where it
    exists already, so a copied or edited ``trackers.json`` never makes MLflow create folders
    elsewhere on this machine."""
    if uri is None:
        return None
    if not isinstance(uri, str):
        raise DilemmaError(f"the saved MLflow tracking URI is not text ({type(uri).__name__})")
    if _is_file_store(uri):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path) if uri.startswith("file:") else uri)
        if not path.is_dir():
            raise DilemmaError(
                f"the saved MLflow file store {str(path)!r} does not exist here; it is not created from a run "
                "folder's trackers.json (set MLFLOW_TRACKING_URI or train.tracking.tracking_uri to use another)"
            )
    return uri


class Tracker(abc.ABC):
    """One tracking backend. ``start`` returns what resuming it needs (saved in ``trackers.json``);
    ``later``: opened after the run ended, to add read-outs (the run's status is left as it was)."""

    name = ""

    def __init__(self, run_dir: Path, settings: TrackingConfig):
        self.run_dir, self.settings, self.later = run_dir, settings, False
        self.run_name = settings.run_name or run_dir.resolve().name

    @abc.abstractmethod
    def start(self, saved: dict | None, config: dict, provenance: dict) -> dict:
        """Open the tracker's run (a new one, or the ``saved`` one); what resuming it needs."""

    @abc.abstractmethod
    def scalars(self, values: dict[str, float], step: int) -> None:
        """Numbers at a training step."""

    @abc.abstractmethod
    def image(self, name: str, path: Path, step: int) -> None:
        """A picture (a PNG file) at a step."""

    def readouts(self, values: dict[str, float], step: int) -> None:
        """Read-outs made after the run (``dilemma eval ... --checkpoint RUN``) at ``step``."""
        self.scalars(values, step)

    @abc.abstractmethod
    def finish(self, status: str) -> None:
        """End the run; ``status``: FINISHED, FAILED or KILLED."""


class TensorBoard(Tracker):
    """Event files in ``RUN_DIR/tensorboard``; a resumed run adds files to the same folder."""

    name = "tensorboard"

    def start(self, saved, config, provenance):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if saved is None:  # once per run
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
            self.writer.add_text("provenance", "```\n" + json.dumps(provenance, indent=1) + "\n```", 0)
        return {}

    def scalars(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, name, path, step):
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            self.writer.add_image(name, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, status):
        self.writer.close()


MODES = ("online", "offline", "disabled")  # W&B's modes a run folder may name (untrusted input)


class WandB(Tracker):
    """A W&B run (files under ``WANDB_DIR`` or ``RUN_DIR/wandb``; ``WANDB_MODE=offline`` works without
    a network); resumed by its id. W&B's steps only grow, so a read-out made later goes to the
    run's summary, not its history."""

    name = "wandb"

    def start(self, saved, config, provenance):
        import wandb

        s = self.settings
        # a run made offline is reopened offline (a later read-out in a new shell has no WANDB_MODE)
        mode = os.environ.get("WANDB_MODE") or (saved or {}).get("mode")
        self.run = wandb.init(
            project=s.project,
            entity=s.entity,
            name=self.run_name,
            tags=s.tags,
            group=s.group,
            config=None if saved else {**config, "provenance": provenance},  # once, when the run is made
            id=saved.get("id") if saved else None,
            resume="allow" if saved else None,
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            settings=wandb.Settings(console="off", silent=True, **({"mode": mode} if mode in MODES else {})),
        )
        # online, a resumed run starts after the last step W&B committed: a row still open when the
        # run was killed is lost, and must be sent again (offline, W&B knows no history: 0)
        self.holds_up_to = self.run.starting_step - 1 if saved and self.run.starting_step else None
        return {"id": self.run.id, "mode": self.run.settings.mode}

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def image(self, name, path, step):
        import wandb

        picture = wandb.Image(str(path))
        if self.later:
            self.run.summary[name] = picture
        else:
            self.run.log({name: picture}, step=step)

    def readouts(self, values, step):
        self.run.summary.update(values)

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MLflow(Tracker):
    """An MLflow run in ``train.tracking.experiment``; resumed by its id and tracking URI. With
    ``train.tracking.group``, its runs are children of one parent run per group (compare's arms)."""

    name = "mlflow"

    def start(self, saved, config, provenance):
        # a server that is gone must cost seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        s = self.settings
        uri = (
            s.tracking_uri
            or _existing_store((saved or {}).get("tracking_uri"))
            or os.environ.get("MLFLOW_TRACKING_URI")
        )
        self.client = _client(uri)
        if saved:
            self.run_id = saved["run_id"]
            if not self.later:
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._experiment_id()
            tags = {tag: "" for tag in s.tags or []}
            if s.group:
                tags["mlflow.parentRunId"] = self._parent_run(experiment)
            self.run_id = self.client.create_run(experiment, run_name=self.run_name, tags=tags).info.run_id
            self.client.log_dict(self.run_id, config, "config.json")
            self._log_params(config)
            self.client.log_dict(self.run_id, provenance, "provenance.json")
        return {"run_id": self.run_id, "tracking_uri": redact(self.client.tracking_uri)}  # written down: no secret

    def _log_params(self, config: dict) -> None:
        """The config as params (``optim.lr``, ...), so runs can be searched and compared by setting."""
        from mlflow.entities import Param

        params = [Param(key, str(value)[:500]) for key, value in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _experiment_id(self) -> str:
        name = self.settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dilemma"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _parent_run(self, experiment: str) -> str:
        """The group's parent run: made (and closed: it only holds the children) by the group's first
        run, found by the next."""
        group = self.settings.group
        quoted = group.replace("'", "\\'")
        runs = self.client.search_runs([experiment], f"tags.`dilemma.group` = '{quoted}'", max_results=1)
        if runs:
            return runs[0].info.run_id
        parent = self.client.create_run(experiment, run_name=group, tags={"dilemma.group": group}).info.run_id
        self.client.set_terminated(parent)
        return parent

    def scalars(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def image(self, name, path, step):
        self.client.log_artifact(self.run_id, str(path), "pictures")

    def finish(self, status):
        if not self.later:
            self.client.set_terminated(self.run_id, status=status)


TRACKERS = {cls.name: cls for cls in (TensorBoard, WandB, MLflow)}


class Trackers:
    """The trackers of one run, each guarded: the first failure prints a warning and switches it off
    (and ``trackers.json`` records the last step it holds, so a resume fills the gap)."""

    def __init__(self, run_dir: Path, loggers: list[str], settings: TrackingConfig | None, *, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        names = [name for name in dict.fromkeys(loggers) if name in TRACKERS] if enabled else []
        self.active = [TRACKERS[name](self.run_dir, settings) for name in names]
        self.state: dict = {}
        self.logged: dict[str, int] = {}  # per tracker: the last step it holds
        self.sent: tuple[int, set] = (-1, set())  # the last step sent, and the keys sent at it
        self.later = False
        self._thread_hook = None  # threading.excepthook before start() installed ours
        self._lock = threading.Lock()  # a library's thread may switch its tracker off while the main thread logs

    def start(
        self, config: dict, provenance: dict, *, saved: dict | None = None, held_up_to: int = -1,
        backfill: list[dict] = (),
    ) -> None:  # fmt: skip
        """Open every tracker for training. A resumed run (``saved``: the checkpoint's state, used
        where the run folder's ``trackers.json`` is missing) reopens the saved tracker runs: each
        holds the steps up to the furthest any part of the run logged (``held_up_to``, what
        ``metrics.jsonl`` had before this resume cut it back, or an earlier part's mark) unless the
        state says it stopped earlier (it failed, or a part ran without it); ``backfill``
        (``metrics.jsonl``'s records) gives it the ones it lacks."""
        if not self.enabled:
            return
        self._say_credentials()
        self._catch_library_failures()
        self.state = {**_sound_state(saved), **self._read_state()} if saved is not None else {}
        held = max(held_up_to, self.state.get("held_up_to", -1))
        running = {tracker.name for tracker in self.active}
        for name in [n for n in self.state if n in TRACKERS and n not in running]:
            entry = self.state[name]  # a saved tracker this part runs without: it stops where it is
            self.state[name] = {**entry, "logged_up_to": min(held, entry.get("logged_up_to", held))}
        for tracker in list(self.active):
            before = self.state.get(tracker.name)
            self.logged[tracker.name] = -1 if before is None else min(held, before.get("logged_up_to", held))
            if self._open(tracker, before, config, provenance):
                if getattr(tracker, "holds_up_to", None) is not None:
                    self.logged[tracker.name] = min(self.logged[tracker.name], tracker.holds_up_to)
                for record in backfill:
                    self._send(tracker, record, numbers(record))
        if self.active or self.state:
            self.state["held_up_to"] = held
            self._write_state()

    def reopen(self) -> None:
        """Only the run's saved tracker runs, reopened to add read-outs made after it
        (``train/later_readouts.py``); nothing of the run folder is written."""
        if not self.enabled:
            return
        self._catch_library_failures()
        self.later, self.state = True, self._read_state()
        self.active = [tracker for tracker in self.active if tracker.name in self.state]
        for tracker in list(self.active):
            tracker.later = True
            self._open(tracker, self.state[tracker.name], {}, {})

    def _open(self, tracker: Tracker, before: dict | None, config: dict, provenance: dict) -> bool:
        """Start ``tracker`` (a new run, or the one ``before`` names); False if it failed."""
        started = self._guard(tracker, "starting", tracker.start, before, config, provenance)
        if tracker in self.active:
            self.state[tracker.name] = started
        return tracker in self.active

    def _say_credentials(self) -> None:
        uri = next((t.settings.tracking_uri for t in self.active if t.name == "mlflow"), None)
        if uri and redact(uri) != uri:
            print(
                "note: train.tracking.tracking_uri holds credentials: this process uses them, and nothing writes "
                "them down (config, checkpoints, provenance, logs); give them to MLflow as MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD instead, which a resume or a later read-out needs",
                file=sys.stderr,
            )

    def _catch_library_failures(self) -> None:
        """A tracker library's own thread, or its log file, failing: one warning, never a traceback."""
        if self._thread_hook is None:
            self._thread_hook, threading.excepthook = threading.excepthook, self._thread_failed
            # a library's own log file on a full or read-only disk: Python's logging would print a
            # traceback per record ("--- Logging error ---", W&B's debug.log); the tracker's failure
            # still reaches us as the one warning when its calls fail
            self._logging_errors, logging.raiseExceptions = logging.raiseExceptions, False

    def _read_state(self) -> dict:
        """``trackers.json``, its damaged entries dropped (a tracker without one starts a new run)."""
        try:
            state = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return _sound_state(state)

    def _write_state(self) -> None:
        try:
            with self._lock:
                atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=1) + "\n")
        except DilemmaError as err:  # the trackers' bookkeeping must not cost the run either
            print(f"warning: {err}", file=sys.stderr)

    def _send(self, tracker: Tracker, record: dict, values: dict[str, float]) -> None:
        step = record["step"]
        if "stopped_by" in record:  # the final record: what its step's record did not already say
            if self.sent[0] == step:
                values = {k: v for k, v in values.items() if k not in self.sent[1]}
            elif step <= self.logged[tracker.name]:  # a step held from before the resume (it ended below)
                self._guard(tracker, "logging the final record", tracker.readouts, values, step)
                return
        elif step <= self.logged[tracker.name]:
            return  # it holds this step already
        if self._guard(tracker, f"logging step {step}", tracker.scalars, values, step) is not False:
            self.logged[tracker.name] = max(self.logged[tracker.name], step)

    def _note_sent(self, step: int, keys: set[str]) -> None:
        self.sent = (step, self.sent[1] | keys if self.sent[0] == step else keys)

    def scalars(self, record: dict) -> None:
        values = numbers(record)  # once for every tracker
        for tracker in list(self.active):
            self._send(tracker, record, values)
        self._note_sent(record["step"], set(values))

    def readouts(self, values: dict[str, float], step: int) -> None:
        for tracker in list(self.active):
            self._guard(tracker, "logging read-outs", tracker.readouts, values, step)

    def image(self, path: Path, step: int) -> None:
        for tracker in list(self.active):
            self._guard(tracker, f"logging {Path(path).name}", tracker.image, Path(path).stem, Path(path), step)

    def finish(self, status: str = "FINISHED") -> None:
        """End the tracker runs as the run ended (a run reopened ``later`` keeps its recorded status)."""
        if self.later:
            status = self.state.get("status", "FINISHED")
        elif self.active:
            self.state["status"] = status
            self._write_state()
        for tracker in list(self.active):
            self._guard(tracker, "finishing", tracker.finish, status)
        self.active = []
        if self._thread_hook is not None:
            threading.excepthook, self._thread_hook = self._thread_hook, None
            logging.raiseExceptions = self._logging_errors

    def _thread_failed(self, args) -> None:
        """A tracker library's own thread failed (TensorBoard's event writer on a full disk or a
        read-only folder): the one warning of ``_guard`` instead of the thread's traceback. Other
        threads' exceptions go to the hook that was there before."""
        library = _library_of(args.exc_traceback)
        tracker = next((t for t in list(self.active) if t.name == library), None)
        if library is None:
            self._thread_hook(args)
        elif tracker is not None:
            self._switch_off(tracker, "writing in its own thread", args.exc_value)

    def _guard(self, tracker: Tracker, what: str, call, *args):
        """``call(*args)``'s result (True for None), or False after a failure, which is a warning."""
        try:
            result = call(*args)
            return True if result is None else result
        except Exception as err:  # any failure of a tracker: never the run's
            self._switch_off(tracker, what, err)
            return False

    def _switch_off(self, tracker: Tracker, what: str, err: BaseException | None) -> None:
        """One warning, the tracker off for the rest of the run (once: its thread and the main
        thread may both report a failure)."""
        if tracker not in self.active:
            return
        self.active = [t for t in self.active if t is not tracker]
        text = str(err).strip()
        first = text.splitlines()[0][:300] if text else type(err).__name__
        print(
            f"warning: {tracker.name} failed while {what} ({redact(first)}); it is off for the rest of this run. "
            "metrics.jsonl and the checkpoints are unaffected.",
            file=sys.stderr,
        )
        if tracker.name in self.state and not self.later:  # a resume sends it what it missed
            self.state[tracker.name] = {**self.state[tracker.name], "logged_up_to": self.logged.get(tracker.name, -1)}
            self._write_state()
