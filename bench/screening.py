"""Benchmark of the loss-rejection protocol: naive reference vs the real implementation.

One fixed, seeded stream of candidates from the project's own generator (components.search.generation:
K random graphs, then offspring -- copy / re-init / two mutations -- of parents drawn from the stream)
is screened twice on the same probe (the embedded shapes dataset, resized, with `--classes` output
classes of a randomly initialised network):

* naive: `screen_naive`, one candidate at a time, one sample at a time, plain eager loop with
  torch.optim.SGD, no cache, no folding, no early exit;
* real: `screen` (batched over samples, constant folding, exact early exits) with a fresh in-memory
  gradient-equivalence cache, over `--workers` processes.

Prints both throughputs (candidates/min, ms per candidate), the verdict agreement between the two, the
accepted fraction and the reason histogram, and as the last line `ratio: <real/naive>x`. The real
implementation must give the naive reference's verdicts and reasons: any candidate where they differ is
listed and the exit status is 1 (after the figures).

    python bench/screening.py                      # paper settings: 200 candidates, 64², 21 classes, B=5, 500 steps
    python bench/screening.py --candidates 40 --size 32 --steps 100   # quick
    python bench/screening.py --size 32 --classes 8 --samples 3 --steps 60 --lr 0.01   # the demo's protocol

`--task detection` builds the task's own probe (`get_task("detection").screening_problem` on the embedded shapes
data in COCO form, written to a temporary folder) and screens random single-branch trees (`--candidates` split
over the four branches: K random trees, then offspring of trees drawn from the branch's stream, weight 1, as the
search breeds them) on each branch's probe (`problem.branch_problems`); figures are per branch, then in total.

    python bench/screening.py --task detection --candidates 40 --size 64 --samples 3 --steps 100 --lr 0.01

`--method cse` benchmarks CSE-AutoLoss's two screening stages instead (components/cse): a seeded stream of
`detection_cse` graphs (K random ones, then offspring, `cse` operators) goes through the convergence-property
checks (both trees) and the verified ones through the model-optimisation simulation (the CPU detector on the
embedded shapes data, `cse:` defaults unless given). Prints each stage's rate (candidates/min) and the fraction it
rejects, by reason; to compare, every `--simulate-rejected-every`-th candidate the convergence stage rejected is
simulated too, which estimates the rate of screening by simulation alone; the last line is
`ratio: <funnel rate / simulation-alone rate>x`.

    python bench/screening.py --method cse --candidates 500
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from components.search.equivalence import EquivalenceCache  # noqa: E402
from components.search.generation import TreeGenerator  # noqa: E402
from components.search.parallel_screening import screen_many  # noqa: E402
from components.search.screening import ScreeningConfig, screen_naive  # noqa: E402
from components.tasks.base import get_task  # noqa: E402


def candidate_stream(count: int, seed: int, initial: int = 20, operator_set: str = "autoloss_zero"):
    """`count` graphs: `initial` random ones, then offspring of parents drawn uniformly from the stream."""
    gen = TreeGenerator(operator_set, depth=3, rng=random.Random(seed))
    stream = []
    for i in range(count):
        if i < initial:
            stream.append(gen.random_graph("segmentation"))
        else:
            parent = stream[gen.rng.randrange(len(stream))]
            stream.append(gen.offspring(parent)[0])
    return stream


def branch_stream(task: str, branch: str, count: int, seed: int, initial: int = 20,
                  operator_set: str = "autoloss_zero"):
    """`count` single-branch graphs of `branch` (weight 1, as the search screens them): `initial` random trees,
    then offspring trees of parents drawn uniformly from the stream."""
    from components.search.graph import Branch, LossGraph, branch_inputs

    gen = TreeGenerator(operator_set, depth=3, rng=random.Random(f"{seed}-{branch}"))
    inputs = branch_inputs(task, branch, operator_set)
    trees = []
    for i in range(count):
        trees.append(gen.random_tree(inputs) if i < initial else gen.offspring_tree(trees[gen.rng.randrange(len(trees))])[0])
    return [LossGraph(task, {branch: Branch(tree, 1.0)}) for tree in trees]


class ShapesProbeData:
    """Scenes of the embedded shapes dataset (components.tasks.segmentation.shapes.render_scene), in memory;
    `num_classes` is the output classes of the probe network (default: the shapes classes)."""

    def __init__(self, count: int, size: int, seed: int, num_classes: int | None = None):
        import numpy as np

        from components.tasks.segmentation.shapes import SHAPES_CLASSES, render_scene

        rng = np.random.default_rng(seed)
        self.num_classes = num_classes or len(SHAPES_CLASSES)
        self.items = []
        for _ in range(count):
            scene = render_scene(rng, image_size=max(size, 32))
            image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
            self.items.append((image, torch.from_numpy(scene.labels.astype("int64"))))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--lr", type=float, default=ScreeningConfig.lr)
    ap.add_argument("--task", default="segmentation", choices=("segmentation", "detection"))
    ap.add_argument("--metric", default=None, help="target metric (default: the task's, mIoU / mAP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes for the real implementation")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process for both runs (0 = torch default; on a shared, "
                         "oversubscribed machine more than 1 thread per process is much slower)")
    ap.add_argument("--naive-every", type=int, default=1,
                    help="time the naive reference on every k-th candidate of the stream only (its rate "
                         "does not depend on the stream order: no cache, no early exit)")
    ap.add_argument("--early-check-step", type=int, default=None,
                    help="also time the real implementation with the optional early check at this step "
                         "(can falsely reject; reported separately, the last line stays the default config)")
    ap.add_argument("--method", default="evolution", choices=("evolution", "cse"),
                    help="evolution: the loss-rejection protocol (above); cse: CSE-AutoLoss's convergence checks and "
                         "optimisation simulation")
    ap.add_argument("--images-per-class", type=int, default=None, help="cse: simulation images per class")
    ap.add_argument("--sim-iterations", type=int, default=None, help="cse: simulation SGD steps")
    ap.add_argument("--simulate-rejected-every", type=int, default=25,
                    help="cse: also simulate every k-th candidate the convergence checks rejected (for the ratio)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method == "cse":
        cse_main(args)
        return
    args.metric = args.metric or get_task(args.task).default_metric

    load = os.getloadavg()
    classes = f"{args.classes} classes" if args.task == "segmentation" else "the shapes classes"
    print(f"settings: task {args.task}, {args.candidates} candidates, probe {args.size}x{args.size}, {classes}, "
          f"B={args.samples}, {args.steps} steps, lr {args.lr:g}, metric {args.metric}, seed {args.seed}, "
          f"torch threads {torch.get_num_threads()}, workers {args.workers}, cpus {os.cpu_count()}")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    runs = detection_runs(args) if args.task == "detection" else segmentation_runs(args)
    base = ScreeningConfig(samples=args.samples, steps=args.steps, lr=args.lr)
    totals = collections.Counter()
    differ_all = []
    for label, stream, problem in runs:
        if len(runs) > 1:
            print(f"--- {label}: {len(stream)} candidates")
        figures, differ = bench_one(args, stream, problem, base)
        totals.update(figures)
        differ_all += differ
    if len(runs) > 1:
        naive_rate = totals["naive_n"] / totals["naive_s"] * 60
        real_rate = totals["real_n"] / totals["real_s"] * 60
        print(f"--- all branches: accepted {totals['accepted']}/{totals['real_n']}, verdict agreement "
              f"{totals['same_verdict']}/{totals['naive_n']}, reason agreement {totals['same_reason']}/{totals['naive_n']}")
        print(f"naive: {totals['naive_n']} candidates in {totals['naive_s']:.1f} s = {naive_rate:.1f} candidates/min")
        print(f"real:  {totals['real_n']} candidates in {totals['real_s']:.1f} s = {real_rate:.1f} candidates/min")
        print(f"ratio: {real_rate / naive_rate:.1f}x")
    if differ_all:
        sys.exit(1)


def segmentation_runs(args):
    """[(label, candidates, problem)]: the generator's segmentation stream on the task's probe (shapes scenes)."""
    dataset = ShapesProbeData(16, args.size, args.seed, num_classes=args.classes)
    problem = get_task("segmentation").screening_problem(dataset, args.metric, samples=args.samples, size=args.size,
                                                         seed=args.seed)
    return [("segmentation", candidate_stream(args.candidates, args.seed), problem)]


def detection_runs(args):
    """[(branch, single-branch candidates, the branch's probe)] of the detection task on the shapes data (COCO)."""
    task = get_task("detection")
    with tempfile.TemporaryDirectory(prefix="lf-bench-det-") as tmp:
        task.ensure_embedded_data(tmp, num_train=max(16, 2 * args.samples), num_test=1, image_size=max(args.size, 32),
                                  seed=args.seed)
        dataset = task.open_dataset(tmp, split="train")
        problem = task.screening_problem(dataset, args.metric, samples=args.samples, size=args.size, seed=args.seed)
    branches = list(problem.branch_problems)
    per_branch = max(1, -(-args.candidates // len(branches)))
    return [(b, branch_stream("detection", b, per_branch, args.seed), problem.branch_problems[b]) for b in branches]


def bench_one(args, stream, problem, base):
    """Screen `stream` naively and with the real implementation; print the figures; (counts, mismatches)."""
    real_cfg = base  # the library default: the paper's verdicts
    naive_idx = list(range(0, len(stream), max(1, args.naive_every)))
    t0 = time.perf_counter()
    naive = [screen_naive(stream[i], problem, base) for i in naive_idx]
    naive_s = time.perf_counter() - t0

    cache = EquivalenceCache(None, problem.key)
    t0 = time.perf_counter()
    real = screen_many(stream, problem, real_cfg, cache=cache, workers=args.workers)
    real_s = time.perf_counter() - t0

    early = None
    if args.early_check_step:
        early_cfg = ScreeningConfig(samples=args.samples, steps=args.steps, lr=args.lr,
                                    early_check_step=args.early_check_step)
        t0 = time.perf_counter()
        early = screen_many(stream, problem, early_cfg, cache=EquivalenceCache(None, problem.key), workers=args.workers)
        early_s = time.perf_counter() - t0

    n, k = len(stream), len(naive_idx)
    naive_rate = k / naive_s * 60
    real_rate = n / real_s * 60
    pairs = [(naive[j], real[i]) for j, i in enumerate(naive_idx)]
    same_verdict = sum(a.accepted == b.accepted for a, b in pairs)
    same_reason = sum(a.reason == b.reason for a, b in pairs)
    cached = sum(r.cached for r in real)
    full = sum(r.steps_run >= args.steps for r in real if not r.cached)
    hist_real = collections.Counter(r.reason.split(":")[0] for r in real)
    hist_naive = collections.Counter(r.reason.split(":")[0] for r in naive)
    accepted = sum(r.accepted for r in real)
    print(f"reasons (real, {n} candidates):  {dict(sorted(hist_real.items()))}")
    print(f"reasons (naive, {k} candidates): {dict(sorted(hist_naive.items()))}")
    print(f"accepted: {accepted}/{n} ({accepted / n:.1%}); real: {cached} reused from the equivalence cache, "
          f"{full} ran all {args.steps} steps")
    print(f"agreement naive vs real on the {k} candidates screened both ways: verdict {same_verdict}/{k}, "
          f"reason {same_reason}/{k}")
    differ = [i for (a, b), i in zip(pairs, naive_idx) if (a.accepted, a.reason) != (b.accepted, b.reason)]
    for i in differ:
        a, b = naive[naive_idx.index(i)], real[i]
        print(f"MISMATCH candidate {i}: naive {a.reason} (g={a.score}), real {b.reason} (g={b.score}): "
              f"{stream[i].canonical()}")
    if early is not None:
        agree = sum(a.accepted == b.accepted for a, b in zip(real, early))
        lost = sum(a.accepted and not b.accepted for a, b in zip(real, early))
        print(f"with early check at step {args.early_check_step}: {n} candidates in {early_s:.1f} s = "
              f"{n / early_s * 60:.1f} candidates/min ({n / early_s * 60 / naive_rate:.1f}x naive); verdicts equal "
              f"to the full protocol for {agree}/{n}, falsely rejected {lost}")
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"naive: {k} candidates in {naive_s:.1f} s = {naive_rate:.1f} candidates/min ({naive_s / k * 1000:.1f} ms each)")
    print(f"real:  {n} candidates in {real_s:.1f} s = {real_rate:.1f} candidates/min ({real_s / n * 1000:.1f} ms each)")
    print(f"ratio: {real_rate / naive_rate:.1f}x")
    figures = {"naive_n": k, "naive_s": naive_s, "real_n": n, "real_s": real_s, "accepted": accepted,
               "same_verdict": same_verdict, "same_reason": same_reason}
    return figures, differ


def cse_stream(count: int, seed: int, initial: int = 20):
    """`count` detection_cse graphs (cls + reg trees, `cse` operators): `initial` random ones, then offspring of
    parents drawn uniformly from the stream."""
    gen = TreeGenerator("cse", depth=3, rng=random.Random(f"cse-{seed}"))
    stream = []
    for i in range(count):
        stream.append(gen.random_graph("detection_cse") if i < initial
                      else gen.offspring(stream[gen.rng.randrange(len(stream))])[0])
    return stream


def cse_main(args) -> None:
    """CSE-AutoLoss's funnel: convergence checks, then the optimisation simulation of the verified graphs."""
    import dataclasses

    from components.cse.config import CSEConfig
    from components.cse.convergence import build_probe, check_branch
    from components.cse.simulation import OptimizationSimulator
    from components.tasks.detection.trainer import ProxyConfig

    defaults = CSEConfig()
    images = args.images_per_class or defaults.images_per_class
    iterations = args.sim_iterations or defaults.simulation_iterations
    task = get_task("detection")
    with tempfile.TemporaryDirectory(prefix="lf-bench-cse-") as tmp:
        task.ensure_embedded_data(tmp, num_train=64, num_test=1, image_size=64, seed=args.seed)
        dataset = task.open_dataset(tmp, split="train")
        simulator = OptimizationSimulator(dataset, ProxyConfig(device="cpu"), images_per_class=images,
                                          iterations=iterations, batch_size=defaults.simulation_batch_size,
                                          lr=defaults.simulation_lr, min_gain=defaults.min_ap_gain,
                                          min_ratio=defaults.min_ap_ratio, seed=args.seed)
        load = os.getloadavg()
        print(f"settings: method cse, {args.candidates} candidates (detection_cse, cse operators, depth 3), "
              f"simulation: {len(simulator.ids)} images ({images} per class), {iterations} SGD steps at batch "
              f"{simulator.config.batch_size}, CPU detector {simulator.config.model.name} at "
              f"{simulator.config.model.min_size} px, seed {args.seed}, torch threads {torch.get_num_threads()}")
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        t0 = time.perf_counter()
        initial_ap = simulator.initial_ap
        print(f"untrained detector: AP {initial_ap:.4f} on the simulation images ({time.perf_counter() - t0:.1f} s, once)")
        if simulator.min_ratio > 0:
            t0 = time.perf_counter()
            print(f"reference CE + GIoU: AP {simulator.reference_ap:.4f} ({time.perf_counter() - t0:.1f} s, once); "
                  f"a candidate needs AP > {initial_ap:.4f} + {simulator.min_gain:g} and >= {simulator.min_ratio:g} x that")
        stream = cse_stream(args.candidates, args.seed)
        probe = build_probe(args.seed)
        conv_reasons, verified, rejected = collections.Counter(), [], []
        t0 = time.perf_counter()
        for graph in stream:
            for branch, b in graph.branches.items():
                verdict = check_branch(branch, b.tree, probe)
                if not verdict.accepted:
                    conv_reasons[verdict.reason] += 1
                    rejected.append(graph)
                    break
            else:
                verified.append(graph)
        conv_s = time.perf_counter() - t0
        sim_reasons, sim_times, accepted, seen = collections.Counter(), [], [], {}
        t0 = time.perf_counter()
        for graph in verified:
            result = seen.get(graph.hash()) or simulator.simulate(graph)  # the method reuses a verdict by hash
            if graph.hash() not in seen:
                sim_times.append(result.seconds)
            seen[graph.hash()] = result
            if result.accepted:
                accepted.append((graph, result))
            else:
                sim_reasons[result.reason] += 1
        sim_s = time.perf_counter() - t0
        sampled = rejected[:: max(1, args.simulate_rejected_every)]
        sampled_results = [simulator.simulate(g) for g in sampled]
        n, v, a = len(stream), len(verified), len(accepted)
        print(f"convergence checks: {n} candidates in {conv_s:.2f} s = {n / conv_s * 60:.0f} candidates/min "
              f"({conv_s / n * 1000:.1f} ms each); rejected {n - v}/{n} ({(n - v) / n:.1%}): "
              f"{dict(sorted(conv_reasons.items()))}")
        if v:
            print(f"simulation: {v} verified candidates in {sim_s:.1f} s = {v / sim_s * 60:.1f} candidates/min "
                  f"({len(sim_times)} simulated, {v - len(sim_times)} reused by hash); rejected {v - a}/{v} "
                  f"({(v - a) / v:.1%}): {dict(sorted(sim_reasons.items()))}")
        for graph, result in accepted[:5]:
            print(f"  accepted: AP {result.ap:.4f}  {graph.formula()!r}")
        funnel_s = conv_s + sim_s
        print(f"funnel: {n} candidates in {funnel_s:.1f} s = {n / funnel_s * 60:.1f} candidates/min; "
              f"accepted {a}/{n} ({a / n:.2%}), rejected {(n - a) / n:.1%}")
        all_sims = sim_times + [r.seconds for r in sampled_results]
        if not all_sims:
            print("no candidate was simulated: no ratio (raise --candidates)")
            return
        per_sim = sum(all_sims) / len(all_sims)
        would = sum(r.accepted for r in sampled_results)
        print(f"simulation alone: {per_sim:.2f} s per candidate over {len(all_sims)} simulations = "
              f"{60 / per_sim:.1f} candidates/min; of {len(sampled)} sampled convergence-rejected candidates the "
              f"simulation alone would have accepted {would} (their AP: "
              f"{', '.join(f'{r.ap:.4f}' if r.ap is not None else r.status for r in sampled_results)})")
        load = os.getloadavg()
        print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"ratio: {(n / funnel_s) / (1 / per_sim):.1f}x")


if __name__ == "__main__":
    main()
