"""Validate `params.yaml` (pydantic) and build the components' config dataclasses from it.

`params.yaml` holds the papers' values at the top level and named profiles (e.g. `demo`, a tiny CPU
run) under `profiles:`; a profile is a partial copy of the top-level sections that is deep-merged over
them. `tasks:` holds one block per task (e.g. `tasks.detection`), applied after the profile when
`search.task` names it (or when `--task` switches to it): deep-merged as well, except `proxy` and
`retrain`, which it replaces (each task checks them against its own config classes). `load_params(path, profile=None)` returns a validated `Params`; every error is one line that names
the file, the field and the bad value, e.g. `params.yaml: search.budget: must be > 0 (got -3)`.

Sections that configure a component (`evolution`, `screening`, `proxy`, `retrain`, `ppo`) are
checked against that component's frozen config dataclass: unknown keys and wrongly typed values are
errors, missing keys take the dataclass defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from components.errors import LossforgeError

RUNNERS = ("threads", "processes", "ray", "dask")

# section -> (module, dataclass, keys this section may carry besides the dataclass fields); module "task":
# the dataclass is the search task's own (`Task.proxy_config_class` / `Task.retrain_config_class`).
COMPONENT_SECTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    "evolution": ("components.search.evolution", "EvolutionConfig", frozenset()),
    "screening": ("components.search.screening", "ScreeningConfig", frozenset({"size"})),
    "proxy": ("task", "proxy_config_class", frozenset({"seeds"})),
    "retrain": ("task", "retrain_config_class", frozenset({"baselines", "seeds", "top_k"})),
    "ppo": ("components.surrogates.ppo", "PPOConfig", frozenset({"metrics", "pieces", "family"})),
    "cse": ("components.cse.config", "CSEConfig", frozenset()),
}


class ParamsError(LossforgeError):
    """A malformed or invalid params.yaml (message names the file and the field)."""


def _takes_bool_as_number(annotation: Any) -> bool:
    """True for a numeric annotation (int, float, int | None, int | str, ...) that does not name bool: pydantic's lax
    mode reads YAML's `true` there as 1 (`budget: true` ran a 1-evaluation search)."""
    args = typing.get_args(annotation) or (annotation,)
    return bool not in args and any(a in (int, float) for a in args)


def _reject_bools(values: Any, types: Mapping[str, Any], where: str) -> None:
    if isinstance(values, Mapping):
        for key, value in values.items():
            if isinstance(value, bool) and key in types and _takes_bool_as_number(types[key]):
                raise ParamsError(f"{where}.{key}: expected a number (got {value!r})")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and _takes_bool_as_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number")
        return value


class DataParams(_Section):
    """Where the dataset comes from: the embedded shapes set (generated) or your VOC/COCO/folder data."""

    path: str = "data/shapes"
    generate: bool = True
    num_train: int = Field(1464, gt=0)
    num_test: int = Field(300, gt=0)
    image_size: int = Field(128, ge=16)
    seed: int = 0


class SplitParams(_Section):
    """S_train / S_eval carved from the training images (the test images are only used for re-training)."""

    dir: str = "data/splits"
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    eval_count: int | None = Field(None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_of(self) -> "SplitParams":
        if self.eval_fraction is None and self.eval_count is None:
            raise ValueError("set one of eval_fraction or eval_count")
        if self.eval_fraction is not None and self.eval_count is not None:
            raise ValueError("set only one of eval_fraction or eval_count")
        return self


class ResourceParams(_Section):
    """What one proxy-training task (one wave of `search.losses_per_training` losses) asks of a ray or dask
    cluster; unset: the runner's default (ray: 1 CPU; dask: one worker thread). Ray maps them to the task's
    `num_cpus` / `num_gpus` (fractions share a GPU); dask to the worker resources `CPU` / `GPU`, which the
    workers must offer (`dask worker --resources "GPU=1,CPU=4"`). The threads and processes runners ignore them."""

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)


