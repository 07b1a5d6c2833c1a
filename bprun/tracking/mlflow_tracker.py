"""MLflow: one run per bprun run, nested under its sweep's or search's parent run.

Every call here blocks (an HTTP request, or an SQLite transaction that may wait
on another job's lock), so the run's tracker drives this backend from a
`Background` worker, never from the training thread. The client retries
nothing itself: the worker does, with the events kept in its buffer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("bprun")

# Stores MLflow reads and writes itself; a plain folder (file:) is deprecated in MLflow 3.
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}  # else KILLED
PARENT_FILE = "mlflow_parent.json"  # in a sweep folder: the parent run its jobs nest under


def param_key(key: str) -> str:
    """A config key as MLflow takes it (`loading@dataset` -> `loading_dataset`)."""
    return re.sub(r"[^\w\-. /]", "_", key)[:250]


def refused(e: BaseException) -> bool:
    """A request the store answered with a refusal: sending it again cannot help."""
    return getattr(e, "error_code", "") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def check_uri(uri: str) -> None:
    from bprun.errors import BprunError

    scheme = urlparse(str(uri)).scheme.split("+")[0]
    if scheme not in SCHEMES:
        raise BprunError(
            f"tracker.mlflow.uri={uri}: MLflow stores at {', '.join(s + ':' for s in SCHEMES)} "
            "are supported; use sqlite:///<path>/mlflow.db for a local store or "
            "http://host:port for an MLflow server"
        )


def absolute_uri(uri: str) -> str:
    """`sqlite:///outputs/mlflow.db` made absolute, so that jobs anywhere share one store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///"))
        return "sqlite:///" + str(path.absolute())
    return uri


def client(uri: str):
    """An MlflowClient that fails fast: its own retries (minutes, by default) would hold
    the buffer back; the Background worker retries instead. Stores' INFO lines muted."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    for name in ("alembic", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created when missing (by another job at the same time, too).
    A local store keeps artifacts beside its database file, not in ./mlruns."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:
        found = mlflow_client.get_experiment_by_name(name)  # created meanwhile
        if found is None:
            raise
        return found.experiment_id


class MlflowBackend:
    """Events of one run, sent by a Background worker. `ids["mlflow"]` holds the run id once
    the run exists: it is the dict the checkpoint's extra state saves, so a resume finds it."""

    def __init__(
        self,
        settings: dict,
        run_dir: Path,
        ids: dict,
        resume_id: str | None = None,
        resuming: bool = False,
    ):
        self.uri = absolute_uri(str(settings["uri"]))
        self.experiment = settings.get("experiment") or _default_experiment(run_dir)
        self.run_name = settings.get("run_name") or run_dir.name
        self.run_dir, self.ids, self.resume_id = run_dir, ids, resume_id
        self.resuming = resuming or resume_id is not None
        self.parent_id = parent_run_id(run_dir, self.uri)
        self.client = None
        self.run_id: str | None = None

    def prepare(self) -> None:
        """MLflow's import and its store (an SQLite file is created and migrated here)."""
        import mlflow.entities  # noqa: F401

        self.client = client(self.uri)
        self.client.get_experiment_by_name(self.experiment)

    def start(self) -> None:
        self.client = self.client or client(self.uri)
        if self.resuming and not self.resume_id:
            self.resume_id = self._run_of_folder()
        if self.resume_id and self._reopen(self.resume_id):
            self.run_id = self.resume_id
        else:
            tags = {"mlflow.parentRunId": self.parent_id} if self.parent_id else {}
            run = self.client.create_run(
                experiment_id(self.client, self.experiment, self.uri),
                run_name=self.run_name,
                tags={**tags, "mlflow.source.name": "bprun"},
            )
            self.run_id = run.info.run_id
        self.ids["mlflow"] = self.run_id

    def _run_of_folder(self) -> str | None:
        """The run this folder logged to: a checkpoint written before the run was created
        (the first one, while MLflow was still starting) does not hold its id."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return None
        folder = str(self.run_dir).replace("'", "\\'")
        runs = self.client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.run_dir = '{folder}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
            return True
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning(
                f"tracker mlflow: run {run_id} of the checkpoint is not in {self.uri}; "
                "the resumed run is logged as a new MLflow run"
            )
            return False

    def handle(self, kind: str, items: list) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if kind == "metrics":
            metrics = [
                Metric(key, float(value), int(stamp * 1000), int(step))
                for scalars, step, stamp in items
                for key, value in scalars.items()
            ]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        elif kind == "params":
            (values,) = items[0]
            if self.run_id == self.resume_id:  # MLflow keeps a param's first value for good
                kept = self.client.get_run(self.run_id).data.params
                values = {k: v for k, v in values.items() if param_key(k) not in kept}
            params = [Param(param_key(k), str(v)[:6000]) for k, v in values.items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        elif kind == "tags":
            (values,) = items[0]
            tags = [RunTag(k, str(v)) for k, v in values.items()]
            self.client.log_batch(self.run_id, tags=tags)
        elif kind == "text":
            tag, text, step = items[0]
            self.client.log_text(self.run_id, text, f"text/{tag}_{step}.md")
        elif kind == "artifact":
            path, folder = items[0]
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, path, folder)
            elif Path(path).is_file():
                self.client.log_artifact(self.run_id, path, folder)
        elif kind == "finish":
            (status,) = items[0]  # completed, pruned, failed or interrupted
            self.client.set_tag(self.run_id, "status", status)
            self.client.set_terminated(self.run_id, STATUS.get(status, "KILLED"))

    def stop(self) -> None:
        pass

    permanent = staticmethod(refused)


def _default_experiment(run_dir: Path) -> str:
    """The run folder's name; a sweep's jobs share their sweep folder's, with the parent."""
    if (run_dir.parent / PARENT_FILE).is_file():
        return run_dir.parent.name
    return run_dir.name


