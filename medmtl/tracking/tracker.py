"""`MLflowTracker`: one readable MLflow run per training, resumable, PHI-safe.

`MLflowTracker` is an ignite handler for the MONAI trainer and its evaluator. It records

- the flattened hyperparameters (params) and the resolved bundle config (`config/resolved_config.json`),
- every `train/...` entry of `trainer.state.metrics` at each epoch, and every scalar of
  `evaluator.state.metrics` (`val/...`) at the trainer's epoch,
- per validation round, a per-case table `validation/cases_epoch_XXX.csv` (worst case first) and overlay
  pictures of the worst cases by mean Dice, `overlays/epoch_XXX/NN_<case_id>.png`,
- at the end the best checkpoint as `model/model.pt` and a run description (dataset, heads, best Dice).

Every MLflow call goes through the sink of `medmtl.tracking.journal`, which journals the run while the store is
unreachable. Nothing here reads DICOM headers; params, tags, config and table columns named like patient
identifiers are dropped anyway (`scrub_identifiers`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from medmtl.tracking.bundle import BundleConfig, _resolving_bundle
from medmtl.tracking.journal import _end_if_open, _journal_folder, _never_raises, _OpenRun, _short_http_waits, _Sink
from medmtl.tracking.review import log_cases
from medmtl.tracking.scrub import _as_scalar, _mlflow_key, flatten_params, scrub_identifiers
from medmtl.tracking.store import _REMOTE_SCHEMES, _experiment_id, _redact

logger = logging.getLogger(__name__)

NOTE_TAG = "mlflow.note.content"  # the run description shown by the MLflow UI


def _add_once(engine: Engine, epoch_completed: Callable, completed: Callable, exception_raised: Callable) -> None:
    """Add the three handlers of one engine, each once (attaching the tracker twice changes nothing)."""
    for event, handler in (
        (Events.EPOCH_COMPLETED, epoch_completed),
        (Events.COMPLETED, completed),
        (Events.EXCEPTION_RAISED, exception_raised),
    ):
        if not engine.has_event_handler(handler, event):
            engine.add_event_handler(event, handler)


# ----------------------------------------------------------------------------------------------------------
# The handler


class MLflowTracker:
    """An ignite handler that records one training (trainer + evaluator) as one MLflow run.

    Attach it to both engines: `attach(trainer)` and `attach(evaluator)` (a MONAI `Evaluator` is recognised,
    so the same instance can sit in a bundle's `train#handlers` and `validate#handlers`), or
    `attach(trainer, evaluator)`. Put it in a checkpoint's `save_dict`/`load_dict` so a resumed training
    continues the same run: the run starts lazily at the first thing to log, after MONAI's CheckpointLoader
    (Events.STARTED) restored the run id.

    Events: trainer EPOCH_COMPLETED logs `train/*` metrics at step=epoch; evaluator EPOCH_COMPLETED logs all
    scalar metrics at the trainer's epoch, the case table and the worst-case overlays; trainer COMPLETED
    logs the best checkpoint and the run description and ends the run FINISHED; EXCEPTION_RAISED ends it
    FAILED (KILLED for Ctrl-C) and re-raises. Without a trainer (evaluation only), the evaluator's
    COMPLETED/EXCEPTION_RAISED end the run. Only rank 0 of a distributed run logs.

    NaN metric values are not logged: in medmtl NaN means "term or metric absent" (a head switched off).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_dir: Path | str,
        label_names: Mapping[int, str],
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | BundleConfig | None = None,
        run_name: str | None = None,
        description: str | None = None,
        best_checkpoint: Path | str | None = None,
        dataset: str | None = None,
        heads: Sequence[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        key_metric: str = "val/mean_dice",
        n_worst: int = 3,
        journal_dir: Path | str | None = None,
    ) -> None:
        """
        Args:
            tracking_uri: the MLflow store (see `resolve_tracking_uri`).
            experiment_name: experiment of the run; created if missing.
            artifact_dir: where a new experiment keeps its artifacts (absolute; `<eval_dir>/mlruns` next to
                the SQLite db is the convention). Used when the experiment is created, for database
                stores; a tracking server (http) keeps its own artifact store unless this is a URI.
            label_names: `{label value: structure name}`, e.g. `{1: "organ", 2: "lesion"}`.
            params: hyperparameters, nested; logged flattened once per run. Inside a MONAI bundle the data of
                the resolved bundle config (`BundleConfig.params`) is logged too; these are added on top
                (and win): what the config cannot give, such as the precision in words.
            config: logged as `config/resolved_config.json` (nothing when None). Inside a MONAI bundle the
                resolved bundle config (`BundleConfig.resolved`) is logged instead: it holds what any
                mapping given here could restate.
            run_name: readable run name; default `<experiment>-<YYYYmmdd-HHMMSS>`.
            description: text put at the top of the run description.
            best_checkpoint: file (or glob, newest match) logged as `model/model.pt` when training completes.
            dataset: dataset name for the description and the `medmtl.dataset` tag.
            heads: active heads (e.g. `["seg", "cls", "boundary"]`) for the description and a tag.
            tags: more run tags.
            key_metric: evaluator metric whose maximum is reported as the best (higher is better).
            n_worst: number of worst validation cases drawn as overlays.
            journal_dir: where the run is journaled while the store is unreachable (for `medmtl sync-mlflow`);
                default `mlflow_pending` next to `artifact_dir` (`<eval_dir>/mlflow_pending` for the
                convention above; in the working directory when `artifact_dir` is a remote URI).
        """
        self.experiment_name = experiment_name
        self.artifact_dir = artifact_dir
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self._given_params = flatten_params(params)
        self._params: dict[str, str] | None = None  # read when the run starts: the bundle is resolved by then
        # the bundle constructing this tracker, if any (MONAI resolves its config items on this call stack)
        self.bundle = config if isinstance(config, BundleConfig) else _resolving_bundle()
        self.config = self.bundle if self.bundle is not None else config
        # readable in the UI's run list, which cuts long names: what was trained, with which heads, when
        self.run_name = run_name or " ".join(
            [dataset or experiment_name, "+".join(heads or []) or "run", time.strftime("%m-%d %H:%M:%S")]
        )
        self.description = description
        self.best_checkpoint = best_checkpoint
        self.dataset = dataset
        self.heads = list(heads or [])
        self.tags = {
            _mlflow_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in scrub_identifiers(dict(tags or {})).items()
        }
        self.key_metric = key_metric
        self.n_worst = n_worst
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self._sink = _Sink(tracking_uri, _journal_folder(journal_dir, artifact_dir))
        self._run_id: str | None = None  # set by a new run or by load_state_dict
        self._open = _OpenRun()
        self._open.sink = self._sink
        self._trainer: Engine | None = None
        weakref.finalize(self, _end_if_open, self._open)

    @property
    def params(self) -> dict[str, str]:
        """The params of the run: the bundle config's data (if any) and the `params` given, flattened."""
        if self._params is None:
            from_bundle = flatten_params(self.bundle.params(skip_values=[self])) if self.bundle is not None else {}
            self._params = {**from_bundle, **self._given_params}
        return self._params

    @property
    def tracking_uri(self) -> str:
        """The MLflow store this tracker writes to."""
        return self._sink.tracking_uri

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, None before the run started or while a run that started offline is journaled."""
        return self._run_id

    @property
    def journal(self) -> Path | None:
        """The journal file this run is kept in while the store is unreachable, None while it is online."""
        return self._sink.journal.path if self._sink.journal is not None else None

    # -- checkpointing --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """State for a checkpoint: `{"run_id", "journal", "best_metric", "best_epoch"}`.

        `journal` is the local key of a run kept in the offline journal (None while online); a run that was
        journaled stays journaled after a restart. Starts the run if it has not started yet, so that a
        checkpoint always names the run; an ended run is not reopened (a final checkpoint saved after the
        tracker finished the run at COMPLETED).
        """
        if self._run_id is None and self._sink.journal_key is None:
            self._ensure_run()
        return {
            "run_id": self._run_id,
            "journal": self._sink.journal_key,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run named by a checkpoint (MONAI's CheckpointLoader calls this at Events.STARTED).

        Args:
            state: a `state_dict()` result.
        """
        run_id, journal_key = state.get("run_id"), state.get("journal")
        if self._open.run_id is not None and (run_id, journal_key) != (self._run_id, self._sink.journal_key):
            logger.warning(
                "MLflow run %s is already open; not switching to %s from the checkpoint",
                self._open.run_id,
                run_id or journal_key,
            )
            return
        self._run_id = run_id
        self._sink.journal_key = journal_key
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")

    # -- attaching ------------------------------------------------------------------------------------------

    def attach(self, engine: Engine, evaluator: Engine | None = None) -> None:
        """Attach to an engine: a MONAI `Evaluator` as the evaluator, any other engine as the trainer.

        Args:
            engine: the trainer, or a MONAI evaluator.
            evaluator: the evaluator, when attaching both at once.
        """
        from monai.engines import Evaluator

        if isinstance(engine, Evaluator):
            self.attach_evaluator(engine)
        else:
            self.attach_trainer(engine)
        if evaluator is not None:
            self.attach_evaluator(evaluator)

    def attach_trainer(self, trainer: Engine) -> None:
        """Log training metrics each epoch, end the run when training completes or fails.

        Args:
            trainer: the training engine; its epoch is also the step of validation metrics.
        """
        self._trainer = trainer
        _add_once(trainer, self._on_train_epoch, self._on_train_completed, self._on_train_exception)

    def attach_evaluator(self, evaluator: Engine) -> None:
        """Log validation metrics, the case table and overlays after each validation round.

        Attach it after the handler that fills `evaluator.state.metrics` and `case_results`.

        Args:
            evaluator: the validation engine (run by the trainer, e.g. via MONAI's ValidationHandler).
        """
        _add_once(evaluator, self._on_validation, self._on_eval_completed, self._on_eval_exception)

    # -- event handlers -------------------------------------------------------------------------------------

    @_never_raises("logging training metrics")
    def _on_train_epoch(self, trainer: Engine) -> None:
        metrics = {k: v for k, v in trainer.state.metrics.items() if str(k).startswith("train/")}
        self._log_metrics(metrics, step=trainer.state.epoch)

    @_never_raises("logging validation results")
    def _on_validation(self, evaluator: Engine) -> None:
        # ValidationHandler runs evaluator.run(trainer epoch), so evaluator.state.epoch equals it; the
        # trainer's own counter is still the reference when there is one (a plain ignite evaluator restarts).
        step = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        metrics = dict(evaluator.state.metrics)
        self._log_metrics(metrics, step=step)
        key_value = _as_scalar(metrics.get(self.key_metric))
        if (
            key_value is not None
            and not np.isnan(key_value)
            and (self.best_metric is None or key_value > self.best_metric)
        ):
            self.best_metric, self.best_epoch = key_value, int(step)
        cases = getattr(evaluator.state, "case_results", None)
        if cases:
            self._log_cases(cases, step)

    @_never_raises("finishing the run")
    def _on_train_completed(self, trainer: Engine) -> None:
        self._finish()

    @_never_raises("finishing the run")
    def _on_eval_completed(self, evaluator: Engine) -> None:
        if self._trainer is None:  # evaluation only; under a trainer the trainer ends the run
            self._finish()

    def _on_train_exception(self, trainer: Engine, err: BaseException) -> None:
        self._end_failed(err)
        # Re-raise as MONAI's handlers do: ignite gives an exception to the first EXCEPTION_RAISED handler.
        raise err

    def _on_eval_exception(self, evaluator: Engine, err: BaseException) -> None:
        if self._trainer is None:
            self._end_failed(err)
        raise err

    # -- run lifecycle --------------------------------------------------------------------------------------

    def _ensure_run(self) -> str | None:
        """The open run's id, starting or resuming the run first; None if tracking is off or failing."""
        if self._open.run_id is not None:
            return self._open.run_id
        if idist.get_rank() != 0:  # only rank 0 of a distributed run logs
            return None
        self._sink.run_info = self._journal_info()
        resumed_config = f"config/resolved_config_resumed_{time.strftime('%Y%m%d-%H%M%S')}.json"
        if self._sink.journal_key is not None:  # journaled once, journaled for good: one place to sync from
            if self._sink.journal is None:
                logger.warning(
                    "MLflow: the checkpoint's run is kept offline in %s; upload it with `medmtl sync-mlflow`",
                    self._sink.open_journal(self._run_id).path,
                )
            else:  # reopened after it ended: a new header sets it running again when replayed
                self._sink.open_journal(self._run_id)
            return self._open_offline(resumed_config)
        resuming = self._run_id is not None
        try:
            with _short_http_waits():
                run_id = self._resume_run(self._run_id) if self._run_id else None
                if run_id is None and self._run_id is None:
                    run_id = self._create_run()
        except Exception as err:  # a store that cannot be opened must not stop training either
            if not self._sink.outage("starting the run", err, run_id=self._run_id):
                return None
            return self._open_offline(resumed_config if resuming else "config/resolved_config.json")
        if self._sink.journal is not None:  # the store failed halfway through setting the run up
            return self._open_offline(None)
        self._open.run_id = run_id
        return run_id

    def _open_offline(self, config_file: str | None) -> str:
        """Mark the journaled run open and journal its config; returns the id the handlers pass around."""
        key = self._sink.journal_key
        self._open.run_id = self._run_id or f"journal:{key}"  # the MLflow id when the run was created before
        if config_file:
            self._log_config(self._open.run_id, config_file)
        return self._open.run_id

    def _journal_info(self) -> dict[str, Any]:
        """What the journal records about the run so that a sync can create it (header of each session)."""
        return {
            "experiment": self.experiment_name,
            "artifact_dir": str(self.artifact_dir),
            "run_name": self.run_name,
            "tags": self._start_tags(),
            "params": self.params,
        }

    def _resume_run(self, run_id: str) -> str | None:
        """Set the checkpoint's run RUNNING again; a run missing from this store is replaced by a new one."""
        try:
            run = self._sink.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            logger.warning(
                "MLflow run %s from the checkpoint is not in %s (or deleted); starting a new run",
                run_id,
                _redact(self.tracking_uri),
            )
            self._run_id = None
            return None
        self._sink.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self._run_id = run_id
        logged = run.data.params
        # MLflow refuses to change a logged param: log only new ones, record which ones changed.
        changed = sorted(k for k, v in self.params.items() if k in logged and logged[k] != v)
        self._log_params({k: v for k, v in self.params.items() if k not in logged}, run_id)
        tags = dict(self._start_tags())
        if changed:
            logger.warning(
                "resumed MLflow run %s with changed params (MLflow keeps the first values): %s",
                run_id,
                ", ".join(changed),
            )
            tags["medmtl.params_changed_on_resume"] = ", ".join(changed)[:MAX_TAG_VAL_LENGTH]
        self._set_tags(tags, run_id)
        self._log_config(run_id, f"config/resolved_config_resumed_{time.strftime('%Y%m%d-%H%M%S')}.json")
        logger.info("MLflow: resumed run %r (%s) in %s", run.info.run_name, run_id, _redact(self.tracking_uri))
        return run_id

    def _create_run(self) -> str:
        """Create the run (and the experiment) and log params, tags and config."""
        client = self._sink.client
        experiment_id = _experiment_id(client, self.experiment_name, self._artifact_location())
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self._start_tags())
        run_id = run.info.run_id
        self._run_id = run_id
        self._log_params(self.params, run_id)
        self._log_config(run_id, "config/resolved_config.json")
        logger.info(
            "MLflow: run %r (%s) in experiment %r at %s",
            self.run_name,
            run_id,
            self.experiment_name,
            _redact(self.tracking_uri),
        )
        return run_id

    def _artifact_location(self) -> str | None:
        """Artifact root of a new experiment: `artifact_dir` as an absolute URI; a server's own store."""
        text = str(self.artifact_dir)
        if len(urlsplit(text).scheme) > 1:  # already a URI (s3://, file://)
            return text
        if urlsplit(self.tracking_uri).scheme in _REMOTE_SCHEMES:
            return None  # a client-side folder would be invisible to the server's UI
        return Path(text).expanduser().absolute().as_uri()

    def _finish(self) -> None:
        run_id = self._ensure_run()
        if run_id is None:
            return
        checkpoint = self._best_checkpoint_file()
        if checkpoint is not None:
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "model.pt"  # a stable artifact name whatever the saver called the file
                try:
                    target.symlink_to(checkpoint.absolute())
                except OSError:
                    shutil.copy2(checkpoint, target)
                self._sink.call("logging the best checkpoint", "log_artifact", run_id, str(target), "model")
        self._set_tags(self._end_tags(), run_id)
        self._open.end(RunStatus.to_string(RunStatus.FINISHED))

    def _end_failed(self, err: BaseException) -> None:
        if self._open.run_id is None:
            return
        status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) else RunStatus.FAILED
        self._set_tags({"medmtl.error": f"{type(err).__name__}: {str(err)[:500]}"}, self._open.run_id)
        self._open.end(RunStatus.to_string(status))

    def _best_checkpoint_file(self) -> Path | None:
        if not self.best_checkpoint:
            return None
        path = Path(self.best_checkpoint)
        if path.is_file():
            return path
        if any(c in path.name for c in "*?["):
            matches = [p for p in path.parent.glob(path.name) if p.is_file()]
            return max(matches, key=lambda p: p.stat().st_mtime) if matches else None
        return None

    # -- what is logged -------------------------------------------------------------------------------------

    def _start_tags(self) -> dict[str, str]:
        tags = dict(self.tags)
        if self.dataset:
            tags["medmtl.dataset"] = str(self.dataset)
        if self.heads:
            tags["medmtl.heads"] = ", ".join(map(str, self.heads))
        tags[NOTE_TAG] = self._note()
        return tags

    def _end_tags(self) -> dict[str, str]:
        tags = {NOTE_TAG: self._note()}
        if self.best_metric is not None:
            tags["medmtl.best"] = f"{self.key_metric}={self.best_metric:.4f} (epoch {self.best_epoch})"
        return tags

    def _note(self) -> str:
        """The run description shown in the MLflow UI (markdown)."""
        lines = [self.description.strip(), ""] if self.description else []
        lines.append(f"- dataset: {self.dataset or 'not given'}")
        lines.append(f"- heads: {', '.join(map(str, self.heads)) or 'not given'}")
        lines.append(f"- structures: {', '.join(f'{k} {v}' for k, v in sorted(self.label_names.items()))}")
        if self.best_metric is not None:
            lines.append(f"- best {self.key_metric}: {self.best_metric:.4f} (epoch {self.best_epoch})")
        return "\n".join(lines)[:MAX_TAG_VAL_LENGTH]

    def _log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        timestamp = int(time.time() * 1000)
        entries = []
        for name, value in metrics.items():
            scalar = _as_scalar(value)
            if scalar is not None and not np.isnan(scalar):  # NaN: the term/metric is absent
                entries.append(Metric(_mlflow_key(name), scalar, timestamp, int(step)))
        run_id = self._ensure_run() if entries else None
        if run_id is not None:
            self._sink.log_batch(f"logging metrics at step {step}", run_id, "metrics", entries)

    def _log_params(self, params: Mapping[str, str], run_id: str) -> None:
        self._sink.log_batch("logging params", run_id, "params", [Param(k, v) for k, v in params.items()])

    def _set_tags(self, tags: Mapping[str, str], run_id: str) -> None:
        items = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in scrub_identifiers(dict(tags)).items()]
        self._sink.log_batch("setting tags", run_id, "tags", items)

    def _log_config(self, run_id: str, artifact_file: str) -> None:
        if self.config is None:
            return
        config = self.config.resolved(skip_values=[self]) if isinstance(self.config, BundleConfig) else self.config
        # A JSON round trip turns objects of a resolved config (networks, transforms) into their text.
        config = json.loads(json.dumps(scrub_identifiers(config), default=str))
        self._sink.call("logging the config", "log_dict", run_id, config, artifact_file)

    def _log_cases(self, cases: Sequence[Mapping[str, Any]], step: int) -> None:
        run_id = self._ensure_run()
        if run_id is not None:
            log_cases(self._sink, run_id, cases, step, self.label_names, self.n_worst)
