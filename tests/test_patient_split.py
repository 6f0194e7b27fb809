"""Patient-level splits, checked with numbers: no patient in two splits, per-class counts within +/-1 of
``fraction * n``, the same split across runs and a restart (a fresh process), a moved patient refused,
new patients assigned without moving old ones."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedshift.common.data import SPLITS
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.manifest import load_manifest
from fedshift.common.patient_split import SPLIT_FILE, check_fractions, group_labels, split_groups

FRACTIONS = (0.6, 0.2, 0.2)


def _within_one(
    index: np.ndarray, labels: np.ndarray, fractions: tuple[float, ...], bound: float = 1.0
) -> None:
    """Per class and split, the image count within ``bound`` of fraction * the class's images."""
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        for s, f in enumerate(fractions):
            got = int(np.sum((labels == c) & (index == s)))
            assert abs(got - f * n_c) < bound + 1e-9, (c, s, got, f * n_c)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fractions", [FRACTIONS, (0.7, 0.15, 0.15), (0.5, 0.5, 0.0)])
def test_one_image_per_group_is_within_one_per_class(seed: int, fractions: tuple[float, ...]) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 3, size=157)
    groups = np.asarray([f"g{i}" for i in range(len(labels))])
    index = split_groups(labels, groups, fractions, np.random.default_rng(seed))
    assert index.shape == labels.shape and set(index.tolist()) <= {0, 1, 2}
    _within_one(index, labels, fractions)
    if fractions[2] == 0:
        assert not np.any(index == 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_never_straddle_splits_and_images_are_stratified(seed: int) -> None:
    rng = np.random.default_rng(5 + seed)
    # 91 patients of 1 to 4 images each (the largest group: 4); a patient's images share its label
    sizes = rng.integers(1, 5, size=91)
    patient_label = rng.integers(0, 2, size=91)
    groups = np.repeat([f"P{i}" for i in range(91)], sizes)
    labels = np.repeat(patient_label, sizes)
    index = split_groups(labels, groups, FRACTIONS, np.random.default_rng(seed))
    for g in np.unique(groups):
        assert len(set(index[groups == g].tolist())) == 1
    # per class, the images per split are within the largest group's size of fraction * the class's images
    _within_one(index, labels, FRACTIONS, bound=float(sizes.max()))
    counts = [[int(np.sum((labels == c) & (index == s))) for s in range(3)] for c in (0, 1)]
    assert all(sum(row) == int(np.sum(labels == c)) for c, row in enumerate(counts))


def test_seeded_identical_and_seed_dependent() -> None:
    labels = np.arange(200) % 2
    groups = np.asarray([str(i // 2) for i in range(200)])
    a = split_groups(labels, groups, FRACTIONS, np.random.default_rng(7))
    b = split_groups(labels, groups, FRACTIONS, np.random.default_rng(7))
    c = split_groups(labels, groups, FRACTIONS, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(a, minlength=3).tolist() == [120, 40, 40]


def test_majority_label_with_ties_to_the_first_image() -> None:
    labels = np.asarray([1, 0, 0, 2, 1, 1, 0])
    groups = np.asarray(["a", "a", "a", "b", "b", "c", "c"])
    assert group_labels(labels, groups) == {"a": 0, "b": 2, "c": 1}


def test_fixed_groups_stay_and_count_toward_the_targets() -> None:
    labels = np.zeros(10, dtype=np.int64)
    labels[5:] = 1
    groups = np.asarray([f"g{i}" for i in range(10)])
    fixed = {"g0": 2, "g1": 2, "g5": 2}  # two class-0 and one class-1 image already in test
    index = split_groups(labels, groups, FRACTIONS, np.random.default_rng(0), fixed=fixed)
    assert index[0] == 2 and index[1] == 2 and index[5] == 2
    # the targets of test (1 image per class) are already met: no free group goes to test
    assert np.sum(index == 2) == 3
    assert np.sum((index == 0) & (labels == 0)) == 3  # target 3.0 of class 0 in train


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.6, 0.3, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions(bad: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match=r"fractions .* summing to 1"):
        check_fractions(bad)


# ----------------------------------------------------------------- through a manifest


def _write_manifest(
    root: Path, rows: Sequence[tuple[str, str, str, str | None]], name: str = "m.csv"
) -> Path:
    """Rows of (file, label, patient, split or None); a small PNG per new file."""
    with_split = any(r[3] is not None for r in rows)
    lines = ["path,label,patient_id" + (",split" if with_split else "")]
    for file, label, patient, split in rows:
        if not (root / file).exists():
            value = sum(map(ord, file)) % 256
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(root / file)
        lines.append(f"{file},{label},{patient}" + (f",{split}" if with_split else ""))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def _rows(n_patients: int, per: int = 2, start: int = 0) -> list[tuple[str, str, str, str | None]]:
    return [
        (f"p{p}_{k}.png", "sick" if p % 3 == 0 else "well", f"P{p}", None)
        for p in range(start, start + n_patients)
        for k in range(per)
    ]


def _assignment(dataset_splits: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {str(p): s for s, part in dataset_splits.items() for p in part.patients.tolist()}


def test_manifest_split_is_patient_level_and_saved(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, _rows(40))
    state = tmp_path / "state"
    data = load_manifest(manifest, image_size=8, state_dir=state, cache_dir=tmp_path / "cache")
    assignment = _assignment(data.splits)
    for s, part in data.splits.items():
        others = {p for t, q in data.splits.items() if t != s for p in q.patients.tolist()}
        assert not set(part.patients.tolist()) & others
    assert sum(len(p) for p in data.splits.values()) == 80
    saved = json.loads((state / SPLIT_FILE).read_text())
    assert saved["patients"] == assignment and saved["seed"] == 0
    # 14 sick patients (p % 3 == 0 of 0..39): per split within +/-1 patient of 0.6/0.2/0.2 of 14
    sick = {p for p in assignment if int(p[1:]) % 3 == 0}
    for s, f in zip(SPLITS, FRACTIONS, strict=True):
        assert abs(sum(assignment[p] == s for p in sick) - f * 14) < 1 + 1e-9


def test_split_identical_across_runs_seeds_and_a_restart(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, _rows(30))
    state, cache = tmp_path / "state", tmp_path / "cache"
    first = _assignment(load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache).splits)
    again = _assignment(
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache, seed=9).splits
    )
    assert again == first  # the saved split wins over another seed
    code = (
        "import json,sys; from pathlib import Path; from fedshift.common.manifest import load_manifest; "
        "d=load_manifest(Path(sys.argv[1]), image_size=8, state_dir=Path(sys.argv[2]), "
        "cache_dir=Path(sys.argv[3])); "
        "print(json.dumps({str(p): s for s, q in d.splits.items() for p in q.patients.tolist()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(manifest), str(state), str(cache)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first
    # without a state dir nothing is saved, and the same seed gives the same split
    fresh = tmp_path / "fresh"
    a = _assignment(load_manifest(manifest, image_size=8, cache_dir=cache, seed=3).splits)
    b = _assignment(load_manifest(manifest, image_size=8, cache_dir=cache, seed=3).splits)
    assert a == b and not fresh.exists()


def test_new_patients_join_without_moving_old_ones(tmp_path: Path) -> None:
    state, cache = tmp_path / "state", tmp_path / "cache"
    manifest = _write_manifest(tmp_path, _rows(20))
    before = _assignment(load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache).splits)
    _write_manifest(tmp_path, _rows(20) + _rows(10, start=20))
    after = _assignment(load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache).splits)
    assert {p: after[p] for p in before} == before
    assert set(after) - set(before) == {f"P{p}" for p in range(20, 30)}
    assert json.loads((state / SPLIT_FILE).read_text())["patients"] == after
    # a patient dropped from the manifest keeps its saved split
    _write_manifest(tmp_path, _rows(15))
    load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    assert json.loads((state / SPLIT_FILE).read_text())["patients"] == after


def test_a_moved_patient_is_refused_with_the_fix(tmp_path: Path) -> None:
    state, cache = tmp_path / "state", tmp_path / "cache"
    rows = [(f, lab, p, ["train", "val", "test", "train"][int(p[1:]) % 4]) for f, lab, p, _ in _rows(12)]
    manifest = _write_manifest(tmp_path, rows)
    data = load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    assert _assignment(data.splits) == {
        f"P{p}": ("train", "val", "test", "train")[p % 4] for p in range(12)
    }  # the column, as given
    saved = (state / SPLIT_FILE).read_bytes()
    moved = [(f, lab, p, "train" if p == "P2" else s) for f, lab, p, s in rows]
    _write_manifest(tmp_path, moved)
    with pytest.raises(DataError) as err:
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    msg = str(err.value)
    assert "patient 'P2'" in msg and "row 5 (line 6 of m.csv)" in msg
    assert "stay in split 'test'" in msg and "now puts it in 'train'" in msg
    assert "restore the row's split" in msg and f"delete {SPLIT_FILE}" in msg and "seen before" in msg
    assert "\n" not in msg and (state / SPLIT_FILE).read_bytes() == saved
    # dropping the split column keeps the saved split (no move): accepted
    _write_manifest(tmp_path, [(f, lab, p, None) for f, lab, p, _ in rows])
    again = load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    assert _assignment(again.splits) == _assignment(data.splits)


def test_no_patient_column_warns_once_and_uses_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(10):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / f"i{i}.png")
    manifest = tmp_path / "nopatients.csv"
    manifest.write_text("path,label\n" + "".join(f"i{i}.png,{i % 2}\n" for i in range(10)))
    with caplog.at_level("WARNING"):
        for _ in range(2):
            data = load_manifest(manifest, image_size=8, cache_dir=tmp_path / "cache")
    warned = [r for r in caplog.records if "leakage" in r.getMessage()]
    assert len(warned) == 1 and "patient_id" in warned[0].getMessage()
    assert sorted(p for s in data.splits.values() for p in s.patients.tolist()) == sorted(
        f"i{i}.png" for i in range(10)
    )
    assert data.class_names == ("normal", "abnormal")


def test_nothing_saved_when_a_file_fails_to_decode(tmp_path: Path) -> None:
    rows = _rows(6)
    manifest = _write_manifest(tmp_path, rows)
    (tmp_path / rows[-1][0]).write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"row 12 \(line 13 of m.csv\): p5_1.png"):
        load_manifest(manifest, image_size=8, state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "state" / SPLIT_FILE).exists()


def test_a_corrupt_split_file_is_refused(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, _rows(6))
    state = tmp_path / "state"
    state.mkdir()
    (state / SPLIT_FILE).write_text('{"patients": {"P0": "holdout"}}')
    with pytest.raises(DataError, match=rf"{SPLIT_FILE} to map patient ids .* delete {SPLIT_FILE}"):
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=tmp_path / "cache")