class SearchParams(_Section):
    """What to search for and how the search is run."""

    task: str = "segmentation"  # a registered task (components.tasks.base.get_task)
    metric: str = "mIoU"  # one of the task's metrics
    method: str = "evolution"  # a registered search method (components.search.method.get_method_class)
    budget: int = Field(500, gt=0)
    workers: int = Field(1, gt=0)
    losses_per_training: int = Field(1, gt=0)
    runner: Literal["threads", "processes", "ray", "dask"] = "threads"
    # ray / dask: the cluster to join (dask scheduler `tcp://host:8786`; ray `auto`, `host:6379` or
    # `ray://host:10001`); empty: a local cluster of `workers` slots for the duration of the search
    address: str = ""
    resources: ResourceParams = ResourceParams()
    seed: int = 0
    out_dir: str = "losses"
    state_dir: str = ".lossforge/runs"
    task_retries: int = Field(1, ge=0)
    confirm_top: int = Field(0, ge=0)  # re-evaluate the k best on the other proxy.seeds before choosing the best

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from components.tasks.base import task_names

        if value not in task_names():
            raise ValueError(f"unknown task, expected one of {', '.join(task_names())}")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from components.search.method import method_names

        if value not in method_names():
            raise ValueError(f"unknown search method, expected one of {', '.join(method_names())}")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str, info: ValidationInfo) -> str:
        from components.tasks.base import get_task

        task_name = info.data.get("task")
        if task_name is None:  # the task itself is invalid (reported on its own)
            return value
        metrics = get_task(task_name).metrics
        if value not in metrics:
            raise ValueError(f"unknown metric, expected one of {', '.join(metrics)} ({task_name})")
        return value

    @field_validator("address")
    @classmethod
    def _cluster_address(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if any(c.isspace() for c in value):
            raise ValueError("expected one cluster address such as tcp://host:8786 or ray://host:10001")
        if value and info.data.get("runner") in ("threads", "processes"):
            raise ValueError(f"only the ray and dask runners join a cluster (search.runner is "
                             f"{info.data['runner']!r}); remove it or set search.runner")
        return value


class ReportParams(_Section):
    """Where reports go and how many of the best losses they list."""

    dir: str = "reports"
    top_k: int = Field(5, gt=0)


class TrackingParams(_Section):
    """MLflow tracking store (a local SQLite file by default; an http:// URI for a server)."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: str = "mlruns/artifacts"
    enabled: bool = True


class Params(BaseModel):
    """The validated content of params.yaml with one profile applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "paper"
    data: DataParams = DataParams()
    split: SplitParams = SplitParams(eval_fraction=0.2)
    search: SearchParams = SearchParams()
    evolution: dict[str, Any] = {}
    screening: dict[str, Any] = {}
    proxy: dict[str, Any] = {}
    retrain: dict[str, Any] = {}
    ppo: dict[str, Any] = {}
    cse: dict[str, Any] = {}  # search method `cse` (components/cse/config.py)
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()
    profiles: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}  # per-task blocks, applied when search.task names them (see _apply_task)
    plugins: list[str] = []  # modules imported before validation: they register tasks / search methods
    source: str = Field("params.yaml", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data: Any) -> Any:
        """Import the plugins before `search.task` / `search.method` are checked (also when a worker process
        rebuilds Params from its JSON form)."""
        if isinstance(data, Mapping):
            import_plugins(data.get("plugins"), str(data.get("source", "params.yaml")))
        return data

    # ---------------------------------------------------------------- derived values
    def search_fingerprint(self) -> str:
        """Hash of everything that changes what a search computes (not where it logs / how many workers)."""
        keep = {
            "data": self.data.model_dump(),
            "split": self.split.model_dump(),
            "search": self.search.model_dump(exclude={"workers", "runner", "address", "resources", "out_dir",
                                                      "state_dir", "task_retries"}),
            "evolution": self.evolution,
            "screening": self.screening,
            # proxy.seeds only sets the seeds of the proxy baselines (stored per seed): not a new search
            "proxy": {k: v for k, v in self.proxy.items() if k != "seeds"},
            "ppo": self.ppo,
        }
        if self.search.method == "cse":  # only cse searches: the ids of the other searches stay as they were
            keep["cse"] = self.cse
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def search_name(self) -> str:
        """`<task>-<metric>`: the folder name under losses/ and reports/."""
        return f"{self.search.task}-{self.search.metric}"

    @property
    def search_id(self) -> str:
        """Identifies one search: same parameters, same id (resume); any change, a new search."""
        return f"{self.search_name}-{self.search.method}-{self.search_fingerprint()}"

    def config(self, section: str, **overrides: Any) -> Any:
        """Build the component config dataclass for `section` (e.g. "proxy" -> ProxyConfig)."""
        module, cls_name, extra = COMPONENT_SECTIONS[section]
        if module == "task":
            from components.tasks.base import get_task

            cls = getattr(get_task(self.search.task), cls_name)
        else:
            cls = getattr(importlib.import_module(module), cls_name)
        values = {k: v for k, v in getattr(self, section).items() if k not in extra}
        values.update(overrides)
        return _build_dataclass(cls, values, f"{self.source}: {section}")

    def section_extra(self, section: str, key: str, default: Any = None) -> Any:
        """A non-dataclass key of a component section (e.g. screening.size, retrain.baselines)."""
        return getattr(self, section).get(key, default)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Params":
        """Return a copy with dotted-key overrides applied (e.g. {"search.budget": 4}), re-validated."""
        raw = self.model_dump(exclude={"profiles", "tasks"})
        new_task = overrides.get("search.task")
        if new_task is not None and new_task != self.search.task:
            # the proxy/retrain sections were written for the old task: start from the new task's defaults
            raw["proxy"], raw["retrain"] = {}, {}
            raw = _apply_task(raw, self.tasks, new_task, self.source)
            if overrides.get("search.metric") is None and "metric" not in (self.tasks.get(new_task) or {}).get("search", {}):
                raw["search"]["metric"] = _default_metric(new_task, raw["search"]["metric"])
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return _validate(raw, self.source, self.profiles, self.tasks)


