"""MLflow tracking of a search: one experiment per search, a parent run, one nested run per evaluated candidate.

All MLflow calls are made from the flow's main thread through one `SearchTracker` (parallel trainings only
compute; their results are logged here), and every call is retried on transient store errors such as
SQLite's "database is locked". Logging is idempotent: candidates are identified by the tag
`lossforge.candidate_key`, so re-running a killed search never duplicates runs (`sync()` logs only the
records that are missing, and finishes or replaces runs left half-written by the kill).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_SEARCH = "lossforge.search_id"
TAG_KIND = "lossforge.kind"
TAG_KEY = "lossforge.candidate_key"
MAX_TAG = 5000  # MLflow allows 8000 characters per tag value; full formulas are in the loss JSON artifact


def resolve_tracking_uri(uri: str, root: str | Path = ".") -> str:
    """Make a relative `sqlite:///` or file path URI absolute against `root` (the project directory)."""
    root = Path(root).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = root / uri[len("sqlite:///") :]
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _is_database_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES


def create_experiment(client: MlflowClient, tracking_uri: str, name: str,
                      artifact_root: str | Path | None = None) -> str:
    """Create the experiment `name` with its artifacts in `<artifact_root>/<name>`; returns its id.

    MLflow stores artifact locations as absolute paths, so a moved or copied project folder would read (or
    write) the artifacts of the old folder. With a database store and a relative `artifact_root` (the default
    `mlruns/artifacts`), the location is rewritten to the relative path right after creation: MLflow resolves
    a relative artifact URI against the working directory, which is the project folder for `lossforge` and
    for `mlflow ui` started there. An absolute `artifact_root` stays absolute; an MLflow server (http://)
    chooses its own location (`--artifacts-destination`)."""
    location, relative = None, None
    if artifact_root is not None and not tracking_uri.startswith(("http://", "https://")):
        folder = Path(artifact_root) / name
        folder.resolve().mkdir(parents=True, exist_ok=True)
        location = folder.resolve().as_uri()
        if not Path(artifact_root).is_absolute() and _is_database_uri(tracking_uri):
            relative = Path(os.path.normpath(folder)).as_posix()
    try:
        experiment_id = with_retries(lambda: client.create_experiment(name, artifact_location=location),
                                     "create experiment")
    except MlflowException:  # created concurrently (by the creator, who also made its location relative)
        return client.get_experiment_by_name(name).experiment_id
    if relative is not None:
        with_retries(lambda: _set_artifact_location(tracking_uri, experiment_id, relative), "set artifact location")
    return experiment_id


def _set_artifact_location(tracking_uri: str, experiment_id: str, location: str) -> None:
    """Store `location` as the experiment's artifact location (MLflow's API has no call for it; the column
    is part of MLflow's versioned database schema). Runs created afterwards inherit it."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(tracking_uri)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE experiments SET artifact_location = :loc WHERE experiment_id = :id"),
                         {"loc": location, "id": int(experiment_id)})
    finally:
        engine.dispose()