def _image_splits(dataset_splits: dict, rows: Sequence[tuple[str, str, str, str | None]]) -> list[str]:  # type: ignore[type-arg]
    """Each row's split, from the dataset's patients (a patient's images share one split)."""
    by_patient = _assignment(dataset_splits)
    return [by_patient[patient] for _, _, patient, _ in rows]


def test_removing_the_patient_column_keeps_each_image_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, cache = tmp_path / "state", tmp_path / "cache"
    rows = _rows(6)
    manifest = _write_manifest(tmp_path, rows)
    before = _image_splits(
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache).splits, rows
    )
    saved = json.loads((state / SPLIT_FILE).read_text())
    assert saved["images"] == {f: s for (f, *_), s in zip(rows, before, strict=True)}
    # the same files without the patient_id column: each image is its own patient, and keeps its split
    manifest.write_text("path,label\n" + "".join(f"{f},{lab}\n" for f, lab, _, _ in rows))
    with caplog.at_level("WARNING"):
        data = load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    assert not any("None of the" in r.getMessage() for r in caplog.records)
    assert _image_splits(data.splits, [(f, lab, f, None) for f, lab, _, _ in rows]) == before
    assert len(json.loads((state / SPLIT_FILE).read_text())["patients"]) == 6 + 12
    # a manifest of other files entirely shares nothing with the saved split: warned
    other = _write_manifest(tmp_path, _rows(6, start=50), name="other.csv")
    with caplog.at_level("WARNING"):
        load_manifest(other, image_size=8, state_dir=state, cache_dir=cache)
    assert any("None of the 18 patients saved" in r.getMessage() for r in caplog.records)