def parent_run_id(run_dir: Path, uri: str) -> str | None:
    """The sweep's parent run, when this run is a job of a sweep that opened one in `uri`."""
    try:
        record = json.loads((run_dir.parent / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get("run_id") if record.get("uri") == uri else None


# ---------------------------------------------------------------- a sweep's parent run
def open_parent(settings: dict, sweep_dir: Path, params: dict) -> None:
    """Create the parent run of a sweep or search (or reopen the one a continued sweep made)
    and record it in the sweep folder for the jobs. Runs in the sweep's process, once; a
    store that does not answer leaves the jobs as runs of their own, with a warning."""
    uri = absolute_uri(str(settings["uri"]))
    path = sweep_dir / PARENT_FILE
    try:
        mlflow_client = client(uri)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("uri") == uri and record.get("run_id"):
            mlflow_client.update_run(record["run_id"], status="RUNNING")
            return
        name = settings.get("experiment") or sweep_dir.name
        run = mlflow_client.create_run(
            experiment_id(mlflow_client, name, uri),
            run_name=settings.get("run_name") or sweep_dir.name,
            tags={"mlflow.source.name": "bprun", "bprun.sweep_dir": str(sweep_dir)},
        )
        from mlflow.entities import Param

        values = [Param(param_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(values), 100):
            mlflow_client.log_batch(run.info.run_id, params=values[i : i + 100])
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id}) + "\n")
    except Exception as e:
        log.warning(f"tracker mlflow: no parent run for the sweep ({type(e).__name__}: {e})")


def close_parent(settings: dict, sweep_dir: Path, failed: bool, summary_files=()) -> None:
    """End the parent run: FAILED when a job failed; the sweep's summary as artifacts."""
    uri = absolute_uri(str(settings["uri"]))
    try:
        record = json.loads((sweep_dir / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return
    if record.get("uri") != uri:
        return
    for attempt in range(3):
        try:
            mlflow_client = client(uri)
            for f in summary_files:
                if Path(f).is_file():
                    mlflow_client.log_artifact(record["run_id"], str(f))
            mlflow_client.set_terminated(record["run_id"], "FAILED" if failed else "FINISHED")
            return
        except Exception as e:
            if attempt == 2:
                log.warning(f"tracker mlflow: could not end the sweep's parent run ({e})")
            time.sleep(1.0)
