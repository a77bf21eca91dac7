"""Smaller defects of issue 10: the exported module's `from_logits` with ignored pixels, and the DVC search
stage tracking every profile key that changes what it computes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from components.search.export import write_module
from components.search.graph_json import load_graph
from components.tasks.segmentation.probe import GraphSegLoss
from test_flows_support import ROOT, env

EXAMPLES = ROOT / "examples" / "losses"
DVC = str(Path(os.sys.executable).parent / "dvc")


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exported_from_logits_equals_the_project_loss_with_ignored_pixels(tmp_path):
    """The BF1 example pools y (MaxPool3(y)): an ignored pixel must be "no class" next to valid pixels, as in
    GraphSegLoss, not background (boundary targets: tests/test_loss_export.py)."""
    graph = load_graph(EXAMPLES / "autolosszero_seg_bf1.json")
    module = _import(write_module(graph, tmp_path / "bf1.py"), "lf_bf1_label")
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    target_map = torch.randint(1, 4, (2, 16, 16))
    target_map[:, 4:9, 4:12] = 255
    target_map[1, 12:, :] = 255
    expected = GraphSegLoss(graph)(logits, target_map)
    assert module.SearchedLoss().from_logits(logits, target_map).item() == pytest.approx(expected.item(), rel=1e-6)


def _tracked(stage: dict, key: str) -> bool:
    """Whether the stage's params cover `key` (the key itself or a section above it)."""
    return any(key == p or key.startswith(p + ".") for p in stage.get("params", []) if isinstance(p, str))


def test_every_stage_tracks_the_profile_keys_that_override_its_params():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    profiles = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]
    missing = []
    for name, stage in pipeline["stages"].items():
        for param in stage.get("params", []):
            if not isinstance(param, str) or param.startswith("profile"):
                continue
            for profile, override in profiles.items():
                node = override
                for part in param.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None and not _tracked(stage, f"profiles.{profile}.{param}"):
                    missing.append(f"{name}: profiles.{profile}.{param}")
    assert not missing


@pytest.mark.slow
def test_dvc_search_stage_is_stale_after_a_demo_ppo_change(tmp_path):
    """Real DVC: lock the stages as they are (`dvc commit`, nothing runs), change `profiles.demo.ppo`, and the
    search stage is reported changed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    extra = {"PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=repo, env=env(**extra), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    run("git", "init", "-q")
    run(DVC, "init", "-q")
    run(DVC, "config", "core.analytics", "false")
    for out in ("data/shapes/x", "data/splits/x", "losses/segmentation-mIoU/x"):  # stand-ins for the outs
        (repo / out).parent.mkdir(parents=True, exist_ok=True)
        (repo / out).write_text("x")
    run(DVC, "commit", "-f", "-q", "prepare", "split", "search")
    assert "up to date" in run(DVC, "status", "search")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["profiles"]["demo"]["ppo"]["samples"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = yaml.safe_load(run(DVC, "status", "--json", "search"))
    assert status == {"search": [{"changed deps": {"params.yaml": {"profiles.demo.ppo": "modified"}}}]}
