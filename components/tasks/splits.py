"""Search splits: S_train / S_eval carved from the training images, written as id manifests.

AutoLoss-Zero searches on S_train, scores proxy trainings on S_eval (1500 images of VOC train), and
touches the real validation/test set only in the final re-training. Manifests are small text files
(one id per line) so DVC can version them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from components.errors import LossforgeError


class SplitError(LossforgeError):
    """Invalid split request or manifest."""


@dataclass(frozen=True)
class Split:
    """Disjoint id lists: `train` (S_train) and `eval` (S_eval), each in the input order."""

    train: list[str]
    eval: list[str]


def make_split(
    ids: Sequence[str],
    eval_count: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> Split:
    """Hold out `eval_count` ids (or `eval_fraction` of them, rounded, at least 1) as S_eval, seeded."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise SplitError("split: the id list has duplicates")
    if (eval_count is None) == (eval_fraction is None):
        raise SplitError("split: give exactly one of eval_count and eval_fraction")
    if eval_fraction is not None:
        if not 0.0 < float(eval_fraction) < 1.0:
            raise SplitError(f"split.eval_fraction: must be in (0, 1) (got {eval_fraction})")
        eval_count = max(1, round(len(ids) * float(eval_fraction)))
    assert eval_count is not None
    if int(eval_count) != eval_count or eval_count < 1:
        raise SplitError(f"split.eval_count: must be a positive integer (got {eval_count})")
    if eval_count >= len(ids):
        raise SplitError(
            f"split.eval_count: {eval_count} leaves no training images (the training set has {len(ids)})")
    held = set(random.Random(seed).sample(sorted(ids), int(eval_count)))
    return Split(train=[i for i in ids if i not in held], eval=[i for i in ids if i in held])


def _check_manifest_ids(path: Path, ids: Sequence[str]) -> None:
    """Refuse what read_manifest would refuse: no ids, an empty/whitespace id, duplicates."""
    if not ids:
        raise SplitError(f"{path}: refusing to write an empty split manifest")
    bad = [i for i in ids if not i or any(c.isspace() for c in i)]
    if bad:
        raise SplitError(f"{path}: ids must be non-empty and contain no whitespace (got {bad[0]!r})")
    if len(set(ids)) != len(ids):
        raise SplitError(f"{path}: duplicate ids")


def write_manifest(path: str | os.PathLike, ids: Sequence[str]) -> Path:
    """Write ids one per line (atomically); returns the path. Empty, blank or duplicated ids are a SplitError."""
    path = Path(path)
    ids = list(ids)
    _check_manifest_ids(path, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> list[str]:
    """Ids from a manifest; missing, empty or duplicated entries are a SplitError naming the file."""
    path = Path(path)
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise SplitError(f"{path}: split manifest not found (run `lossforge data split` first)") from None
    if not ids:
        raise SplitError(f"{path}: split manifest is empty")
    if len(set(ids)) != len(ids):
        raise SplitError(f"{path}: split manifest has duplicate ids")
    return ids


def _hold_out_test(ids: list[str], eval_count: int | None, eval_fraction: float | None,
                   seed: int) -> tuple[list[str], list[str]]:
    """(training ids, test ids) of an unsplit dataset: eval_count images, or eval_fraction of all of them, are
    the test set; S_eval gets as many from the rest."""
    held = make_split(ids, eval_count=eval_count, eval_fraction=eval_fraction, seed=seed + 1)
    if len(held.train) <= len(held.eval):
        raise SplitError(f"split: {len(ids)} images in one unsplit set are too few to hold out a test set and S_eval "
                         f"of {len(held.eval)} images each")
    return held.train, held.eval


def write_search_splits(
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    out_dir: str | os.PathLike,
    eval_count: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `train.txt` (S_train), `eval.txt` (S_eval) and `test.txt` (held-out set) into `out_dir`.

    Every input is checked first, so a SplitError leaves `out_dir` untouched. A dataset without splits (one
    images/ + masks/ folder: the same ids as training and test set) gets its test set held out first, as many
    images as S_eval (seed + 1), then S_eval from the rest."""
    out = Path(out_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise SplitError(f"{folder}: exists and is not a folder (the split manifests go in {out}/)")
    planned = plan_search_splits(train_ids, test_ids, eval_count=eval_count, eval_fraction=eval_fraction, seed=seed)
    for name, ids in planned.items():
        _check_manifest_ids(out / f"{name}.txt", ids)  # all checks before the first file is written
    return {name: write_manifest(out / f"{name}.txt", ids) for name, ids in planned.items()}


def plan_search_splits(
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    eval_count: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The ids `write_search_splits` writes ("train", "eval", "test"), with its checks, writing nothing (so a run
    can check S_train against the batch size before the split stage overwrites the manifests)."""
    if list(train_ids) and set(train_ids) == set(test_ids):
        train_ids, test_ids = _hold_out_test(list(train_ids), eval_count, eval_fraction, seed)
        eval_count, eval_fraction = len(test_ids), None  # S_eval as large as the test set
    overlap = set(train_ids) & set(test_ids)
    if overlap:
        raise SplitError(f"split: {len(overlap)} id(s) are both in the training and the test set, "
                         f"e.g. {sorted(overlap)[0]!r}")
    parts = make_split(train_ids, eval_count=eval_count, eval_fraction=eval_fraction, seed=seed)
    return {"train": parts.train, "eval": parts.eval, "test": list(test_ids)}
