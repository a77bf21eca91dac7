"""Bad parameters give a one-line error and a non-zero exit before anything is written."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from test_flows_support import ROOT, cli, write_tiny_params


def _written(folder) -> set[str]:
    return {p.name for p in folder.iterdir()} - {"params.yaml"}


@pytest.mark.parametrize(
    "args, edit, message",
    [
        (["search", "--metric", "mIoUU"], None, "error: --metric: unknown value 'mIoUU'"),
        (["search", "--budget", "0"], None, "error: --budget: must be > 0 (got 0)"),
        (["search", "--dataset", "/nonexistent/voc"], None, "error: --dataset: dataset not found: /nonexistent/voc"),
        (["search"], {"search": {"budget": -3}}, "error: params.yaml: search.budget: must be > 0 (got -3)"),
        (["search"], {"proxy": {"lrr": 1}}, "error: params.yaml: proxy.lrr: unknown field"),
        (["search"], {"data": {"generate": False, "path": "nowhere"}}, "error: data.path: dataset not found: nowhere"),
        (["search", "--profile", "gpu"], None, "error: params.yaml: profile: unknown profile 'gpu'"),
        (["retrain"], None, "error: data/splits/train.txt: split manifest not found"),
        (["stage", "train"], None, "error: stage: unknown stage 'train'"),
        (["search"], {"proxy": {"seeds": []}}, "error: params.yaml: proxy.seeds: expected a non-empty list"),
        (["search"], {"proxy": {"seeds": [0, 0]}}, "error: params.yaml: proxy.seeds: seeds must be distinct"),
        (["search"], {"retrain": {"baselines": ["ce", "cee"]}},
         "error: params.yaml: retrain.baselines: unknown loss 'cee'"),
    ],
)
def test_bad_parameters_fail_before_any_output(tmp_path, monkeypatch, args, edit, message):
    path = write_tiny_params(tmp_path)
    if edit:
        raw = yaml.safe_load(path.read_text())
        for section, values in edit.items():
            raw.setdefault(section, {}).update(values)
            raw["profiles"]["tiny"].get(section, {}).update(values)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert _written(tmp_path) == set()


def test_malformed_yaml_in_a_real_process(tmp_path):
    """The installed entry point: exit status 2, one line on stderr, nothing written."""
    (tmp_path / "params.yaml").write_text("search: {budget: 3\n")
    done = cli(["search"], tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: params.yaml: invalid YAML at line")
    assert len(done.stderr.strip().splitlines()) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"params.yaml"}


def test_help_lists_the_commands():
    done = CliRunner().invoke(app, ["--help"])
    assert done.exit_code == 0
    for name in ("demo", "search", "retrain", "report", "compare", "serve", "data", "loss"):
        assert name in done.stdout
