"""Warm start (`evolution.seed_losses`): named losses are handed out first, then the evolution breeds from them."""

from __future__ import annotations

import random

import pytest

from components.errors import LossforgeError
from components.search.evolution import EvolutionConfig, RegularizedEvolution
from components.search.evolution_method import seed_graphs
from components.search.generation import TreeGenerator
from components.search.graph_json import save_graph


def evolution(seeds, k=4):
    rng = random.Random(0)
    return RegularizedEvolution(EvolutionConfig(initial_population=k, budget=10), TreeGenerator(rng=rng), "detection",
                                rng, seeds=seeds)


def test_seeds_are_handed_out_first_then_random_graphs():
    seeds = seed_graphs("detection", ["ce_giou", "ce_iou"])
    evo = evolution(seeds)
    first, second, third = evo.ask(), evo.ask(), evo.ask()
    assert [first.graph.canonical(), second.graph.canonical()] == [g.canonical() for g in seeds]
    assert (first.mutation, second.mutation, first.parent_id) == ("seed", "seed", None)
    assert third.mutation == "init" and third.graph.canonical() not in {g.canonical() for g in seeds}


def test_a_seed_the_protocol_rejects_is_skipped_without_an_evaluation():
    seeds = seed_graphs("detection", ["ce_giou", "ce_iou"])
    rejected = seeds[0].canonical()
    evo = evolution(seeds)
    first = evo.ask(accept=lambda graph: graph.canonical() != rejected)
    assert first.graph.canonical() == seeds[1].canonical() and first.id == 0
    assert evo.ask(accept=lambda graph: True).mutation == "init"


def test_offspring_of_a_seed_after_the_initial_population():
    seeds = seed_graphs("detection", ["ce_giou"])
    evo = evolution(seeds, k=2)
    seed, other = evo.ask(), evo.ask()
    evo.tell(seed.id, 0.3)
    evo.tell(other.id, 0.0)
    child = evo.ask()
    assert child.parent_id == seed.id  # the tournament over both picks the better one


def test_seed_losses_resolve_names_and_files(tmp_path):
    [graph] = seed_graphs("detection", ["ce_giou"])
    assert set(graph.branches) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    path = save_graph(graph, tmp_path / "mine.json")
    assert seed_graphs("detection", [str(path)])[0].canonical() == graph.canonical()
    with pytest.raises(LossforgeError, match="'ce_smoothl1' is not a loss graph"):
        seed_graphs("detection", ["ce_smoothl1"])  # torchvision's own losses, no tree
    with pytest.raises(LossforgeError, match="evolution.seed_losses: 'nope'"):
        seed_graphs("detection", ["nope"])
    with pytest.raises(LossforgeError, match="task"):
        seed_graphs("segmentation", [str(path)])  # a detection loss for a segmentation search


def test_config_validation():
    assert EvolutionConfig(seed_losses=["a.json"]).seed_losses == ("a.json",)
    assert EvolutionConfig.from_dict(EvolutionConfig(seed_losses=("a",)).to_dict()).seed_losses == ("a",)
    for bad in ("ce_giou", [""], [3], ["a", "b", "c"]):
        with pytest.raises(LossforgeError, match="seed_losses"):
            EvolutionConfig(initial_population=2, seed_losses=bad)
