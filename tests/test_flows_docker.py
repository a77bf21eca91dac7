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


def test_container_commands_are_cli_commands():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    commands = [compose["services"][n]["command"] for n in ("worker", "worker-gpu")]
    commands += [["demo"], ["serve"]]  # the images' default CMDs
    for command in commands:
        done = CliRunner().invoke(app, [*command, "--help"])
        assert done.exit_code == 0, (command, done.output)
