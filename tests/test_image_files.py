"""One file to pixels (PNG, JPEG, TIFF, DICOM): grey vs colour, 16-bit scaling, resizing, stacking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedshift.common.dicom import write_dicom
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.image_files import IMAGE_SUFFIXES, is_image_file, read_image, stack_images
from fedshift.common.image_folders import load_image_folder, load_unlabeled_folder
from fedshift.common.manifest import load_manifest, manifest_images

RNG = np.random.default_rng(7)


def _pil_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """The reference resize: PIL bilinear of a uint8 grey or RGB array."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def _minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.rint((x - x.min()) / (x.max() - x.min()) * 255.0).astype(np.uint8)


def test_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"} == IMAGE_SUFFIXES


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_8bit_grey_is_pil_bilinear(tmp_path: Path, suffix: str) -> None:
    grey = RNG.integers(0, 256, (21, 17), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / f"g{suffix}")
    got = read_image(tmp_path / f"g{suffix}", 12)
    assert got.shape == (12, 12) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _pil_resize(grey, 12))
    with Image.open(tmp_path / f"g{suffix}") as im:  # what folders read before: bit-identical
        old = np.asarray(im.convert("L").resize((12, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, old)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_is_min_max_scaled(tmp_path: Path, suffix: str) -> None:
    deep = RNG.integers(1000, 60000, (16, 16), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / f"d{suffix}")
    with Image.open(tmp_path / f"d{suffix}") as im:
        assert im.mode.startswith("I")  # really stored 16-bit
    scaled = _minmax(deep)
    np.testing.assert_array_equal(read_image(tmp_path / f"d{suffix}", 16), scaled)
    np.testing.assert_array_equal(read_image(tmp_path / f"d{suffix}", 8), _pil_resize(scaled, 8))


def test_grey_stored_as_rgb_is_grey_and_colour_stays_colour(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (10, 10), dtype=np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    got = read_image(tmp_path / "grey_rgb.png", 10)
    assert got.shape == (10, 10)
    np.testing.assert_array_equal(got, grey)
    rgb = RNG.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got = read_image(tmp_path / "rgb.png", 6)
    assert got.shape == (6, 6, 3)
    np.testing.assert_array_equal(got, _pil_resize(rgb, 6))
    Image.fromarray(grey).convert("RGB").save(tmp_path / "grey.jpg", quality=95)
    assert read_image(tmp_path / "grey.jpg", 10).shape == (10, 10)  # a grey RGB JPEG stays grey


def test_alpha_and_palette(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 8), rgba[..., :3])  # alpha dropped
    la = RNG.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png", 8), la[..., 0])
    palette = np.array([[0, 0, 0], [200, 10, 30], [5, 250, 90]], np.uint8)
    index = RNG.integers(0, 3, (8, 8), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", 8), palette[index])


def test_dicom_is_read_and_resized(tmp_path: Path) -> None:
    stored = RNG.integers(0, 4096, (30, 30), dtype=np.uint16)
    write_dicom(tmp_path / "x.dcm", stored, bits_stored=12)
    np.testing.assert_array_equal(read_image(tmp_path / "x.dcm", 10), _pil_resize(_minmax(stored), 10))
    rgb = RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    write_dicom(tmp_path / "IM000001", rgb)  # PACS exports often have no suffix
    assert is_image_file(tmp_path / "IM000001")
    np.testing.assert_array_equal(read_image(tmp_path / "IM000001", 12), rgb)
    (tmp_path / "README").write_text("not an image")
    assert not is_image_file(tmp_path / "README")


def test_multi_page_tiff_needs_a_frame(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"m\.tif.*3 pages.*'frame' column"):
        read_image(tmp_path / "m.tif", 6)
    np.testing.assert_array_equal(read_image(tmp_path / "m.tif", 6, frame=1), np.full((6, 6), 20))
    with pytest.raises(DataError, match=r"frame in 0\.\.2"):
        read_image(tmp_path / "m.tif", 6, frame=5)


def test_corrupt_image_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"bad\.png.*cannot be decoded.*remove or replace") as info:
        read_image(tmp_path / "bad.png", 8)
    assert "\n" not in str(info.value)


def test_stack_images_shapes_and_mixed_error() -> None:
    grey = [np.full((4, 4), i, np.uint8) for i in range(3)]
    colour = [np.full((4, 4, 3), i, np.uint8) for i in range(2)]
    assert stack_images(grey, ["a", "b", "c"]).shape == (3, 4, 4)
    assert stack_images(colour, ["a", "b"]).shape == (2, 4, 4, 3)
    assert stack_images([], [], 4).shape == (0, 4, 4)
    with pytest.raises(
        DataError, match=r"grey-scale and colour images mixed in one dataset.*colour file d\.png"
    ):
        stack_images([grey[0], grey[1], colour[0], grey[2]], ["a.png", "b.png", "d.png", "e.png"])
    with pytest.raises(DataError, match=r"mixed in one dataset.*grey-scale file g\.png.*convert them all"):
        stack_images([colour[0], grey[0], colour[1]], ["c.png", "g.png", "k.png"])


def test_folders_read_tiff_and_dicom_and_refuse_mixed(tmp_path: Path) -> None:
    a = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    (tmp_path / "normal").mkdir()
    (tmp_path / "sick").mkdir()
    Image.fromarray(a).save(tmp_path / "normal" / "a.tif")
    write_dicom(tmp_path / "normal" / "b.dcm", a)
    write_dicom(tmp_path / "sick" / "1.2.840.99.7", 255 - a)
    ds = load_image_folder(tmp_path, image_size=8)
    train = ds.split("train")
    np.testing.assert_array_equal(train.labels, [0, 0, 1])
    np.testing.assert_array_equal(train.images, np.stack([a, a, 255 - a]))
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "sick" / "c.png")
    with pytest.raises(DataError, match=r"mixed in one dataset.*sick/c\.png"):
        load_image_folder(tmp_path, image_size=8)
    images, names = load_unlabeled_folder(tmp_path / "normal", image_size=8)
    assert names == ["a.tif", "b.dcm"] and images.shape == (2, 8, 8)


def test_image_size_is_checked(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "z.png")
    (tmp_path / "m.csv").write_text("path,label\nz.png,a\nz2.png,b\n")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "z2.png")
    readers = (
        lambda size: read_image(tmp_path / "z.png", size),
        lambda size: load_unlabeled_folder(tmp_path, image_size=size),
        lambda size: load_image_folder(tmp_path, image_size=size),
        lambda size: load_manifest(tmp_path / "m.csv", image_size=size, cache_dir=tmp_path / "c"),
        lambda size: manifest_images(tmp_path / "m.csv", size, cache_dir=tmp_path / "c"),
    )
    for read in readers:  # one check, check_image_size, for every reader
        for bad in (0, -3, 2.5, True, "64"):
            with pytest.raises(ConfigError, match=rf"image_size to be a positive integer, but got {bad!r}"):
                read(bad)


