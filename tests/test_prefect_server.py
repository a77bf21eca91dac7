"""`lossforge serve` against a real `prefect server` on localhost: the deployment shows a typed parameter
form, and a flow run created through the API (as the UI's Run button does) completes."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from test_flows_support import PYTHON, env, prefect_server, stop, write_tiny_params

pytestmark = pytest.mark.slow


async def _drive(url: str, timeout: float) -> tuple[dict, str, dict]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        async with get_client() as client:
            deadline = time.time() + timeout
            deployment = None
            while deployment is None:
                try:
                    deployment = await client.read_deployment_by_name("lossforge-search/tiny")
                except Exception:
                    if time.time() > deadline:
                        raise
                    await asyncio.sleep(1)
            schema = deployment.parameter_openapi_schema
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"metric": "mAcc", "budget": 2, "retrain": False}
            )
            while True:
                run = await client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    break
                if time.time() > deadline:
                    raise TimeoutError(f"flow run still {run.state}")
                await asyncio.sleep(1)
            return schema, run.state.type.value, run.parameters


def test_deployment_run_created_through_the_api(tmp_path):
    server = prefect_server()
    write_tiny_params(tmp_path)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([PYTHON, "-m", "flows.cli", "serve", "--name", "tiny"], cwd=tmp_path,
                             env=env(PREFECT_API_URL=server.url), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        schema, state, parameters = asyncio.run(_drive(server.url, 500))
    finally:
        stop(serve)
    props = schema["properties"]
    assert {"metric", "method", "budget", "workers", "runner", "dataset", "profile", "params_file"} <= set(props)
    metric_schema = props["metric"].get("anyOf", [props["metric"]])
    assert any(set(s.get("enum", [])) >= {"mIoU", "BF1", "BIoU"} for s in metric_schema)
    assert any(s.get("type") == "integer" for s in props["budget"].get("anyOf", [props["budget"]]))
    assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
    assert parameters["metric"] == "mAcc"
    report = tmp_path / "reports" / "segmentation-mAcc" / "report.md"
    assert report.exists() and "target metric mAcc" in report.read_text()
