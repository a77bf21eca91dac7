"""Search splits: S_train / S_eval carved from the training ids, manifests written and read back."""

from __future__ import annotations

import pytest

from components.errors import LossforgeError
from components.tasks.splits import Split, SplitError, make_split, read_manifest, write_manifest, write_search_splits

IDS = [f"img_{k:03d}" for k in range(40)]


def test_split_is_deterministic_by_seed_disjoint_and_covers_the_ids():
    a = make_split(IDS, eval_count=10, seed=7)
    assert isinstance(a, Split)
    assert a == make_split(IDS, eval_count=10, seed=7)
    assert make_split(IDS, eval_count=10, seed=8).eval != a.eval
    assert len(a.eval) == 10 and len(a.train) == 30
    assert not set(a.train) & set(a.eval) and set(a.train) | set(a.eval) == set(IDS)
    # both parts keep the input order
    assert a.train == [i for i in IDS if i in set(a.train)]
    assert a.eval == [i for i in IDS if i in set(a.eval)]


def test_split_does_not_depend_on_the_input_order():
    forward = make_split(IDS, eval_count=5, seed=1)
    backward = make_split(IDS[::-1], eval_count=5, seed=1)
    assert set(forward.eval) == set(backward.eval)


def test_seeds_spread_the_held_out_ids():
    """Over many seeds every id is held out sometimes (no fixed block like 'the last 10')."""
    counts = {i: 0 for i in IDS}
    for seed in range(60):
        for i in make_split(IDS, eval_count=10, seed=seed).eval:
            counts[i] += 1
    assert min(counts.values()) > 0
    assert max(counts.values()) < 40  # expected 15 per id


@pytest.mark.parametrize("fraction, expected", [(0.25, 10), (0.14, 6), (0.01, 1), (0.5, 20)])
def test_sizes_for_a_fraction(fraction, expected):
    parts = make_split(IDS, eval_fraction=fraction, seed=0)
    assert len(parts.eval) == expected and len(parts.train) == len(IDS) - expected


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "exactly one"),
        ({"eval_count": 3, "eval_fraction": 0.1}, "exactly one"),
        ({"eval_fraction": 0.0}, "eval_fraction"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": -0.2}, "eval_fraction"),
        ({"eval_fraction": 0.99}, "leaves no training images"),
        ({"eval_count": 0}, "eval_count"),
        ({"eval_count": -3}, "eval_count"),
        ({"eval_count": 2.5}, "eval_count"),
        ({"eval_count": 40}, "leaves no training images"),
        ({"eval_count": 41}, "40"),
    ],
)
def test_bad_split_requests(kwargs, words):
    with pytest.raises(SplitError, match=words) as info:
        make_split(IDS, seed=0, **kwargs)
    assert isinstance(info.value, LossforgeError) and "\n" not in str(info.value)


def test_duplicate_ids_are_rejected():
    with pytest.raises(SplitError, match="duplicates"):
        make_split(IDS + ["img_003"], eval_count=2)


def test_manifest_round_trip(tmp_path):
    ids = ["b", "a_1", "2008_000123", "c"]
    path = write_manifest(tmp_path / "sub" / "m.txt", ids)
    assert path == tmp_path / "sub" / "m.txt"
    assert path.read_text() == "b\na_1\n2008_000123\nc\n"
    assert read_manifest(path) == ids
    assert [p.name for p in path.parent.iterdir()] == ["m.txt"]  # no temporary file left
    path.write_text("\n x \n\ny\n")  # blank lines and surrounding spaces are tolerated when reading
    assert read_manifest(path) == ["x", "y"]


def test_manifest_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.txt"
    with pytest.raises(SplitError, match=str(missing)):
        read_manifest(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SplitError, match=f"{empty}.*empty"):
        read_manifest(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(SplitError, match=f"{dup}.*duplicate"):
        read_manifest(dup)
    for bad in (["a b"], [""], [], ["a", "a"]):
        with pytest.raises(SplitError, match="w.txt"):
            write_manifest(tmp_path / "w.txt", bad)
    assert not (tmp_path / "w.txt").exists()


def test_write_search_splits(tmp_path):
    test_ids = ["val_1", "val_0"]
    paths = write_search_splits(IDS, test_ids, tmp_path / "splits", eval_fraction=0.25, seed=3)
    assert set(paths) == {"train", "eval", "test"}
    assert {p.name for p in paths.values()} == {"train.txt", "eval.txt", "test.txt"}
    train, held = read_manifest(paths["train"]), read_manifest(paths["eval"])
    expected = make_split(IDS, eval_fraction=0.25, seed=3)
    assert (train, held) == (expected.train, expected.eval)
    assert read_manifest(paths["test"]) == test_ids


@pytest.mark.parametrize(
    "train, test, kwargs, words",
    [
        (IDS, ["img_005", "val_0"], {"eval_count": 3}, "img_005"),  # test overlaps train
        (IDS, ["val_0"], {"eval_count": 3, "eval_fraction": 0.1}, "exactly one"),
        (IDS, ["val_0"], {"eval_count": 40}, "leaves no training images"),
        (IDS + ["img_000"], ["val_0"], {"eval_count": 3}, "duplicates"),
        (IDS, ["val_0", "val_0"], {"eval_count": 3}, "test.txt"),
        (IDS, [], {"eval_count": 3}, "test.txt"),
        (IDS, ["val 0"], {"eval_count": 3}, "whitespace"),
    ],
)
def test_write_search_splits_errors_write_nothing(tmp_path, train, test, kwargs, words):
    with pytest.raises(SplitError, match=words):
        write_search_splits(train, test, tmp_path / "splits", seed=0, **kwargs)
    assert not (tmp_path / "splits").exists()