def test_adding_patient_id_that_would_move_an_image_is_refused(tmp_path: Path) -> None:
    state, cache = tmp_path / "state", tmp_path / "cache"
    rows = _rows(20)  # 2 images per patient
    manifest = tmp_path / "m.csv"
    _write_manifest(tmp_path, rows)
    manifest.write_text("path,label\n" + "".join(f"{f},{lab}\n" for f, lab, _, _ in rows))
    load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)  # each image its own patient
    saved_bytes = (state / SPLIT_FILE).read_bytes()
    images = json.loads(saved_bytes)["images"]
    straddling = [p for p in range(20) if images[f"p{p}_0.png"] != images[f"p{p}_1.png"]]
    assert straddling  # some patients' two images were split apart: adding patient_id would move one
    _write_manifest(tmp_path, rows)  # now with the patient_id column
    with pytest.raises(DataError) as err:
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    msg = str(err.value)
    first = min(straddling)
    assert f"patient 'P{first}'" in msg and f"image 'p{first}_" in msg and "\n" not in msg
    assert "saved split in a split column" in msg and f"delete {SPLIT_FILE}" in msg
    assert (state / SPLIT_FILE).read_bytes() == saved_bytes  # nothing written


def test_re_keyed_patients_keep_their_images_split(tmp_path: Path) -> None:
    state, cache = tmp_path / "state", tmp_path / "cache"
    rows = _rows(12)
    manifest = _write_manifest(tmp_path, rows)
    before = _image_splits(
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache).splits, rows
    )
    # one batch re-pseudonymised: P0..P5 get new ids, the others keep theirs
    rekeyed = [(f, lab, f"X{p[1:]}" if int(p[1:]) < 6 else p, s) for f, lab, p, s in rows]
    _write_manifest(tmp_path, rekeyed)
    data = load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    assert _image_splits(data.splits, rekeyed) == before
    # merging two patients of different splits into one id would move an image: refused
    a, b = next((i, j) for i in range(0, 24, 2) for j in range(0, 24, 2) if before[i] != before[j])
    merged = [
        (f, lab, rekeyed[a][2] if k in (b, b + 1) else p, s) for k, (f, lab, p, s) in enumerate(rekeyed)
    ]
    _write_manifest(tmp_path, merged)
    with pytest.raises(DataError) as err:
        load_manifest(manifest, image_size=8, state_dir=state, cache_dir=cache)
    moved = {rows[a][0], rows[a + 1][0], rows[b][0], rows[b + 1][0]}
    assert f"patient '{rekeyed[a][2]}'" in str(err.value) and "stay in split" in str(err.value)
    assert any(f"image '{f}'" in str(err.value) for f in moved)
