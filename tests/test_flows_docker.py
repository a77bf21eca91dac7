"""docker/: without a container engine, check what can be checked: the compose file parses and wires the
services together, every file a Dockerfile copies exists, and the commands they run are real CLI commands."""

from __future__ import annotations

import re
import shlex

import yaml
from typer.testing import CliRunner

from flows.cli import app
from test_flows_support import ROOT

DOCKER = ROOT / "docker"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE", "USER"}


def _instructions(path):
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest.strip()))
    return out


def test_dockerfiles_parse_and_copy_existing_files():
    for name in ("Dockerfile", "Dockerfile.gpu", "mlflow.Dockerfile"):
        steps = _instructions(DOCKER / name)
        assert {w for w, _ in steps} <= INSTRUCTIONS, name
        assert steps[0][0] in ("ARG", "FROM") and any(w == "FROM" for w, _ in steps)
        for word, rest in steps:
            if word == "COPY":
                *sources, _dest = shlex.split(rest)
                for src in sources:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}"


def test_compose_wires_the_services():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "worker-gpu"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    assert "--artifacts-destination" in services["mlflow"]["command"]
    for name in ("worker", "worker-gpu"):
        svc = services[name]
        assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        assert svc["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert svc["environment"]["LOSSFORGE_TRACKING_URI"] == "http://mlflow:5000"
        assert set(svc["depends_on"]) >= {"prefect-server", "mlflow"}
    assert (DOCKER / services["mlflow"]["build"]["dockerfile"]).exists()
    assert set(compose["volumes"]) >= {"postgres-data", "mlflow-artifacts", "work"}


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with none of the variables set (what `docker compose up` does by default)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_publishes_on_localhost_only_by_default():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    published = {name: [_interpolate(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert published["prefect-server"] == ["127.0.0.1:4200:4200"]
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), (name, port)  # host-ip:host-port:container-port
    # one variable opens them all (README: how to open the stack up)
    for svc in ("prefect-server", "mlflow"):
        assert all(p.startswith("${LOSSFORGE_BIND:-127.0.0.1}:") for p in compose["services"][svc]["ports"])


def test_compose_services_have_healthchecks_and_restart_policies():
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    for name in ("postgres", "prefect-server", "mlflow", "worker", "worker-gpu", "dask-scheduler", "dask-worker",
                 "ray-head"):
        svc = services[name]
        assert svc["restart"] == "unless-stopped", name
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert services["ray-worker"]["restart"] == "unless-stopped"
    # a health URL is the port the service itself listens on
    for name, port in (("prefect-server", "4200"), ("mlflow", "5000"), ("dask-scheduler", "8787"),
                       ("dask-worker", "8789")):
        assert f"localhost:{port}/" in services[name]["healthcheck"]["test"][-1], name
        command = services[name]["command"]
        assert port in (command if isinstance(command, str) else " ".join(command)), name
    for name in ("worker", "worker-gpu"):
        assert services[name]["environment"]["PREFECT_RUNNER_SERVER_ENABLE"] == "true"  # serves /health on :8080
        assert "localhost:8080/health" in services[name]["healthcheck"]["test"][-1]
        assert services[name]["depends_on"]["prefect-server"] == {"condition": "service_healthy"}
        assert services[name]["depends_on"]["mlflow"] == {"condition": "service_healthy"}


def test_compose_cluster_services_wire_to_the_workers():
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    env = services["worker"]["environment"]
    scheduler_port = services["dask-scheduler"]["command"][services["dask-scheduler"]["command"].index("--port") + 1]
    assert env["LOSSFORGE_DASK_ADDRESS"] == f"tcp://dask-scheduler:{scheduler_port}"
    assert services["dask-worker"]["command"][1] == env["LOSSFORGE_DASK_ADDRESS"]
    head = services["ray-head"]["command"]
    assert env["LOSSFORGE_RAY_ADDRESS"] == f"ray-head:{head[head.index('--port') + 1]}"
    assert services["ray-worker"]["command"][services["ray-worker"]["command"].index("--address") + 1] == \
        env["LOSSFORGE_RAY_ADDRESS"]
    for name in ("dask-worker", "ray-head", "ray-worker"):  # trainings resolve the search's relative paths there
        assert services[name]["working_dir"] == "/work" and "work:/work" in services[name]["volumes"], name
    for name in ("dask-scheduler", "dask-worker", "ray-head", "ray-worker"):  # the image carries dask and ray
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile", name
    assert "--extra cluster" in (DOCKER / "Dockerfile").read_text()


def test_cluster_service_commands_are_real_commands():
    """The dask / ray services' commands exist in the locked environment and every option they pass is one
    that command's --help lists."""
    import subprocess
    import sys
    from pathlib import Path

    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    helps: dict[tuple[str, str], str] = {}
    for name in ("dask-scheduler", "dask-worker", "ray-head", "ray-worker"):
        svc = services[name]
        command = (str(Path(sys.executable).with_name(svc["entrypoint"][0])), svc["command"][0])
        if command not in helps:  # ray-head and ray-worker share `ray start`
            done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (name, done.stderr[-2000:])
            helps[command] = done.stdout
        for option in (a for a in svc["command"] if a.startswith("--")):
            assert re.search(rf"{re.escape(option)}\b", helps[command]), (name, option)


def test_container_commands_are_cli_commands():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    commands = [compose["services"][n]["command"] for n in ("worker", "worker-gpu")]
    commands += [["demo"], ["serve"]]  # the images' default CMDs
    for command in commands:
        done = CliRunner().invoke(app, [*command, "--help"])
        assert done.exit_code == 0, (command, done.output)
