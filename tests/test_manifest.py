"""Manifests: the images equal their files' pixels, labels and columns as documented, and each bad input
gets its one-line error naming the row or file, the expectation and the fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedshift.common.data import load_dataset
from fedshift.common.dicom import write_dicom
from fedshift.common.errors import DataError
from fedshift.common.manifest import check_manifest, load_manifest, manifest_images, read_manifest
from fedshift.common.manifest_table import NEGATIVE_NAMES, order_class_names
from fedshift.common.patient_split import SPLIT_FILE


def _png(
    path: Path, value: int | np.ndarray, size: tuple[int, int] = (8, 8), rgb: bool = False
) -> np.ndarray:
    array = np.full(size, value, np.uint8) if isinstance(value, int) else value
    if rgb:
        array = np.stack([array, 255 - array, array // 2], axis=-1)
    Image.fromarray(array).save(path)
    return array


def _csv(root: Path, text: str, name: str = "m.csv") -> Path:
    (root / name).write_text(text)
    return root / name


def _two_classes(root: Path, n: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [_png(root / f"f{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8)) for i in range(n)]


def _load(manifest: Path, **kw: object):  # type: ignore[no-untyped-def]
    return load_manifest(manifest, image_size=8, cache_dir=manifest.parent / "cache", **kw)  # type: ignore[arg-type]


def test_images_equal_the_pngs_pixels_and_labels_follow_the_rows(tmp_path: Path) -> None:
    arrays = _two_classes(tmp_path)
    rows = "".join(
        f"f{i}.png,{'pneu' if i % 2 else 'clear'},P{i},{'train' if i < 6 else 'test'}\n" for i in range(10)
    )
    data = _load(_csv(tmp_path, "path,label,patient_id,split\n" + rows))
    assert data.class_names == ("clear", "pneu") and not data.synthetic and data.source.endswith("m.csv")
    assert sorted(data.splits) == ["test", "train"]
    train = data.split("train")
    assert np.array_equal(train.images, np.stack(arrays[:6]))
    assert train.labels.tolist() == [0, 1, 0, 1, 0, 1] and train.patients.tolist() == [
        f"P{i}" for i in range(6)
    ]
    assert np.array_equal(data.split("test").images, np.stack(arrays[6:]))


def test_resized_pixels_equal_pil_bilinear(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    big = [_png(tmp_path / f"b{i}.png", rng.integers(0, 256, (40, 30), dtype=np.uint8)) for i in range(4)]
    data = load_manifest(
        _csv(tmp_path, "path,label,split\n" + "".join(f"b{i}.png,{i % 2},train\n" for i in range(4))),
        image_size=16,
        cache_dir=tmp_path / "cache",
    )
    expected = [np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR)) for a in big]
    assert np.array_equal(data.split("train").images, np.stack(expected))


def test_dicom_frames_and_load_dataset_dispatch(tmp_path: Path) -> None:
    frames = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    write_dicom(tmp_path / "multi.dcm", frames, photometric="MONOCHROME2")
    write_dicom(tmp_path / "single.dcm", frames[0] + 100)
    manifest = _csv(tmp_path, "path,label,frame,split\nmulti.dcm,a,2,train\nsingle.dcm,b,,train\n")
    data = load_dataset(manifest, image_size=8, state_dir=tmp_path / "state")
    assert np.array_equal(data.split("train").images, np.stack([frames[2], frames[0] + 100]))
    assert (tmp_path / "state" / SPLIT_FILE).is_file() and (tmp_path / "state" / "decode-cache").is_dir()
    _csv(tmp_path, "path,label,split\nmulti.dcm,a,train\nsingle.dcm,b,train\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2 of m.csv\): multi.dcm: .*3 frames"):
        load_dataset(manifest, image_size=8, state_dir=tmp_path / "state")


def test_tsv_bom_semicolons_case_and_ignored_columns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arrays = _two_classes(tmp_path, 4)
    body = [("f0.png", "0"), ("f1.png", "2"), ("f2.png", "0"), ("f3.png", "2")]
    tsv = tmp_path / "m.tsv"
    tsv.write_bytes(
        ("\ufeffPath\tLabel\tNotes\n" + "".join(f"{p}\t{lab}\tx, y\n" for p, lab in body)).encode()
    )
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            data = _load(tsv, fractions=(1.0, 0.0, 0.0))
    assert data.class_names == ("class-0", "class-1", "class-2")  # an index gap is fine
    assert data.split("train").labels.tolist() == [0, 2, 0, 2]
    assert np.array_equal(data.split("train").images, np.stack(arrays))
    assert sum("Ignoring the columns ['notes']" in r.getMessage() for r in caplog.records) == 1
    semi = _csv(tmp_path, "path;label\n" + "".join(f"{p};{lab}\n" for p, lab in body), "semi.csv")
    assert _load(semi, fractions=(1.0, 0.0, 0.0)).split("train").labels.tolist() == [0, 2, 0, 2]


def test_known_class_names_fix_the_indices(tmp_path: Path) -> None:
    _two_classes(tmp_path, 4)
    manifest = _csv(
        tmp_path, "path,label,split\nf0.png,b,train\nf1.png,c,train\nf2.png,b,train\nf3.png,c,train\n"
    )
    data = _load(manifest, class_names=("a", "b", "c"))
    assert data.class_names == ("a", "b", "c") and data.split("train").labels.tolist() == [1, 2, 1, 2]


def test_a_negative_class_name_comes_first(tmp_path: Path) -> None:
    assert order_class_names({"normal", "abnormal"}) == ("normal", "abnormal")
    assert order_class_names(["Pneumonia", "No Finding", "Effusion"]) == (
        "No Finding",
        "Effusion",
        "Pneumonia",
    )
    assert order_class_names({"malignant", "benign"}) == ("benign", "malignant")
    assert order_class_names({"b", "a", "c"}) == ("a", "b", "c")
    assert NEGATIVE_NAMES.index("normal") < NEGATIVE_NAMES.index("benign")
    assert order_class_names({"benign", "normal", "x"}) == ("normal", "benign", "x")
    _two_classes(tmp_path, 4)
    rows = "".join(f"f{i}.png,{'normal' if i % 2 else 'abnormal'}\n" for i in range(4))
    data = _load(_csv(tmp_path, "path,label\n" + rows), fractions=(1.0, 0.0, 0.0))
    assert data.class_names == ("normal", "abnormal") and data.split("train").labels.tolist() == [1, 0, 1, 0]


def test_manifest_images_to_predict_on(tmp_path: Path) -> None:
    arrays = _two_classes(tmp_path, 4)
    images, ids, labels, names = manifest_images(
        _csv(tmp_path, "path,patient_id\nf2.png,P\nf0.png,Q\n"), 8, cache_dir=tmp_path / "cache"
    )
    assert np.array_equal(images, np.stack([arrays[2], arrays[0]]))
    assert ids == ["f2.png", "f0.png"] and labels is None and names is None
    text = "path,label,split\nf0.png,sick,train\nf1.png,sick,test\nf2.png,well,test\nf3.png,,val\n"
    with pytest.raises(DataError, match=r"a label in row 4 \(line 5 of m.csv\), but it is empty"):
        manifest_images(_csv(tmp_path, text), 8, cache_dir=tmp_path / "cache")
    text = text.replace(",,val", ",well,val")
    images, ids, labels, names = manifest_images(
        _csv(tmp_path, text), 8, split="test", cache_dir=tmp_path / "cache"
    )
    assert ids == ["f1.png", "f2.png"] and np.array_equal(images, np.stack(arrays[1:3]))
    assert labels is not None and labels.tolist() == [0, 1] and names == ("sick", "well")
    one = _csv(tmp_path, "path,label\nf0.png,well\n", "one.csv")
    _, _, labels, names = manifest_images(one, 8, cache_dir=tmp_path / "cache")
    assert labels is not None and labels.tolist() == [0] and names == ("well",)  # one class is fine
    _, _, labels, names = manifest_images(one, 8, cache_dir=tmp_path / "cache", class_names=("sick", "well"))
    assert labels is not None and labels.tolist() == [1] and names == ("sick", "well")
    with pytest.raises(DataError, match=r"rows with split 'holdout'.*\['test', 'train', 'val'\]"):
        manifest_images(_csv(tmp_path, text), 8, split="holdout", cache_dir=tmp_path / "cache")


def test_colour_pngs_stay_colour(tmp_path: Path) -> None:
    grey = [_png(tmp_path / f"c{i}.png", 40 * i, rgb=False) for i in range(4)]
    for i in range(4):
        _png(tmp_path / f"c{i}.png", grey[i], rgb=True)
    data = _load(
        _csv(tmp_path, "path,label,split\n" + "".join(f"c{i}.png,{i % 2},train\n" for i in range(4)))
    )
    images = data.split("train").images
    assert images.shape == (4, 8, 8, 3)
    assert np.array_equal(images[..., 1], 255 - np.stack(grey))


def test_check_manifest_summarises_and_writes_only_the_cache(tmp_path: Path) -> None:
    _two_classes(tmp_path, 10)
    rows = "".join(f"f{i}.png,{i % 2},P{i // 2}\n" for i in range(10))
    manifest = _csv(tmp_path, "path,label,patient_id\n" + rows)
    state = tmp_path / "state"
    summary = check_manifest(manifest, image_size=8, state_dir=state)
    assert summary.n_images == 10 and (summary.decoded, summary.cached) == (10, 0)
    assert sum(sum(c) for c in summary.counts.values()) == 10 and sum(summary.patients.values()) == 5
    assert summary.split_source == "new" and summary.has_patients and not summary.colour
    assert sorted(p.name for p in state.iterdir()) == ["decode-cache"]
    data = load_manifest(manifest, image_size=8, state_dir=state)
    assert {s: p.class_counts(2).tolist() for s, p in data.splits.items()} == {
        s: c for s, c in summary.counts.items() if sum(c)
    }
    again = check_manifest(manifest, image_size=8, state_dir=state)
    assert again.split_source == "saved" and again.cached == 10 and again.counts == summary.counts
    lines = again.lines()
    assert lines[0] == (
        f"manifest {manifest}: 10 grey-scale images readable (0 decoded, 10 from the cache), "
        "classes ['normal', 'abnormal']"
    )
    assert lines[1] == "split: saved (patient level)" and len(lines) == 5
    n, k = sum(again.counts["train"]), again.patients["train"]
    c0, c1 = again.counts["train"]
    assert lines[2] == f"  train: {n} images of {k} patients ({c0} normal, {c1} abnormal)"


# ------------------------------------------------------------------ bad input, one line each


def _error(tmp_path: Path, text: str, **kw: object) -> str:
    with pytest.raises(DataError) as err:
        _load(_csv(tmp_path, text), **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_file_names_its_row(tmp_path: Path) -> None:
    _two_classes(tmp_path, 2)
    msg = _error(tmp_path, "path,label\nf0.png,a\n\nsub/gone.png,b\nf1.png,b\n")
    assert "'sub/gone.png' of row 2 (line 4 of m.csv)" in msg and "correct the path" in msg


def test_corrupt_image_names_the_row_and_file(tmp_path: Path) -> None:
    _two_classes(tmp_path, 2)
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    msg = _error(tmp_path, "path,label\nf0.png,a\nbad.dcm,b\nf1.png,b\n")
    assert msg.startswith("row 2 (line 3 of m.csv): bad.dcm: ") and "bad.dcm" in msg[30:]


@pytest.mark.parametrize(
    ("rows", "kw", "expected"),
    [
        ("f0.png,a\nf1.png,\n", {}, r"a label in row 2 \(line 3 of m.csv\), but it is empty"),
        ("f0.png,a\nf1.png,1\n", {}, r"row 2 \(line 3 of m.csv\) has index '1' among names"),
        ("f0.png,a\nf1.png,zzz\n", {"class_names": ("a", "b")}, r"among \['a', 'b'\].*unknown label 'zzz'"),
        ("f0.png,0\nf1.png,5\n", {"class_names": ("a", "b")}, r"index below 2.*unknown label '5'"),
    ],
)
def test_unknown_labels(tmp_path: Path, rows: str, kw: dict[str, object], expected: str) -> None:
    _two_classes(tmp_path, 2)
    import re

    assert re.search(expected, _error(tmp_path, "path,label\n" + rows, **kw))


def test_unknown_split_value(tmp_path: Path) -> None:
    _two_classes(tmp_path, 2)
    msg = _error(tmp_path, "path,label,split\nf0.png,a,train\nf1.png,b,holdout\n")
    assert "one of ['train', 'val', 'test'] in row 2 (line 3 of m.csv), but got 'holdout'" in msg
    msg = _error(tmp_path, "path,label,split\nf0.png,a,train\nf1.png,b,\n")
    assert "a split (train/val/test) in row 2 (line 3 of m.csv), but it is empty" in msg


def test_duplicate_path(tmp_path: Path) -> None:
    _two_classes(tmp_path, 2)
    msg = _error(tmp_path, "path,label\nf0.png,a\nf1.png,b\n./f0.png,b\n")
    assert "row 3 (line 4 of m.csv) repeats './f0.png' of row 1 (line 2 of m.csv)" in msg
    assert "remove the duplicate row" in msg


@pytest.mark.parametrize("header", ["file,label", "path,class", "label"])
def test_missing_column(tmp_path: Path, header: str) -> None:
    _two_classes(tmp_path, 2)
    msg = _error(tmp_path, f"{header}\nf0.png,a\n")
    missing = "path" if "path" not in header else "label"
    assert f"a '{missing}' column in" in msg and f"header has {header.split(',')}" in msg


def test_single_class(tmp_path: Path) -> None:
    _two_classes(tmp_path, 3)
    msg = _error(tmp_path, "path,label\nf0.png,pneu\nf1.png,pneu\nf2.png,pneu\n")
    assert "at least 2 classes" in msg and "every row has label 'pneu'" in msg
    # a set to predict on may hold one class
    manifest = tmp_path / "m.csv"
    data = _load(manifest, require="test", fractions=(0.34, 0.0, 0.66))
    assert data.class_names == ("pneu",) and "test" in data.splits


def test_grey_and_colour_mixed(tmp_path: Path) -> None:
    _png(tmp_path / "g.png", 10)
    _png(tmp_path / "c1.png", np.full((8, 8), 10, np.uint8), rgb=True)
    _png(tmp_path / "g2.png", 20)
    msg = _error(tmp_path, "path,label\ng.png,a\nc1.png,b\ng2.png,b\n")
    assert "grey-scale and colour images mixed" in msg and "c1.png" in msg


@pytest.mark.parametrize("text", ["", "\n \n", "path,label\n", "path,label\n\n ,\n"])
def test_empty_manifest(tmp_path: Path, text: str) -> None:
    msg = _error(tmp_path, text)
    assert "at least one data row" in msg and "one image per row" in msg
    assert ("but it is empty" in msg) == (not text.strip())


def test_patient_in_two_splits(tmp_path: Path) -> None:
    _two_classes(tmp_path, 3)
    msg = _error(
        tmp_path, "path,label,patient_id,split\nf0.png,a,P1,train\nf1.png,b,P2,train\nf2.png,b,P1,test\n"
    )
    assert "patient 'P1' in one split" in msg and "row 1 (line 2 of m.csv) says 'train'" in msg
    assert "row 3 (line 4 of m.csv) says 'test'" in msg


def test_other_malformed_rows(tmp_path: Path) -> None:
    _two_classes(tmp_path, 2)
    assert "at most 2 cells in row 2" in _error(tmp_path, "path,label\nf0.png,a\nf1.png,b,c\n")
    assert "a patient_id in row 2" in _error(tmp_path, "path,label,patient_id\nf0.png,a,P\nf1.png,b,\n")
    assert "0-based frame number in row 1" in _error(
        tmp_path, "path,label,frame\nf0.png,a,first\nf1.png,b,\n"
    )
    assert "a file path in row 1" in _error(tmp_path, "path,label\n,a\nf1.png,b\n")
    assert "a 'train' split" in _error(tmp_path, "path,label,split\nf0.png,a,test\nf1.png,b,val\n")
    (tmp_path / "latin.csv").write_bytes("path,label\nf0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_manifest(tmp_path / "latin.csv")


def test_two_frames_of_one_file_are_two_rows(tmp_path: Path) -> None:
    frames = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    write_dicom(tmp_path / "cine.dcm", frames, photometric="MONOCHROME2")
    manifest = _csv(tmp_path, "path,label,frame,split\ncine.dcm,a,0,train\ncine.dcm,b,2,train\n")
    np.testing.assert_array_equal(_load(manifest).split("train").images, frames[[0, 2]])
    msg = _error(tmp_path, "path,label,frame\ncine.dcm,a,1\ncine.dcm,b,1\n")
    assert "row 2 (line 3 of m.csv) repeats frame 1 of 'cine.dcm' of row 1 (line 2 of m.csv)" in msg
