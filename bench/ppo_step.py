"""Benchmark: wall time per PPO step of the Auto Seg-Loss search with M parallel proxy trainings.

A PPO2 search (components.surrogates.ppo) over a surrogate of `--metric` runs `--steps` steps on the embedded shapes
dataset. In each step the M sampled surrogate losses (+ μ itself with the "mu" baseline) are trained side
by side in ONE `train_proxy` call (same batches, one data pipeline), then reported; the policy update runs.
For the first step the same candidates are also trained one `train_proxy` call at a time (sequential
reference). Also printed: the policy update time, and the cost of a surrogate loss forward+backward next
to cross-entropy on the same logits.

Prints per-step wall times, μ's reward per step, and as the last line
`ratio: <sequential time of step 0 / parallel time of step 0>x`.

    python bench/ppo_step.py                              # M=4, 2 steps, lite model, 40 iterations
    python bench/ppo_step.py --samples 8 --iterations 150 --steps 3 --compare-identity
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.surrogates.metric_surrogates import SurrogateLoss, SurrogateSpec  # noqa: E402
from components.surrogates.ppo import PPOConfig, PPOSearch  # noqa: E402
from components.tasks.segmentation.trainer import ProxyConfig, train_proxy  # noqa: E402
from components.tasks.segmentation.models import MODEL_PRESETS  # noqa: E402


def shapes_datasets(num_train: int, num_eval: int, size: int, seed: int):
    """(train, eval) SegmentationDatasets of a freshly generated embedded shapes dataset."""
    from components.tasks.segmentation.datasets import open_voc
    from components.tasks.segmentation.shapes import generate_shapes

    root = generate_shapes(Path(tempfile.mkdtemp(prefix="lf-ppo-bench-")) / "shapes", num_train=num_train,
                           num_test=num_eval, image_size=size, seed=seed)
    sets = root / "ImageSets" / "Segmentation"
    return open_voc(root, list_file=sets / "train.txt"), open_voc(root, list_file=sets / "val.txt")


def time_loss(loss_fn, logits, target, repeats: int = 5) -> float:
    """Seconds per forward+backward of `loss_fn` on `logits`."""
    best = float("inf")
    for _ in range(repeats):
        x = logits.detach().clone().requires_grad_()
        start = time.perf_counter()
        loss_fn(x, target).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metric", default="mIoU", help="target metric; 'mIoU+BF1' searches a combined surrogate")
    ap.add_argument("--samples", type=int, default=4, help="M samples per PPO step")
    ap.add_argument("--steps", type=int, default=2, help="PPO steps to time")
    ap.add_argument("--baseline", default="mu", choices=["mu", "mean"])
    ap.add_argument("--iterations", type=int, default=40, help="proxy training iterations")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="image size")
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--model", default="lite", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-identity", action="store_true",
                    help="after the search, train the identity θ and the best μ together and print both scores")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    metrics = {m.strip(): 1.0 for m in args.metric.split("+")}
    target_metric = next(iter(metrics))
    train_ds, eval_ds = shapes_datasets(args.train_images, args.eval_images, args.size, args.seed)
    n_cls = train_ds.num_classes
    cfg = ProxyConfig(model=MODEL_PRESETS[args.model], iterations=args.iterations, batch_size=args.batch_size,
                      device=args.device, seed=args.seed)
    search = PPOSearch(SurrogateSpec(metrics), PPOConfig(samples=args.samples, steps=args.steps,
                                                         baseline=args.baseline), seed=args.seed)
    print(f"metric {args.metric} ({search.dim} parameters), M={args.samples} (+μ: {args.baseline == 'mu'}), "
          f"model {args.model}, {args.iterations} iterations of batch {args.batch_size} at {args.size}², "
          f"{len(train_ds)} train / {len(eval_ds)} eval images, {torch.get_num_threads()} threads")

    # cost of the loss itself
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch_size, n_cls, args.size, args.size, generator=gen)
    target = torch.randint(0, n_cls, (args.batch_size, args.size, args.size), generator=gen)
    t_ce = time_loss(lambda x, y: F.cross_entropy(x, y, ignore_index=255), logits, target)
    t_sur = time_loss(SurrogateLoss(search.current_spec(), n_cls), logits, target)
    print(f"loss forward+backward on {tuple(logits.shape)}: cross-entropy {t_ce * 1e3:.1f} ms, "
          f"surrogate {t_sur * 1e3:.1f} ms")

    sequential = parallel0 = None
    while not search.done:
        cands = search.next_candidates()
        losses = {c.id: c.loss(n_cls) for c in cands}
        if sequential is None:
            start = time.perf_counter()
            for name, loss in losses.items():
                train_proxy({name: loss}, train_ds, eval_ds, cfg, target_metric, num_classes=n_cls)
            sequential = time.perf_counter() - start
        start = time.perf_counter()
        results = train_proxy(losses, train_ds, eval_ds, cfg, target_metric, num_classes=n_cls)
        t_train = time.perf_counter() - start
        start = time.perf_counter()
        for c in cands:
            search.report(c.id, results[c.id])
        t_update = time.perf_counter() - start
        parallel0 = parallel0 if parallel0 is not None else t_train
        step = search.policy_history[-1]
        print(f"step {step['step']}: {len(cands)} trainings in parallel {t_train:.1f} s, policy update "
              f"{t_update * 1e3:.0f} ms; μ reward {step['mu_reward']}, mean sample reward {step['mean_reward']:.4f}, "
              f"max {step['max_reward']:.4f}")
    print(f"step 0 trained one at a time: {sequential:.1f} s vs side by side {parallel0:.1f} s")

    if args.compare_identity:
        best = search.best_spec()
        final = {"identity": SurrogateLoss(search.template.identity(), n_cls), "best_mu": SurrogateLoss(best, n_cls)}
        res = train_proxy(final, train_ds, eval_ds, cfg, target_metric, num_classes=n_cls)
        print(f"S_eval {target_metric}: identity θ {res['identity'].target}, best μ {res['best_mu'].target} "
              f"(best: step {search.best()['step']})")
    print(f"ratio: {sequential / parallel0:.2f}x")


if __name__ == "__main__":
    main()