def _build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Validate `values` against the dataclass `cls` and build it; errors name `where.<field>`."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ParamsError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
    _reject_bools(values, typing.get_type_hints(cls), where)
    try:
        checked = TypeAdapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        raise ParamsError(_first_error(exc, where)) from None
    except (TypeError, ValueError, LossforgeError) as exc:  # __post_init__ checks of the component
        raise ParamsError(f"{where}: {exc}") from None
    return checked


def _first_error(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if loc:
        field = f"{where}.{loc}" if ": " in where else f"{where}: {loc}"
    else:
        field = where
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "greater_than":
        msg = f"must be > {ctx['gt']}"
    elif kind == "greater_than_equal":
        msg = f"must be >= {ctx['ge']}"
    elif kind == "less_than":
        msg = f"must be < {ctx['lt']}"
    elif kind == "less_than_equal":
        msg = f"must be <= {ctx['le']}"
    elif kind == "extra_forbidden":
        return f"{field}: unknown field"
    elif kind == "missing":
        return f"{field}: required field is missing"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[0].lower() + msg[1:] if msg else msg
    if "input" in err and kind != "model_type":
        return f"{field}: {msg} (got {err['input']!r})"
    return f"{field}: {msg}"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _default_metric(task_name: str, current: str) -> str:
    """`current` if the task has it, else the task's default metric (unknown tasks are reported later)."""
    from components.tasks.base import get_task

    try:
        task = get_task(task_name)
    except LossforgeError:
        return current
    return current if current in task.metrics else task.default_metric


def _apply_task(base: dict[str, Any], tasks: Mapping[str, Any], task_name: str, source: str) -> dict[str, Any]:
    """Apply the `tasks.<task_name>` block: a partial copy of the sections, deep-merged like a profile, except
    `proxy` and `retrain`, which it replaces (they are checked against the task's own config classes, so the
    keys of another task's sections make no sense there)."""
    block = tasks.get(task_name) or {}
    if not isinstance(block, Mapping):
        raise ParamsError(f"{source}: tasks.{task_name}: expected a mapping (got {block!r})")
    out = dict(base)
    for key, value in block.items():
        if key in ("proxy", "retrain"):
            out[key] = copy.deepcopy(value)
        else:
            out = _merge(out, {key: value})
    return out


def _validate(raw: Mapping[str, Any], source: str, profiles: Mapping[str, Any],
              tasks: Mapping[str, Any] | None = None) -> Params:
    try:
        params = Params.model_validate({**raw, "profiles": dict(profiles), "tasks": dict(tasks or {}), "source": source})
    except ValidationError as exc:
        raise ParamsError(_first_error(exc, source)) from None
    for section in COMPONENT_SECTIONS:  # check component sections now if the component exists
        module = COMPONENT_SECTIONS[section][0]
        if module != "task":
            try:
                importlib.import_module(module)
            except ImportError:
                continue
        params.config(section)
    if params.search.method == "cse" and params.search.task != "detection":
        raise ParamsError(f"{source}: search.method: 'cse' searches detection losses (search.task is "
                          f"{params.search.task!r})")
    return params


def import_plugins(modules: Any, source: str = "params.yaml") -> None:
    """Import the `plugins:` modules (importable names, e.g. `my_project.lossforge_plugin`); importing one runs
    its `@register_task` / `@register_method` decorators, so `search.task` / `search.method` can name them."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ParamsError(f"{source}: plugins: expected a list of module names (got {modules!r})")
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a user module is reported in one line
            raise ParamsError(f"{source}: plugins: cannot import {name!r} ({type(exc).__name__}: {exc})") from None


def parse_params(raw: Any, source: str = "params.yaml", profile: str | None = None) -> Params:
    """Validate an already-parsed params mapping and apply `profile` (default: its `profile:` key)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level (got {type(raw).__name__})")
    import_plugins(raw.get("plugins"), source)
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, Mapping):
        raise ParamsError(f"{source}: profiles: expected a mapping of profile names (got {profiles!r})")
    name = profile if profile is not None else raw.get("profile", "paper")
    if name is not None and not isinstance(name, str):
        raise ParamsError(f"{source}: profile: expected a profile name (got {name!r})")
    base = {k: v for k, v in raw.items() if k != "profiles"}
    if name not in (None, "paper"):
        if name not in profiles:
            known = ", ".join(["paper", *profiles]) or "paper"
            raise ParamsError(f"{source}: profile: unknown profile {name!r} (known: {known})")
        override = profiles[name] or {}
        if not isinstance(override, Mapping):
            raise ParamsError(f"{source}: profiles.{name}: expected a mapping (got {override!r})")
        tasks_over = override.get("tasks") or {}
        base = _merge(base, {k: v for k, v in override.items() if k != "tasks"})
        if tasks_over:  # a profile's task block replaces that task's proxy/retrain too (like `_apply_task`)
            if not isinstance(tasks_over, Mapping):
                raise ParamsError(f"{source}: profiles.{name}.tasks: expected a mapping (got {tasks_over!r})")
            merged = dict(base.get("tasks") or {})
            for task_name, block in tasks_over.items():
                merged[task_name] = _apply_task(dict(merged.get(task_name) or {}), tasks_over, task_name,
                                                f"{source}: profiles.{name}")
            base["tasks"] = merged
    base["profile"] = name or "paper"
    tasks = base.pop("tasks", None) or {}
    if not isinstance(tasks, Mapping):
        raise ParamsError(f"{source}: tasks: expected a mapping of task names (got {tasks!r})")
    search = base.get("search") or {}
    task_name = search.get("task", "segmentation") if isinstance(search, Mapping) else "segmentation"
    if task_name in tasks:
        base = _apply_task(base, tasks, task_name, source)
    return _validate(base, source, profiles, tasks)


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read and validate a params.yaml file; `profile` overrides its `profile:` key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a folder, expected a params.yaml file") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: invalid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    if raw is None:  # an empty file silently ran the paper profile on a GPU-sized budget
        raise ParamsError(f"{path}: file is empty (expected sections such as search:, data:, profile:)")
    return parse_params(raw, source=path.name if path.name == "params.yaml" else str(path), profile=profile)
