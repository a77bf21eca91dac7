"""params.yaml validation: the shipped file loads, profiles merge, and every bad field is named in one line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from components.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def paper(**changes):
    raw = copy.deepcopy(RAW)
    raw["profile"] = "paper"
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


def test_shipped_params_paper_values():
    params = load_params(ROOT / "params.yaml", profile="paper")
    assert params.search.budget == 500  # appendix A: 500 proxy evaluations
    evo = params.config("evolution", budget=params.search.budget)
    assert (evo.initial_population, evo.tournament_fraction, evo.max_population, evo.depth) == (20, 0.05, 2500, 3)
    scr = params.config("screening")
    assert (scr.samples, scr.steps, scr.lr, scr.momentum, scr.threshold) == (5, 500, 0.001, 0.9, 0.6)
    proxy = params.config("proxy")
    assert (proxy.model.encoder, proxy.model.input_size, proxy.batch_size, proxy.lr) == ("resnet50", 128, 32, 0.02)
    retrain = params.config("retrain")
    assert (retrain.model.encoder, retrain.model.input_size) == ("resnet101", 512)


def test_demo_profile_is_deep_merged():
    params = load_params(ROOT / "params.yaml")  # the file selects `profile: demo`
    assert params.profile == "demo"
    proxy = params.config("proxy")
    assert proxy.model.name == "unet" and proxy.model.input_size == 32 and proxy.optimizer == "adamw"
    assert proxy.model.output_stride == 16  # kept from the top level (deep merge)
    assert proxy.poly_power == 0.9 and proxy.momentum == 0.9  # idem
    assert params.search.budget >= 200 and params.section_extra("screening", "size") == 32


def test_search_id_changes_with_search_params_only():
    a = parse_params(paper())
    assert parse_params(paper()).search_id == a.search_id
    assert parse_params(paper(search__workers=7)).search_id == a.search_id  # how, not what
    assert parse_params(paper(search__budget=9)).search_id != a.search_id
    assert parse_params(paper(proxy__lr=0.5)).search_id != a.search_id
    # proxy.seeds only adds proxy-baseline trainings (stored per seed): the same search resumes
    seeded = parse_params(paper(proxy__seeds=[0, 1, 2]))
    assert seeded.search_id == a.search_id and seeded.section_extra("proxy", "seeds") == [0, 1, 2]
    assert a.search_id.startswith("segmentation-mIoU-evolution-")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"search__budget": -3}, "params.yaml: search.budget: must be > 0 (got -3)"),
        ({"search__metric": "mIoUU"}, "params.yaml: search.metric: unknown metric"),
        ({"search__method": "grid"}, "params.yaml: search.method:"),
        ({"search__workers": 0}, "params.yaml: search.workers: must be > 0 (got 0)"),
        ({"proxy__lr": "fast"}, "params.yaml: proxy.lr:"),
        ({"proxy__bogus": 1}, "params.yaml: proxy.bogus: unknown field"),
        ({"screening__steps": -1}, "params.yaml: screening"),
        ({"evolution__tournament_fraction": 3}, "params.yaml: evolution"),
        ({"split__eval_fraction": 1.5}, "params.yaml: split.eval_fraction: must be < 1.0 (got 1.5)"),
        ({"data__num_train": 0}, "params.yaml: data.num_train: must be > 0 (got 0)"),
        ({"tracking__bogus": 1}, "params.yaml: tracking.bogus: unknown field"),
    ],
)
def test_bad_fields_are_named(changes, message):
    with pytest.raises(ParamsError) as info:
        parse_params(paper(**changes))
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_unknown_profile_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match=r"profile: unknown profile 'gpu' \(known: paper, demo\)"):
        load_params(ROOT / "params.yaml", profile="gpu")
    bad = tmp_path / "params.yaml"
    bad.write_text("search: [budget: 3\n")
    with pytest.raises(ParamsError, match=r"params.yaml: invalid YAML at line \d+"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")


def test_overrides_are_validated():
    params = parse_params(paper())
    assert params.with_overrides({"search.budget": 4, "search.metric": None}).search.budget == 4
    with pytest.raises(ParamsError, match="search.budget: must be > 0"):
        params.with_overrides({"search.budget": 0})