def with_retries(fn: Callable[[], T], what: str, attempts: int = 8, delay: float = 0.25) -> T:
    """Call `fn`, retrying on transient tracking-store errors (locked SQLite, connection resets)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # MlflowException, sqlalchemy OperationalError, requests errors
            text = str(exc).lower()
            transient = any(
                s in text for s in ("locked", "busy", "connection", "timed out", "temporarily", "503", "502")
            )
            if not transient or attempt == attempts:
                raise
            log.warning("mlflow %s failed (%s), retry %d/%d", what, exc, attempt, attempts)
            time.sleep(delay * attempt)
    raise AssertionError("unreachable")


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG else text[: MAX_TAG - 3] + "..."


def branch_formulas(graph: Any) -> dict[str, dict[str, Any]]:
    """{branch: {"formula", "weight"}} of a multi-branch loss graph (a LossGraph or its loss JSON dict);
    {} for a single-branch graph, no graph, or one that does not load."""
    if graph is None:
        return {}
    from components.errors import LossforgeError
    from components.search.graph import LossGraph
    from components.search.graph_json import graph_from_dict

    try:
        loss = graph if isinstance(graph, LossGraph) else graph_from_dict(graph)
    except (LossforgeError, TypeError, ValueError, KeyError):
        return {}
    if len(loss.branches) < 2:
        return {}
    return {name: {"formula": b.tree.formula(), "weight": b.weight} for name, b in loss.branches.items()}


class SearchTracker:
    """Logs one search to MLflow (see module docstring). Create it, call `start()`, then `sync()` as
    records arrive, `log_search_state()` after each population update and `finish()` at the end."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        search_id: str,
        artifact_root: str | Path | None = None,
        params: Mapping[str, Any] | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.search_id = search_id
        self.artifact_root = artifact_root
        self.params = dict(params or {})
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.logged: dict[str, str] = {}  # candidate_key -> run_id (finished runs only)
        self._step = 0

    # ------------------------------------------------------------------ set-up
    def start(self) -> str:
        """Find or create the experiment and the parent run (resuming one left by an earlier attempt)."""
        exp = with_retries(lambda: self.client.get_experiment_by_name(self.experiment_name), "get experiment")
        if exp is None:
            self.experiment_id = create_experiment(self.client, self.tracking_uri, self.experiment_name,
                                                   self.artifact_root)
        else:
            self.experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
        runs = self._search(f"tags.`{TAG_SEARCH}` = '{self.search_id}' and tags.`{TAG_KIND}` = 'search'")
        if runs:
            self.parent_run_id = runs[0].info.run_id
            with_retries(lambda: self.client.update_run(self.parent_run_id, status="RUNNING"), "update run")
        else:
            run = with_retries(
                lambda: self.client.create_run(
                    self.experiment_id,
                    run_name=f"search {self.search_id}",
                    tags={TAG_SEARCH: self.search_id, TAG_KIND: "search"},
                ),
                "create parent run",
            )
            self.parent_run_id = run.info.run_id
            params = [Param(k, _clip(v)) for k, v in sorted(self.params.items())]
            for i in range(0, len(params), 100):
                chunk = params[i : i + 100]
                with_retries(lambda: self.client.log_batch(self.parent_run_id, params=chunk), "log params")
        self._load_logged()
        return self.parent_run_id

    def _search(self, filter_string: str) -> list:
        out, token = [], None
        while True:
            page = with_retries(
                lambda: self.client.search_runs(
                    [self.experiment_id], filter_string=filter_string, max_results=1000, page_token=token
                ),
                "search runs",
            )
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _load_logged(self) -> None:
        """Index finished candidate runs; runs left unfinished by a killed process are deleted (re-logged)."""
        self.logged = {}
        runs = self._search(f"tags.`{TAG_SEARCH}` = '{self.search_id}' and tags.`{TAG_KIND}` = 'candidate'")
        for run in runs:
            key = run.data.tags.get(TAG_KEY)
            if run.info.status == "FINISHED" and key and key not in self.logged:
                self.logged[key] = run.info.run_id
            else:
                with_retries(lambda: self.client.delete_run(run.info.run_id), "delete partial run")

    # ------------------------------------------------------------------ candidates
    def sync(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Log every record whose candidate is not logged yet; returns how many were logged now."""
        count = 0
        for record in records:
            if record["key"] not in self.logged:
                self.log_candidate(record)
                count += 1
        return count

    def log_candidate(self, record: Mapping[str, Any]) -> str:
        """One nested run: formulas, genealogy, screening score, proxy metrics, status, wall time, artifacts.

        Multi-branch losses also get tags `formula.<branch>` and `weight.<branch>` (from `branch_formulas`,
        or from the record's loss JSON `graph`)."""
        key = record["key"]
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            TAG_SEARCH: self.search_id,
            TAG_KIND: "candidate",
            TAG_KEY: key,
            "status": record["status"],
            "loss_hash": record.get("hash", ""),
            "canonical": _clip(record.get("canonical", "")),
            "formula": _clip(record.get("formula", "")),
            "parent_candidate": str(record.get("parent_id")),
            "mutation": str(record.get("mutation", "")),
        }
        if record.get("message"):
            tags["message"] = _clip(record["message"])
        per_branch = record.get("branch_formulas")
        if per_branch is None:
            per_branch = branch_formulas(record.get("graph"))
        for branch, entry in per_branch.items():  # multi-branch losses: one formula (and weight) per branch
            tags[f"formula.{branch}"] = _clip(entry["formula"])
            tags[f"weight.{branch}"] = f"{float(entry['weight']):g}"
        run = with_retries(
            lambda: self.client.create_run(
                self.experiment_id, run_name=f"candidate {record['id']}", tags=tags
            ),
            "create candidate run",
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics: dict[str, float] = {}
        if record.get("screening_g") is not None:
            metrics["screening_g"] = float(record["screening_g"])
        for name, value in (record.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"proxy_{name}"] = float(value)
        if record.get("target") is not None:
            metrics["target"] = float(record["target"])
        if record.get("seconds") is not None:
            metrics["wall_time_s"] = float(record["seconds"])
        if record.get("iterations") is not None:
            metrics["iterations"] = float(record["iterations"])
        params = [
            Param("candidate_id", str(record["id"])),
            Param("parent_candidate", str(record.get("parent_id"))),
            Param("mutation", str(record.get("mutation", ""))),
            Param("status", record["status"]),
        ]
        with_retries(
            lambda: self.client.log_batch(
                run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=params
            ),
            "log candidate",
        )
        for name in ("loss_json", "module_py"):
            path = record.get(name)
            if path and Path(path).exists():
                with_retries(lambda: self.client.log_artifact(run_id, str(path), "loss"), "log artifact")
        with_retries(lambda: self.client.set_terminated(run_id, "FINISHED"), "finish candidate run")
        self.logged[key] = run_id
        return run_id

    # ------------------------------------------------------------------ proxy baselines
    def sync_baselines(self, records: Iterable[Mapping[str, Any]]) -> int:
        """One nested run per proxy-baseline training (tags `baseline=true`, name, seed; proxy metrics),
        logged once: finished runs are found by their key, runs left half-written by a kill are replaced."""
        logged: set[str] = set()
        runs = self._search(f"tags.`{TAG_SEARCH}` = '{self.search_id}' and tags.`{TAG_KIND}` = 'baseline'")
        for run in runs:
            key = run.data.tags.get(TAG_KEY)
            if run.info.status == "FINISHED" and key and key not in logged:
                logged.add(key)
            else:
                with_retries(lambda: self.client.delete_run(run.info.run_id), "delete partial run")
        count = 0
        for record in records:
            if record["key"] in logged:
                continue
            tags = {
                "mlflow.parentRunId": self.parent_run_id, TAG_SEARCH: self.search_id, TAG_KIND: "baseline",
                TAG_KEY: record["key"], "baseline": "true", "baseline_name": str(record["name"]),
                "seed": str(record["seed"]), "status": str(record["status"]),
            }
            if record.get("message"):
                tags["message"] = _clip(record["message"])
            run = with_retries(
                lambda: self.client.create_run(
                    self.experiment_id, run_name=f"baseline {record['name']} seed {record['seed']}", tags=tags
                ),
                "create baseline run",
            )
            run_id = run.info.run_id
            now = int(time.time() * 1000)
            metrics = {f"proxy_{k}": float(v) for k, v in (record.get("metrics") or {}).items()
                       if isinstance(v, (int, float))}
            for name, key in (("target", "target"), ("wall_time_s", "seconds"), ("iterations", "iterations")):
                if isinstance(record.get(key), (int, float)):
                    metrics[name] = float(record[key])
            params = [Param("baseline", str(record["name"])), Param("seed", str(record["seed"])),
                      Param("loss_spec", _clip(json.dumps(record.get("spec"), sort_keys=True)))]
            with_retries(
                lambda: self.client.log_batch(
                    run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=params
                ),
                "log baseline",
            )
            with_retries(lambda: self.client.set_terminated(run_id, "FINISHED"), "finish baseline run")
            logged.add(record["key"])
            count += 1
        return count

    # ------------------------------------------------------------------ search-level
    def log_search_state(self, counters: Mapping[str, Any], evaluations: int, top5_mean: float | None) -> None:
        """Funnel counters and the top-5 mean on the parent run, stepped by the number of evaluations."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"funnel_{k}", float(v), now, evaluations)
            for k, v in counters.items()
            if isinstance(v, (int, float))
        ]
        if top5_mean is not None:
            metrics.append(Metric("top5_mean", float(top5_mean), now, evaluations))
        if metrics:
            with_retries(lambda: self.client.log_batch(self.parent_run_id, metrics=metrics), "log counters")

    def log_final(self, summary: Mapping[str, Any], files: Iterable[str | Path], artifact_path: str = "report") -> None:
        """Best loss, comparison table, progress plot etc. as artifacts; `summary` as tags/metrics."""
        tags = [RunTag(f"best.{k}", _clip(v)) for k, v in summary.items() if isinstance(v, str)]
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, 0) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        with_retries(lambda: self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags), "log summary")
        for path in files:
            if Path(path).exists():
                with_retries(
                    lambda: self.client.log_artifact(self.parent_run_id, str(path), artifact_path), "log artifact"
                )

    def log_dict(self, obj: Any, name: str) -> None:
        """A JSON artifact on the parent run."""
        with_retries(lambda: self.client.log_text(self.parent_run_id, json.dumps(obj, indent=2), name), "log json")

    def finish(self, status: str = "FINISHED") -> None:
        """Close the parent run."""
        if self.parent_run_id:
            with_retries(lambda: self.client.set_terminated(self.parent_run_id, status), "finish parent run")


def log_comparison(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    files: Iterable[str | Path],
    artifact_root: str | Path | None = None,
    artifact_path: str = "compare",
) -> str:
    """One finished run for a `lossforge compare` table (params, metrics, the table files); returns its id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = with_retries(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        experiment_id = create_experiment(client, tracking_uri, experiment, artifact_root)
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    run = with_retries(lambda: client.create_run(experiment_id, run_name=run_name, tags={TAG_KIND: "comparison"}),
                       "create comparison run")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    with_retries(
        lambda: client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, _clip(v)) for k, v in sorted(params.items())],
        ),
        "log comparison",
    )
    for path in files:
        if Path(path).exists():
            with_retries(lambda: client.log_artifact(run_id, str(path), artifact_path), "log artifact")
    with_retries(lambda: client.set_terminated(run_id, "FINISHED"), "finish comparison run")
    return run_id


def find_search_run(tracking_uri: str, experiment: str, search_id: str) -> str | None:
    """The parent run id of a search logged earlier (used by `lossforge retrain/report`)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{TAG_SEARCH}` = '{search_id}' and tags.`{TAG_KIND}` = 'search'"
    )
    return runs[0].info.run_id if runs else None
