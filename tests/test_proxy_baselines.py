"""Proxy baselines (CE + retrain.baselines trained on the search's proxy), the CE margin and the proxy-validity
Spearman ρ of the report, and the progress plot's reference lines.

Fast tests: the baseline jobs and their resume keys, the mean ± std summary, the MLflow nested runs on a real
SQLite store (idempotent, half-written runs replaced), and the report helpers. The slow test runs the real
`lossforge search` twice (Prefect flow, proxy trainings on the embedded shapes data, MLflow in tmp): the
second run, with one baseline result deleted as a kill would leave it, trains only that one and logs nothing
twice; then `lossforge retrain` writes the report with the CE line and ρ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.params import parse_params
from components.stats import spearman
from flows.proxy_baselines import jobs, load_baselines, summarize
from flows.report import baseline_lines, ce_margin, progress_figure, proxy_validity
from flows.tracking import TAG_KEY, SearchTracker, resolve_tracking_uri


def _params(baselines=("soft_iou", "ce", {"type": "focal", "gamma": 2}), seeds=(0, 3), **proxy):
    return parse_params({"retrain": {"baselines": list(baselines)},
                         "proxy": {**({"seeds": list(seeds)} if seeds is not None else {}), **proxy}})


# ------------------------------------------------------------------------------------------ jobs and summary
def test_jobs_ce_first_once_per_seed_with_stable_keys():
    todo = jobs(_params())
    assert [(j["name"], j["seed"]) for j in todo] == [
        ("ce", 0), ("soft_iou", 0), ("focal(gamma=2)", 0), ("ce", 3), ("soft_iou", 3), ("focal(gamma=2)", 3)]
    assert todo[2]["id"] == "baseline-focal_gamma_2-s0" and todo[2]["loss"] == {"type": "focal", "gamma": 2}
    assert len({(j["id"], j["hash"]) for j in todo}) == 6
    # the key of a (loss, seed) does not move when other seeds or baselines are added: a resume reuses it
    fewer = {j["id"]: j["hash"] for j in jobs(_params(baselines=["soft_iou"], seeds=[3]))}
    assert fewer == {j["id"]: j["hash"] for j in todo if j["id"] in fewer} and len(fewer) == 2
    # another proxy schedule is another training: new key
    other = {j["id"]: j["hash"] for j in jobs(_params(iterations=7))}
    assert all(other[j["id"]] != j["hash"] for j in todo)
    # default: CE alone, at the proxy seed the candidates train with
    default = jobs(parse_params({"proxy": {"seed": 5}}))
    assert [(j["name"], j["seed"]) for j in default] == [("ce", 5)]


def test_summary_mean_std_over_ok_seeds():
    params = _params(baselines=["soft_iou"], seeds=[0, 1, 2])
    runs = []
    for seed, (status, target) in enumerate([("ok", 0.2), ("ok", 0.4), ("nan", None)]):
        runs.append({"name": "ce", "spec": "ce", "seed": seed, "status": status, "target": target,
                     "metrics": {} if target is None else {"mIoU": target, "gAcc": 0.9}, "iterations": 3,
                     "seconds": 1.0, "message": "", "id": f"baseline-ce-s{seed}", "hash": "h"})
    out = summarize(params, runs)
    assert out["format"] == "lossforge.proxy-baselines/1" and out["seeds"] == [0, 1, 2]
    ce = out["losses"]["ce"]
    assert ce["status"] == "nan" and ce["seeds_ok"] == [0, 1]
    assert ce["target_mean"] == pytest.approx(0.3) and ce["target_std"] == pytest.approx(0.1)
    assert ce["metrics_mean"] == {"mIoU": pytest.approx(0.3), "gAcc": pytest.approx(0.9)}
    assert [r["seed"] for r in ce["runs"]] == [0, 1, 2]


# ------------------------------------------------------------------------------------------ MLflow
def _baseline_record(name, seed, target=0.25):
    return {"key": f"baseline-{name}-s{seed}-h", "name": name, "seed": seed, "spec": name, "status": "ok",
            "metrics": {"mIoU": target, "BF1": 0.1}, "target": target, "seconds": 2.0, "iterations": 3,
            "message": ""}


def test_baseline_runs_are_nested_tagged_and_logged_once(tmp_path):
    uri = resolve_tracking_uri("sqlite:///mlruns/mlflow.db", tmp_path)
    t = SearchTracker(uri, "lossforge/s1", "s1", artifact_root=tmp_path / "art")
    parent = t.start()
    # what a SIGKILL between create_run and set_terminated leaves behind
    t.client.create_run(t.experiment_id, tags={"mlflow.parentRunId": parent, "lossforge.search_id": "s1",
                                                "lossforge.kind": "baseline", TAG_KEY: "baseline-ce-s0-h"})
    records = [_baseline_record("ce", 0), _baseline_record("ce", 1, 0.35)]
    assert t.sync_baselines(records) == 2
    again = SearchTracker(uri, "lossforge/s1", "s1", artifact_root=tmp_path / "art")
    assert again.start() == parent
    assert again.sync_baselines(records) == 0  # a resumed search logs nothing twice
    runs = MlflowClient(uri).search_runs([t.experiment_id], "tags.`lossforge.kind` = 'baseline'")
    assert sorted(r.data.tags[TAG_KEY] for r in runs) == ["baseline-ce-s0-h", "baseline-ce-s1-h"]
    for run in runs:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent
        assert tags["baseline"] == "true" and tags["baseline_name"] == "ce"
        assert run.data.metrics["proxy_BF1"] == 0.1
        assert run.data.metrics["target"] == run.data.metrics["proxy_mIoU"] == {"0": 0.25, "1": 0.35}[tags["seed"]]
    # candidate bookkeeping ignores baseline runs
    assert again.logged == {}


# ------------------------------------------------------------------------------------------ report helpers
def _summary(best=0.5, ce=(0.4, 0.45, 0.5), soft=(0.3,), top=(0.5, 0.42)):
    losses = {}
    for name, vals in (("ce", ce), ("soft_iou", soft)):
        runs = [{"seed": s, "status": "ok", "target": v, "metrics": {"mIoU": v}} for s, v in enumerate(vals)]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        losses[name] = {"status": "ok", "seeds_ok": list(range(len(vals))), "target_mean": mean, "target_std": std,
                        "runs": runs}
    return {"best": {"id": 7, "target": best},
            "top": [{"id": 7, "target": top[0]}, {"id": 2, "target": top[1]}],
            "baselines": {"format": "lossforge.proxy-baselines/1", "losses": losses}}


def test_ce_margin_line_and_noise():
    figures, line = ce_margin(_summary(best=0.6), "mIoU")
    assert figures["proxy_margin_vs_ce"] == pytest.approx(0.6 - 0.45)
    assert figures["proxy_ce_std"] == pytest.approx(math.sqrt(1 / 600)) and figures["proxy_ce_seeds"] == 3
    assert "**beats CE on the proxy**" in line and "0.4500 ± 0.0408" in line and "margin +0.1500" in line
    assert "larger than 2 std" in line
    _, close = ce_margin(_summary(best=0.46), "mIoU")
    assert "**beats CE" in close and "within 2 std" in close
    _, worse = ce_margin(_summary(best=0.3), "mIoU")
    assert "**does not beat CE on the proxy**" in worse and "margin -0.1500" in worse
    figures, one = ce_margin(_summary(best=0.5, ce=(0.4,)), "mIoU")
    assert "(one seed)" in one and "proxy.seeds" in one and figures["proxy_margin_vs_ce"] == pytest.approx(0.1)
    figures, none = ce_margin({"best": {"target": 0.5}}, "mIoU")
    assert figures["proxy_margin_vs_ce"] is None and "no proxy score for CE" in none


def test_proxy_validity_matches_rows_by_name():
    comparison = {"rows": [
        {"name": "searched", "status": "ok", "metrics": {"mIoU": 0.70}},
        {"name": "rank1", "status": "ok", "metrics": {"mIoU": 0.70}},  # same loss as `searched`: counted once
        {"name": "rank2", "status": "ok", "metrics": {"mIoU": 0.50}},
        {"name": "ce", "status": "ok", "metrics": {"mIoU": 0.65}},
        {"name": "soft_iou", "status": "ok", "metrics": {"mIoU": 0.60}},
        {"name": "dice", "status": "ok", "metrics": {"mIoU": 0.9}},  # no proxy score: left out
        {"name": "lovasz", "status": "nan", "metrics": {}},
    ]}
    out = proxy_validity(_summary(), comparison, "mIoU")
    assert out["losses"] == ["searched", "rank2", "ce", "soft_iou"] and out["n"] == 4
    assert out["proxy"] == pytest.approx([0.5, 0.42, 0.45, 0.3])
    assert out["rho"] == pytest.approx(spearman([0.5, 0.42, 0.45, 0.3], [0.7, 0.5, 0.65, 0.6]))
    assert out["rho"] == pytest.approx(0.8)  # ranks proxy 4,2,3,1 vs re-training 4,1,3,2: 1 - 6*2/60
    two = proxy_validity(_summary(), {"rows": comparison["rows"][:2]}, "mIoU")
    assert two["n"] == 1 and two["rho"] is None


def test_progress_plot_draws_each_baseline_as_a_horizontal_line():
    lines = baseline_lines(_summary())
    assert [(b["name"], b["seeds"]) for b in lines] == [("ce", 3), ("soft_iou", 1)]
    fig = progress_figure([{"evaluations": 1, "top5_mean": 0.2}, {"evaluations": 2, "top5_mean": 0.5}], "mIoU", lines)
    ax = fig.axes[0]
    labelled = {line.get_label(): line for line in ax.get_lines()}
    assert set(labelled) == {"searched: top-5 mean", "ce (proxy, 3 seeds)", "soft_iou (proxy)"}
    for name, mean in (("ce (proxy, 3 seeds)", 0.45), ("soft_iou (proxy)", 0.3)):
        ys = list(labelled[name].get_ydata())
        assert ys == [pytest.approx(mean)] * 2  # axhline: constant y across the axes
    assert len(ax.patches) == 1  # the ± std band of CE only (soft_iou has one seed)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(labelled)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------------------------ the real flow
def _baseline_results(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.glob(".lossforge/runs/*/baselines/results/*.json")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_trains_baselines_once_and_the_report_uses_them(tmp_path):
    from test_flows_support import cli, prefect_server, write_tiny_params

    server = prefect_server()
    write_tiny_params(tmp_path, search={"budget": 2, "workers": 2, "confirm_top": 2}, proxy={"seeds": [0, 1]},
                      retrain={"baselines": ["ce", "soft_iou"], "seeds": [0, 1], "top_k": 2})
    done = cli(["search", "--no-retrain"], tmp_path, PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    first = _baseline_results(tmp_path)
    assert len(first) == 4  # (ce, soft_iou) x seeds (0, 1)
    # candidate results stay apart: the candidates' results/ holds candidates only
    assert not any(p.name.startswith("baseline-") for p in tmp_path.glob(".lossforge/runs/*/results/*.json"))
    state = next(tmp_path.glob(".lossforge/runs/*/checkpoint.json")).parent
    stored = load_baselines(state)
    summary = json.loads((tmp_path / "losses/segmentation-mIoU/search.json").read_text())
    assert summary["baselines"] == stored
    assert list(stored["losses"]) == ["ce", "soft_iou"] and stored["seeds"] == [0, 1]
    for entry in stored["losses"].values():
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        results = [json.loads(first[f"{r['id']}-{r['hash']}.json"]) for r in entry["runs"]]
        assert [r["target"] for r in entry["runs"]] == [r["target"] for r in results]
        ok = [r["target"] for r in results if r["status"] == "ok"]
        if ok:
            assert entry["target_mean"] == pytest.approx(sum(ok) / len(ok))

    # confirmation: the 2 best candidates trained again with the other proxy seed (1); best = best mean
    evaluated = [c for c in summary["candidates"] if c["status"] == "evaluated"]
    confirmations = [json.loads(p.read_text()) for p in state.glob("confirm/results/*.json")]
    assert len(confirmations) == min(2, len(evaluated))
    assert all(c["id"].startswith("confirm-") and c["id"].endswith("-s1") for c in confirmations)
    best = summary["best"]
    if evaluated:
        mine = next(c for c in confirmations if c["id"] == f"confirm-{best['id']}-s1")
        if mine["status"] == "ok":
            assert best["proxy_runs"] == 2
            assert best["target"] == pytest.approx((best["target_single"] + mine["target"]) / 2)

    # a kill during the baselines: one result missing. The resumed search trains that one only.
    lost = sorted(first)[0]
    next(state.glob(f"baselines/results/{lost}")).unlink()
    done = cli(["search", "--no-retrain"], tmp_path, PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    second = _baseline_results(tmp_path)
    assert sorted(second) == sorted(first)
    assert all(second[name] == first[name] for name in first if name != lost)  # read back, not re-trained
    assert json.loads(second[lost])["started"] > json.loads(first[lost])["started"]  # trained again

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(f"lossforge/{state.name}")
    runs = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'baseline'")
    keys = sorted(r.data.tags[TAG_KEY] for r in runs)
    assert keys == sorted(name[: -len(".json")] for name in first)  # one run per (baseline, seed), no duplicate
    assert all(r.data.tags["baseline"] == "true" and r.info.status == "FINISHED" for r in runs)
    parent = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'search'")[0]
    if stored["losses"]["ce"]["target_mean"] is not None:
        assert parent.data.metrics["proxy_baseline_ce_mean"] == pytest.approx(stored["losses"]["ce"]["target_mean"])

    # re-train + report: the CE line, ρ over the re-trained losses, both in metrics.json
    done = cli(["retrain"], tmp_path, PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "reports/segmentation-mIoU"
    metrics = json.loads((report / "metrics.json").read_text())
    text = (report / "report.md").read_text()
    assert "CE on the proxy" in text and "## Proxy validity" in text
    comparison = json.loads((report / "comparison.json").read_text())
    summary = json.loads((tmp_path / "losses/segmentation-mIoU/search.json").read_text())
    # one re-training task per seed, merged; the top-2 of the search re-trained as searched + rank2
    assert comparison["seeds"] == [0, 1]
    assert sorted(p.name for p in (report / "seeds").glob("*.json")) == ["comparison-s0.json", "comparison-s1.json"]
    names = [r["name"] for r in comparison["rows"]]
    assert names[0] == "searched" and names[-2:] == ["ce", "soft_iou"]
    assert ("rank2" in names) == (len(summary["top"]) >= 2)
    expected = proxy_validity(summary, comparison, "mIoU")
    ok = {r["name"] for r in comparison["rows"] if r["status"] == "ok"}
    assert set(expected["losses"]) == ok & {"searched", "rank2", "ce", "soft_iou"} - {
        n for n, e in summary["baselines"]["losses"].items() if e["target_mean"] is None}
    assert metrics["proxy_spearman_n"] == expected["n"]
    assert metrics["proxy_spearman"] == (None if expected["rho"] is None else pytest.approx(expected["rho"]))
    assert metrics["proxy_baselines"] == {b["name"]: pytest.approx(b["mean"]) for b in baseline_lines(summary)}
