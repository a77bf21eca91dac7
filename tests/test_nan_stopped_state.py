"""A proxy training in which a loss stops on a non-finite value ends in a Completed state named "NaN-stopped"
(read back from a real Prefect server), and the flow still gets the records as the task's result."""

from __future__ import annotations

import asyncio
import os

import pytest
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from components.params import load_params
from components.search.graph import LossGraph, parse_prefix
from components.search.graph_json import graph_to_dict
from flows.tasks import prepare_data, proxy_training, split_dataset
from test_flows_support import prefect_server, write_tiny_params

pytestmark = pytest.mark.slow


def _loss(prefix: str) -> dict:
    return {"type": "graph", "graph": graph_to_dict(LossGraph.single("segmentation", "seg", parse_prefix(prefix).root))}


def _run(params, state_dir: str):
    proxy_cfg = params.config("proxy")

    @flow(name="nan-state-test", task_runner=ThreadPoolTaskRunner(max_workers=2))
    def two_waves():
        path = prepare_data(params.data.model_dump())
        manifests = split_dataset(path, params.split.model_dump())
        data = {"path": path, "train": manifests["train"], "eval": manifests["eval"], "task": "segmentation"}
        blows_up = proxy_training.submit(
            [{"id": 7, "hash": "h7", "loss": _loss("exp(exp(exp(inv(y_hat))))")},  # inf at the first step
             {"id": 8, "hash": "h8", "loss": _loss("neg(mul(y,log(y_hat)))")}], data, proxy_cfg, "mIoU", state_dir)
        fine = proxy_training.submit([{"id": 9, "hash": "h9", "loss": _loss("neg(mul(y,log(y_hat)))")}], data,
                                     proxy_cfg, "mIoU", state_dir)
        return {"nan": (blows_up.task_run_id, blows_up.result()), "ok": (fine.task_run_id, fine.result())}

    return two_waves()


async def _task_states(url: str, ids) -> list:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [(await client.read_task_run(i)).state for i in ids]


def test_nan_stopped_training_has_its_own_state_name(tmp_path, monkeypatch):
    """Threads runner (the state is the task's return value, the same with any runner; process workers were
    checked by hand: same state name)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = prefect_server()
    monkeypatch.chdir(tmp_path)
    write_tiny_params(tmp_path)
    params = load_params("params.yaml")
    with temporary_settings({PREFECT_API_URL: server.url}):
        out = _run(params, str(tmp_path / "state"))
        states = asyncio.run(_task_states(server.url, [out["nan"][0], out["ok"][0]]))
    nan_records, ok_records = out["nan"][1], out["ok"][1]
    assert [(r["id"], r["status"]) for r in nan_records] == [(7, "nan"), (8, "ok")]  # the result is unchanged
    assert [(r["id"], r["status"]) for r in ok_records] == [(9, "ok")]
    nan_state, ok_state = states
    assert nan_state.name == "NaN-stopped"
    assert nan_state.is_completed() and "[7]" in nan_state.message
    assert ok_state.name == "Completed"
    assert os.path.exists(tmp_path / "state" / "results" / "7-h7.json")
