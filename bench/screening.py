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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
