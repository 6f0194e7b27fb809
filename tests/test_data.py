"""Tests for fedshift.common.data: npz and folder loading, synthetic CXR, tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from fedshift.common.data import (
    CLASS_NAMES_BINARY,
    Dataset,
    ImageSet,
    load_dataset,
    load_npz,
    make_synthetic_cxr,
    save_npz,
    to_tensor,
)
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.image_folders import load_image_folder

PNEUMONIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pneumoniamnist.npz"


def _image_set(n: int, size: int = 8, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 2
    return ImageSet(images=images, labels=labels)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# ----------------------------------------------------------------------------- ImageSet


def test_image_set_counts_subset_and_pooled() -> None:
    s = _image_set(7)
    assert len(s) == 7
    np.testing.assert_array_equal(s.class_counts(3), [4, 3, 0])
    sub = s.subset(np.array([1, 3]))
    np.testing.assert_array_equal(sub.images, s.images[[1, 3]])
    np.testing.assert_array_equal(sub.labels, [1, 1])
    ds = Dataset(
        splits={"val": _image_set(3, seed=1), "train": s},
        class_names=CLASS_NAMES_BINARY,
        source="/x/y.npz",
        synthetic=False,
    )
    pooled = ds.pooled()
    np.testing.assert_array_equal(pooled.images[:7], s.images)  # train first
    assert len(pooled) == 10
    assert ds.label == "y.npz"
    assert ds.num_classes == 2
    with pytest.raises(DataError, match=r"only \['train', 'val'\]"):
        ds.split("test")


def test_image_set_rejects_bad_arrays() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageSet(images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="2 images and 3 labels"):
        ImageSet(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64))


# ----------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path: Path) -> None:
    ds = Dataset(
        splits={"train": _image_set(10), "test": _image_set(4, seed=2)},
        class_names=("healthy", "sick"),
        source="mem",
        synthetic=True,
    )
    path = tmp_path / "round.npz"
    save_npz(path, ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round.npz"]  # no temp file left
    back = load_npz(path)
    assert sorted(back.splits) == ["test", "train"]
    for name, subset in ds.splits.items():
        np.testing.assert_array_equal(back.split(name).images, subset.images)
        np.testing.assert_array_equal(back.split(name).labels, subset.labels)
        assert back.split(name).labels.dtype == np.int64
    assert back.class_names == ("healthy", "sick")
    assert back.synthetic is True
    assert back.label == "round.npz (SYNTHETIC)"
    with np.load(path) as raw:
        assert raw["train_labels"].shape == (10, 1)


def test_save_npz_without_suffix_writes_exact_path(tmp_path: Path) -> None:
    ds = Dataset(splits={"train": _image_set(4)}, class_names=CLASS_NAMES_BINARY, source="m", synthetic=False)
    save_npz(tmp_path / "plain", ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    np.testing.assert_array_equal(
        load_npz(tmp_path / "plain").split("train").images, ds.split("train").images
    )


def test_npz_rgb_stays_rgb_and_one_channel_stays_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, train_images=rgb, train_labels=np.array([[0], [1], [0], [1]], np.uint8))
    ds = load_npz(path)
    np.testing.assert_array_equal(ds.split("train").images, rgb)
    assert ds.channels == 3
    np.savez(path, train_images=rgb[..., :1], train_labels=np.array([0, 1, 0, 1]))
    grey = load_npz(path)
    np.testing.assert_array_equal(grey.split("train").images, rgb[..., 0])
    assert grey.channels == 1


def test_npz_float_whole_labels_accepted(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    images = np.zeros((3, 4, 4, 1), np.uint8)
    np.savez(path, train_images=images, train_labels=np.array([[0.0], [1.0], [1.0]]))
    ds = load_npz(path)
    np.testing.assert_array_equal(ds.split("train").labels, [0, 1, 1])
    assert ds.split("train").labels.dtype == np.int64
    assert ds.split("train").images.shape == (3, 4, 4)
    assert ds.class_names == CLASS_NAMES_BINARY


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.array([0.0, 0.5, 1.0]), "non-integer label 0.5"),
        (np.array(["a", "b", "a"]), "non-numeric dtype"),
        (np.array([0, -1, 1]), "negative label -1"),
        (np.array([1, 1, 1]), "at least 2 classes"),
        (np.array([0, 1]), "3 images and 2 labels"),
    ],
)
def test_npz_bad_labels(tmp_path: Path, labels: np.ndarray, pattern: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=labels)
    with pytest.raises(DataError, match=pattern):
        load_npz(path)


def test_npz_corrupt_missing_and_wrong_keys(tmp_path: Path) -> None:
    corrupt = tmp_path / "x.npz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match=r"x\.npz.*not an \.npz"):
        load_npz(corrupt)
    truncated = tmp_path / "t.npz"
    np.savez(truncated, train_images=np.zeros((50, 8, 8), np.uint8), train_labels=np.arange(50) % 2)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match=r"valid \.npz"):
        load_npz(truncated)
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=r"No such data file: .*nope\.npz; pass --data"):
        load_npz(missing)
    with pytest.raises(DataError, match="No such data file"):
        load_dataset(missing)
    single = tmp_path / "single.npz"
    with single.open("wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_npz(single)
    with pytest.raises(DataError, match="is a directory"):
        load_npz(tmp_path)
    wrong = tmp_path / "w.npz"
    np.savez(wrong, x=np.zeros(3))
    with pytest.raises(DataError, match=r"keys \['x'\]"):
        load_npz(wrong)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    other = tmp_path / "data.txt"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match=r"suffix '\.txt'"):
        load_dataset(other)
    syn = load_dataset(None, synthetic_n=30, seed=3)
    assert syn.synthetic and len(syn.split("train")) == 30
    assert syn.split("train").images.shape[1:] == (28, 28)


# ----------------------------------------------------------------------------- folders


def test_image_folder_two_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = np.repeat(rng.integers(0, 256, size=(20, 30, 1), dtype=np.uint8), 3, axis=2)  # grey as RGB
    _write_png(tmp_path / "normal" / "a.png", rgb)
    _write_png(tmp_path / "normal" / "b.png", np.full((10, 10), 7, np.uint8))
    for i in range(3):
        _write_png(tmp_path / "pneumonia" / f"{i}.png", np.full((12, 12), 200, np.uint8))
    (tmp_path / "pneumonia" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, image_size=16)
    assert ds.class_names == ("normal", "pneumonia")
    assert list(ds.splits) == ["train"]
    train = ds.split("train")
    np.testing.assert_array_equal(train.class_counts(2), [2, 3])
    assert train.images.shape == (5, 16, 16)
    with Image.open(tmp_path / "normal" / "a.png") as im:
        ref = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(train.images[0], ref)
    np.testing.assert_array_equal(train.images[4], np.full((16, 16), 200, np.uint8))
    assert load_dataset(tmp_path, image_size=16).split("train").images.shape == (5, 16, 16)


def test_image_folder_split_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("b_sick", "a_well"):
            for i in range(n):
                _write_png(tmp_path / split / cls / f"{i}.jpg", np.full((8, 8), 50, np.uint8))
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.class_names == ("a_well", "b_sick")
    assert sorted(ds.splits) == ["train", "val"]
    np.testing.assert_array_equal(ds.split("train").class_counts(2), [3, 3])
    np.testing.assert_array_equal(ds.split("val").class_counts(2), [1, 1])


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_png(tmp_path / "only" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"at least 2 class folders.*found 1 \('only'\)"):
        load_image_folder(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="directory"):
        load_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "y").mkdir()
    with pytest.raises(DataError, match="found none"):
        load_image_folder(empty)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_counts_determinism_and_label() -> None:
    ds = make_synthetic_cxr(101, prevalence=0.3, size=28, seed=5)
    train = ds.split("train")
    assert train.images.shape == (101, 28, 28)
    assert train.images.dtype == np.uint8
    assert int(train.labels.sum()) == round(101 * 0.3)
    assert ds.synthetic is True
    assert "SYNTHETIC" in ds.label
    assert ds.class_names == CLASS_NAMES_BINARY
    same = make_synthetic_cxr(101, prevalence=0.3, size=28, seed=5).split("train")
    np.testing.assert_array_equal(same.images, train.images)
    np.testing.assert_array_equal(same.labels, train.labels)
    other = make_synthetic_cxr(101, prevalence=0.3, size=28, seed=6).split("train")
    assert not np.array_equal(other.images, train.images)
    assert not np.array_equal(other.labels, train.labels)
    with pytest.raises(ConfigError, match="prevalence"):
        make_synthetic_cxr(10, prevalence=1.5)


def test_synthetic_is_learnable_but_not_by_mean_intensity() -> None:
    train = make_synthetic_cxr(800, prevalence=0.5, size=28, seed=0).split("train")
    x = train.images.reshape(len(train), -1).astype(np.float64) / 255.0
    y = train.labels
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    auc = cross_val_score(LogisticRegression(C=1.0, solver="liblinear"), x, y, cv=cv, scoring="roc_auc")
    assert auc.mean() > 0.75
    assert roc_auc_score(y, x.mean(axis=1)) < 0.8


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_shape_range_and_constant_resize() -> None:
    images = np.stack(
        [np.full((28, 28), 0, np.uint8), np.full((28, 28), 255, np.uint8), np.full((28, 28), 51, np.uint8)]
    )
    t = to_tensor(images, 64)
    assert tuple(t.shape) == (3, 1, 64, 64)
    assert str(t.dtype) == "torch.float32"
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    np.testing.assert_allclose(t[2].numpy(), 0.2, atol=1e-6)
    down = to_tensor(images, 14)
    np.testing.assert_allclose(down[2].numpy(), 0.2, atol=1e-6)
    same = to_tensor(images, 28)
    np.testing.assert_array_equal(same[:, 0].numpy() * 255.0, images.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        to_tensor(images.astype(np.float32), 28)


# ----------------------------------------------------------------------------- real data


def test_pneumoniamnist_matches_readme() -> None:
    if not PNEUMONIA.is_file():
        pytest.skip(f"PneumoniaMNIST not found at {PNEUMONIA} (shared data is optional)")
    ds = load_dataset(PNEUMONIA)
    assert ds.label == "pneumoniamnist.npz" and ds.synthetic is False
    assert sorted(ds.splits) == ["train", "val"]
    train, val = ds.split("train"), ds.split("val")
    assert train.images.shape == (4707, 28, 28)
    np.testing.assert_array_equal(train.class_counts(2), [1213, 3494])
    assert val.images.shape == (524, 28, 28)
    np.testing.assert_array_equal(val.class_counts(2), [135, 389])
    assert ds.class_names == CLASS_NAMES_BINARY
