"""Per-loss throughput of a wave of M proxy trainings vs the same M losses trained one at a time.

    .venv/bin/python bench/proxy.py [--models 16] [--iterations 40] [--size 32] [--data PATH] [--device cpu]
    .venv/bin/python bench/proxy.py --model lite      # the old side-by-side loop of DeepLabV3+ models

"Wave" is one ``train_proxy`` call with M losses on the CPU proxy model (``cpu_unet``): the M models are
the members of one grouped network, so each iteration is one forward/backward for all of them, and each
batch is loaded, resized and flipped once. "Apart" is M calls with one loss each. Throughput counts
training images seen by all models per second (evaluation included in the time). Prints both and,
as the last line, ``ratio: <together/apart>x``. The embedded shapes data is generated into a temporary
folder (or ``--data`` names a VOC-layout dataset) and read through the project's dataset reader when
that is available, so image decoding is part of the cost as in a real run. On a shared machine the
numbers move with the load: compare figures from one run only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from components.tasks.loss_registry import build_loss  # noqa: E402
from components.tasks.segmentation.trainer import ProxyConfig, train_proxy  # noqa: E402
from components.tasks.segmentation.models import model_preset  # noqa: E402

LOSSES = ("ce", "dice", "focal", "soft_iou", "lovasz", "weighted_ce", "soft_iou_binary")


class _RenderedScenes(Dataset):
    """Shapes scenes rendered in memory (used only when the dataset readers are not installed)."""

    def __init__(self, n: int, size: int, seed: int):
        from components.tasks.segmentation.shapes import SHAPES_CLASSES, render_scene

        rng = np.random.default_rng(seed)
        scenes = [render_scene(rng, size) for _ in range(n)]
        self.items = [(torch.from_numpy(s.image).permute(2, 0, 1).float() / 255,
                       torch.from_numpy(s.labels.astype(np.int64))) for s in scenes]
        self.num_classes = len(SHAPES_CLASSES)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _datasets(args, tmp: Path):
    try:
        from components.tasks.segmentation.datasets import open_voc
    except ImportError:
        print("dataset readers not available: using in-memory rendered scenes (no decoding cost)")
        return _RenderedScenes(args.train, args.size, 0), _RenderedScenes(args.eval, args.size, 1)
    root = Path(args.data) if args.data else None
    if root is None:
        from components.tasks.segmentation.shapes import generate_shapes

        root = generate_shapes(tmp / "shapes", num_train=args.train, num_test=args.eval, image_size=args.size, seed=0)
    return (open_voc(root, list_file=root / "ImageSets/Segmentation/train.txt"),
            open_voc(root, list_file=root / "ImageSets/Segmentation/val.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16, help="M, the number of losses/models")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="image and model input size")
    parser.add_argument("--model", default="cpu_unet", help="model preset (cpu_unet: waves; lite: a loop of models)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo gives each worker one)")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--data", default=None, help="a VOC-layout dataset instead of the generated shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--encoder", default=None, help="override the lite preset's encoder (e.g. resnet50 on a GPU)")
    args = parser.parse_args()
    names = [LOSSES[i % len(LOSSES)] for i in range(args.models)]
    names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]

    torch.set_num_threads(args.threads)
    model = model_preset(args.model, input_size=args.size)
    if args.encoder:
        model = model_preset(args.model, input_size=args.size, encoder=args.encoder, decoder_channels=256)
    optimizer = "adamw" if model.name == "unet" else "sgd"
    cfg = ProxyConfig(model=model, iterations=args.iterations, batch_size=args.batch_size, device=args.device,
                      num_workers=args.workers, optimizer=optimizer, lr=0.01 if optimizer == "adamw" else 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        train, evaluation = _datasets(args, Path(tmp))

        def losses(selected):
            return {n: build_loss(n.split("#")[0]) for n in selected}

        train_proxy(losses(names[:1]), train, evaluation, ProxyConfig(**{**cfg.__dict__, "iterations": 2}))  # warm-up
        start = time.perf_counter()
        together = train_proxy(losses(names), train, evaluation, cfg)
        t_together = time.perf_counter() - start

        start = time.perf_counter()
        apart = {}
        for n in names:
            apart.update(train_proxy(losses([n]), train, evaluation, cfg))
        t_apart = time.perf_counter() - start

    gap = max(abs((together[n].final_loss or 0) - (apart[n].final_loss or 0)) for n in names)
    images = args.models * args.iterations * args.batch_size
    print(f"device={args.device} models={args.models} iterations={args.iterations} batch={args.batch_size} "
          f"size={args.size} model={args.model} threads={args.threads}")
    print(f"wave:     {t_together:.2f} s  {images / t_together:.1f} images/s  "
          f"{args.models * args.iterations / t_together:.2f} model-iterations/s")
    print(f"apart:    {t_apart:.2f} s  {images / t_apart:.1f} images/s  "
          f"{args.models * args.iterations / t_apart:.2f} model-iterations/s")
    print(f"largest final-loss difference wave vs apart (float tolerance): {gap:.2e}")
    print(f"ratio: {t_apart / t_together:.2f}x")


if __name__ == "__main__":
    main()
