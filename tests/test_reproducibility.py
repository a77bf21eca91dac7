"""A search is reproducible from one seed: two runs with `search.workers: 2` (threads) and a run killed with
SIGKILL and resumed evaluate the same candidates (ids, hashes) with the same scores and end with the same
best loss as an uninterrupted run (real CLI runs of `lossforge search --no-retrain`, real trainings). Below
them: a training never touches torch's global RNG, so trainings in other threads cannot disturb it."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import torch

from components.tasks.loss_registry import build_loss
from test_flows_support import cli, kill_search_midway, prefect_server, write_tiny_params

# past the initial population (3), so parents are chosen by tournaments over the scores told so far
SETTINGS = {"search": {"budget": 6, "workers": 2, "runner": "threads"}, "evolution": {"initial_population": 3},
            "proxy": {"iterations": 6}}


def _results(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in folder.glob(".lossforge/runs/*/results/*.json")}


def _outcome(folder: Path) -> dict:
    """What a search decided: every history record (id, hash, status, score) in order, and the best loss."""
    state = json.loads(next(folder.glob(".lossforge/runs/*/checkpoint.json")).read_text())
    summary = json.loads(next(folder.glob("losses/*/search.json")).read_text())
    return {
        "history": [(r["id"], r["hash"], r["status"], r["target"], r.get("parent_id")) for r in state["history"]],
        "best": {k: summary["best"][k] for k in ("id", "hash", "target")},
    }


def _search(folder: Path, api_url: str) -> dict:
    done = cli(["search", "--no-retrain"], folder, PREFECT_API_URL=api_url)
    assert done.returncode == 0, done.stderr[-3000:]
    return _outcome(folder)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_tiny_params(folder, **SETTINGS)
    return _search(folder, prefect_server().url)


@pytest.mark.slow
def test_two_runs_with_the_same_seed_evaluate_the_same_candidates(uninterrupted, tmp_path):
    write_tiny_params(tmp_path, **SETTINGS)
    again = _search(tmp_path, prefect_server().url)
    assert sum(r[2] == "evaluated" for r in uninterrupted["history"]) >= 3
    assert again == uninterrupted


@pytest.mark.slow
def test_killed_and_resumed_search_equals_an_uninterrupted_one(uninterrupted, tmp_path):
    server = prefect_server()
    write_tiny_params(tmp_path, **SETTINGS)
    returncode = kill_search_midway(tmp_path, server.url, _results, at_least=2, timeout=400)
    assert returncode == -signal.SIGKILL, "the search finished before it could be killed"
    resumed = _search(tmp_path, server.url)
    assert resumed == uninterrupted


# ---------------------------------------------------------------------------------------------- trainings
def _segmentation(model: str):
    from components.tasks.segmentation.models import model_preset
    from components.tasks.segmentation.trainer import ProxyConfig, train_proxy
    from test_wave_training import Scenes

    train, val = Scenes(8, 32, 0), Scenes(4, 32, 1)
    cfg = ProxyConfig(model=model_preset(model, input_size=32), iterations=3, batch_size=2, eval_batch_size=4,
                      device="cpu", seed=5)
    return lambda: train_proxy({"ce": build_loss("ce", num_classes=train.num_classes)}, train, val, cfg, "mIoU")


def _detection():
    from components.tasks.detection.datasets import open_detection_dataset
    from components.tasks.detection.losses import baseline_loss
    from components.tasks.detection.models import DetectorConfig
    from components.tasks.detection.trainer import ProxyConfig, train_proxy
    from components.tasks.segmentation.shapes import ensure_shapes
    import tempfile

    root = ensure_shapes(Path(tempfile.mkdtemp(prefix="lf-det-")) / "shapes", num_train=4, num_test=2,
                         image_size=64, seed=3)
    train, val = open_detection_dataset(root, split="train"), open_detection_dataset(root, split="val")
    tiny = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32,
                          box_batch_size_per_image=32)
    cfg = ProxyConfig(model=tiny, iterations=2, batch_size=2, eval_batch_size=4, warmup_iterations=1, device="cpu",
                      seed=3)
    return lambda: train_proxy({"ce": baseline_loss("ce_smoothl1")}, train, val, cfg, "mAP")


TRAININGS = {"segmentation wave": lambda: _segmentation("cpu_unet"), "segmentation with dropout": lambda: _segmentation("lite"),
             "detection": _detection}


@pytest.mark.parametrize("kind", list(TRAININGS))
def test_a_training_leaves_torchs_global_rng_untouched(kind):
    """Model builds draw under seeding.seeded_init (restored on exit); batches, flips, samplers, the detector's
    size choice and dropout draw from private streams: another thread's build cannot be disturbed."""
    train = TRAININGS[kind]()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    result = train()["ce"]
    assert result.status == "ok", result.message
    assert torch.equal(torch.get_rng_state(), before)


def test_trainings_with_dropout_in_threads_equal_sequential_ones():
    """Each member's dropout stream is its own, also while another training runs in a second thread."""
    train = _segmentation("lite")
    sequential = [train()["ce"] for _ in range(2)]
    concurrent: list = [None, None]

    def run(k: int) -> None:
        concurrent[k] = train()["ce"]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, con in zip(sequential, concurrent):
        assert (con.status, con.final_loss, con.metrics) == (seq.status, seq.final_loss, seq.metrics)
