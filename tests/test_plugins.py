"""Tasks and search methods are plug-ins: found by name from a registry, and a new one needs no flow change.

The end-to-end test writes a search method in a user module (random search over screened loss graphs), names
it in params.yaml (`plugins:` + `search.method`) and runs the real `lossforge search` CLI with it.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from components.errors import LossforgeError
from components.params import ParamsError, parse_params
from components.search.method import SearchMethod, get_method_class, method_names
from components.tasks.base import Task, get_task, task_names

PLUGIN = textwrap.dedent('''
    """A user's search method: random loss graphs that pass the screening, no evolution."""
    import random
    from pathlib import Path

    from components.atomic_io import read_json, write_json_atomic
    from components.search.generation import TreeGenerator
    from components.search.graph_json import graph_from_dict, graph_to_dict, save_graph
    from components.search.export import write_module
    from components.search.method import SearchMethod, register_method
    from components.search.screening import screen


    @register_method
    class RandomGraphs(SearchMethod):
        name = "random_graphs"
        loss_type = "graph"

        def __init__(self, problem, budget, seed, screening, history=None, issued=0):
            self.problem, self.budget, self.seed, self.screening = problem, budget, seed, screening
            self._history = history or []
            self.issued = issued
            self.rng = random.Random(seed + issued)

        @classmethod
        def create(cls, params, problem, state_dir):
            path = Path(state_dir) / "checkpoint.json"
            if path.exists():
                data = read_json(path)
                return cls(problem, data["budget"], data["seed"], params.config("screening"), data["history"],
                           data["issued"])
            return cls(problem, params.search.budget, params.search.seed, params.config("screening"))

        def ask(self, n):
            out = []
            gen = TreeGenerator(rng=self.rng)
            while len(out) < n and self.issued < self.budget:
                graph = gen.random_graph(self.problem.task)
                if not screen(graph, self.problem, self.screening).accepted:
                    continue
                out.append({"id": self.issued, "hash": graph.hash(),
                            "loss": {"type": "graph", "graph": graph_to_dict(graph)}})
                self.issued += 1
            self.pending = {c["id"]: c for c in out} | getattr(self, "pending", {})
            return out

        def tell(self, candidate_id, result):
            cand = self.pending.pop(candidate_id)
            record = {"id": candidate_id, "hash": cand["hash"], "graph": cand["loss"]["graph"],
                      "status": "evaluated" if result.status == "ok" else result.status,
                      "target": result.target, "metrics": dict(result.metrics),
                      "formula": graph_from_dict(cand["loss"]["graph"]).formula()}
            self._history.append(record)
            return record

        @property
        def done(self):
            return len(self._history) >= self.budget

        @property
        def counters(self):
            return {"evaluated": len(self._history)}

        @property
        def history(self):
            return self._history

        def best(self):
            ok = [r for r in self._history if r["target"] is not None]
            return max(ok, key=lambda r: r["target"]) if ok else None

        def progress(self):
            out, best = [], None
            for i, r in enumerate(self._history, 1):
                if r["target"] is not None:
                    best = r["target"] if best is None else max(best, r["target"])
                out.append({"evaluations": i, "top5_mean": best, "best_so_far": best})
            return out

        def save(self, path):
            return write_json_atomic(path, {"budget": self.budget, "seed": self.seed, "history": self._history,
                                            "issued": len(self._history)})

        def loss_spec(self, record):
            return {"type": "graph", "graph": record["graph"]}

        def write_loss_files(self, record, folder, stem):
            graph = graph_from_dict(record["graph"])
            folder.mkdir(parents=True, exist_ok=True)
            return save_graph(graph, folder / f"{stem}.json"), write_module(graph, folder / f"{stem}.py")
''')


def test_builtin_tasks_and_methods_are_found_by_name():
    assert "segmentation" in task_names() and {"evolution", "ppo"} <= set(method_names())
    task = get_task("segmentation")
    assert isinstance(task, Task) and task.name == "segmentation" and "mIoU" in task.metrics
    assert task.training_target("BF1") == "boundary" and task.training_target("mIoU") == "label"
    assert task.canonical_metric("miou") == "mIoU"
    assert issubclass(get_method_class("ppo"), SearchMethod)
    with pytest.raises(LossforgeError, match="search.task: 'nope' is not available"):
        get_task("nope")
    with pytest.raises(LossforgeError, match="search.method: 'nope' is not available"):
        get_method_class("nope")


def test_params_check_task_metric_and_method_against_the_registries():
    with pytest.raises(ParamsError, match=r"search.task: unknown task"):
        parse_params({"search": {"task": "nope"}})
    with pytest.raises(ParamsError, match=r"search.metric: unknown metric, expected one of gAcc"):
        parse_params({"search": {"metric": "mAP"}})
    with pytest.raises(ParamsError, match=r"search.method: unknown search method"):
        parse_params({"search": {"method": "nope"}})
    with pytest.raises(ParamsError, match=r"plugins: cannot import 'no_such_plugin_module'"):
        parse_params({"plugins": ["no_such_plugin_module"]})


def test_proxy_and_retrain_sections_follow_the_task(tmp_path, monkeypatch):
    """`tasks.<name>` replaces proxy/retrain (checked against that task's config classes) when the task is picked."""
    raw = {"proxy": {"iterations": 7}, "tasks": {"segmentation": {"proxy": {"iterations": 5, "batch_size": 2}}}}
    params = parse_params(raw)
    assert params.config("proxy").iterations == 5 and params.config("proxy").batch_size == 2
    with pytest.raises(ParamsError, match=r"proxy.nonsense: unknown field"):
        parse_params({"proxy": {"nonsense": 1}})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_search_method_from_a_user_module_runs_through_the_real_flow(tmp_path):
    from test_flows_support import ROOT, cli, write_tiny_params

    (tmp_path / "random_graphs_plugin.py").write_text(PLUGIN)
    params = write_tiny_params(tmp_path, search={"method": "random_graphs", "budget": 3, "workers": 1})
    text = params.read_text()
    params.write_text("plugins: [random_graphs_plugin]\n" + text)
    done = cli(["search", "--no-retrain"], tmp_path, timeout=540, PYTHONPATH=f"{tmp_path}:{ROOT}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("losses/*/search.json")).read_text())
    assert len(summary["candidates"]) == 3
    assert summary["best"]["formula"] and summary["best"]["target"] is not None
    assert (tmp_path / "losses" / "segmentation-mIoU" / "best.json").exists()
    results = list(tmp_path.glob(".lossforge/runs/*/results/*.json"))
    assert len(results) == 3  # every candidate trained by the shared proxy-training task