def _rgb_folder(root: Path, white_first: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Class folders of RGB tiles, one of them an all-white background tile; the files' pixels."""
    tiles = [RNG.integers(0, 256, (9, 9, 3), dtype=np.uint8) for _ in range(3)]
    white = np.full((9, 9, 3), 255, np.uint8)
    tiles = [white, *tiles] if white_first else [*tiles[:2], white, tiles[2]]
    for cls in ("normal", "tumour"):
        (root / cls).mkdir()
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(root / ("normal" if i < 2 else "tumour") / f"t{i}.png")
    return tiles, [_pil_resize(t, 6) for t in tiles]


@pytest.mark.parametrize("white_first", [True, False])
def test_a_white_tile_is_colour_in_a_colour_dataset(tmp_path: Path, white_first: bool) -> None:
    _, expected = _rgb_folder(tmp_path, white_first)
    images = load_image_folder(tmp_path, image_size=6).split("train").images
    assert images.shape == (4, 6, 6, 3)
    np.testing.assert_array_equal(images, np.stack(expected))  # PIL's own RGB resize of each file


def test_grey_as_rgb_is_grey_in_a_grey_dataset_and_one_channel_among_colour_is_mixed(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (9, 9), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(grey).save(tmp_path / "a" / "l.png")
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "a" / "rgb.png")
    images, _ = load_unlabeled_folder(tmp_path / "a", image_size=6)
    np.testing.assert_array_equal(images, np.stack([_pil_resize(grey, 6)] * 2))
    Image.fromarray(RNG.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match=r"\(1 grey-scale, 2 colour; first grey-scale file .*a/l\.png\)"):
        load_unlabeled_folder(tmp_path / "a", image_size=6)
