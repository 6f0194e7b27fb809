"""The decode cache, counted: a warm call decodes nothing, touching one file re-decodes exactly that file,
changed settings decode everything, and the pixels read back equal a fresh decode."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedshift.common import decode_cache
from fedshift.common.decode_cache import decode_cached, default_cache_dir, manifest_dir
from fedshift.common.errors import DataError
from fedshift.common.image_files import read_image

N = 12


def _files(root: Path, n: int = N) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = root / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def _decode(files: list[Path], cache: Path, size: int = 16, frames: list[int | None] | None = None):  # type: ignore[no-untyped-def]
    return decode_cached(files, frames, image_size=size, cache_dir=cache, manifest=cache.parent / "m.csv")


def test_cold_then_warm_then_one_touched(tmp_path: Path) -> None:
    files, cache = _files(tmp_path), tmp_path / "cache"
    cold, s1 = _decode(files, cache)
    assert (s1.decoded, s1.cached, s1.pruned) == (N, 0, 0)
    assert cold.shape == (N, 16, 16) and cold.dtype == np.uint8
    expected = np.stack([read_image(f, 16) for f in files])
    assert np.array_equal(cold, expected)
    entries = sorted(manifest_dir(cache, tmp_path / "m.csv", 16).iterdir())
    assert len(entries) == N and all(e.suffix == ".npy" for e in entries)  # no temp files left behind
    warm, s2 = _decode(files, cache)
    assert (s2.decoded, s2.cached, s2.pruned) == (0, N, 0) and np.array_equal(warm, cold)
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _, s3 = _decode(files, cache)
    assert (s3.decoded, s3.cached, s3.pruned) == (1, N - 1, 1)


def test_a_rewritten_file_is_decoded_again_with_its_new_pixels(tmp_path: Path) -> None:
    files, cache = _files(tmp_path), tmp_path / "cache"
    _decode(files, cache)
    new = np.full((30, 20), 77, np.uint8)
    Image.fromarray(new).save(files[5])
    st = files[5].stat()
    os.utime(files[5], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    images, stats = _decode(files, cache)
    assert stats.decoded == 1 and np.all(images[5] == 77)


def test_changed_settings_decode_everything(tmp_path: Path) -> None:
    files, cache = _files(tmp_path), tmp_path / "cache"
    _decode(files, cache, size=16)
    images, stats = _decode(files, cache, size=12)
    assert (stats.decoded, stats.cached, stats.pruned) == (N, 0, 0)
    assert images.shape == (N, 12, 12)
    # the 16 px entries stay (a check at another size does not evict them)
    _, stats = _decode(files, cache, size=16)
    assert (stats.decoded, stats.cached) == (0, N)
    # a frame change is a setting of that file only
    frames: list[int | None] = [None] * N
    frames[2] = 0
    _, stats = _decode(files, cache, size=12, frames=frames)
    assert (stats.decoded, stats.cached, stats.pruned) == (1, N - 1, 1)


def test_entries_of_an_older_decoder_version_are_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, cache = _files(tmp_path, 4), tmp_path / "cache"
    _decode(files, cache)
    old = manifest_dir(cache, tmp_path / "m.csv", 16)
    monkeypatch.setattr(decode_cache, "DECODER_VERSION", decode_cache.DECODER_VERSION + 1)
    _, stats = _decode(files, cache)
    assert (stats.decoded, stats.pruned) == (4, 4) and not old.exists()
    assert manifest_dir(cache, tmp_path / "m.csv", 16).is_dir()


def test_a_damaged_entry_is_decoded_again_and_unlisted_ones_pruned(tmp_path: Path) -> None:
    files, cache = _files(tmp_path), tmp_path / "cache"
    cold, _ = _decode(files, cache)
    folder = manifest_dir(cache, tmp_path / "m.csv", 16)
    victim = sorted(folder.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    images, stats = _decode(files, cache)
    assert stats.decoded == 1 and np.array_equal(images, cold)
    _, stats = _decode(files[:-2], cache)
    assert (stats.decoded, stats.cached, stats.pruned) == (0, N - 2, 2)
    assert len(list(folder.iterdir())) == N - 2


def test_manifests_have_their_own_folders(tmp_path: Path) -> None:
    files, cache = _files(tmp_path, 3), tmp_path / "cache"
    decode_cached(files, None, image_size=8, cache_dir=cache, manifest=tmp_path / "a.csv")
    _, stats = decode_cached(files, None, image_size=8, cache_dir=cache, manifest=tmp_path / "b.csv")
    assert stats.decoded == 3
    assert len(list(cache.iterdir())) == 2  # one folder per manifest


def test_a_bad_file_names_its_row(tmp_path: Path) -> None:
    files, cache = _files(tmp_path, 3), tmp_path / "cache"
    files[1].write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as err:
        decode_cached(
            files, None, image_size=8, cache_dir=cache, manifest=tmp_path / "m.csv", names=["r1", "r2", "r3"]
        )
    assert str(err.value).startswith("r2: ") and "img01.png" in str(err.value)


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir(tmp_path / "state") == tmp_path / "state" / "decode-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(None) == tmp_path / "xdg" / "fedshift" / "decode"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir(None) == Path.home() / ".cache" / "fedshift" / "decode"


def test_worker_processes_decode_the_same_pixels(tmp_path: Path) -> None:
    files = _files(tmp_path)
    one, s1 = decode_cached(
        files, None, image_size=16, cache_dir=tmp_path / "c1", manifest=tmp_path / "m.csv"
    )
    two, s2 = decode_cached(
        files, None, image_size=16, cache_dir=tmp_path / "c2", manifest=tmp_path / "m.csv", workers=2
    )
    assert np.array_equal(one, two) and (s1.decoded, s2.decoded) == (N, N)
    _, warm = decode_cached(
        files, None, image_size=16, cache_dir=tmp_path / "c2", manifest=tmp_path / "m.csv"
    )
    assert (warm.decoded, warm.cached) == (0, N)  # the workers stored their entries
    files[7].write_bytes(b"broken")
    with pytest.raises(DataError, match=r"^row 8: .*img07.png"):
        decode_cached(
            files,
            None,
            image_size=16,
            cache_dir=tmp_path / "c3",
            manifest=tmp_path / "m.csv",
            names=[f"row {i + 1}" for i in range(N)],
            workers=2,
        )


@pytest.mark.parametrize("white_at", [0, 3])
def test_a_white_tile_in_a_colour_manifest_is_colour_cold_and_warm(tmp_path: Path, white_at: int) -> None:
    rng = np.random.default_rng(4)
    tiles = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(5)]
    tiles[white_at][:] = 255  # an all-white background tile: three equal channels
    files = []
    for i, tile in enumerate(tiles):
        files.append(tmp_path / f"t{i}.png")
        Image.fromarray(tile).save(files[-1])
    expected = np.stack(
        [np.asarray(Image.fromarray(t).resize((8, 8), Image.Resampling.BILINEAR)) for t in tiles]
    )
    cache = tmp_path / "cache"
    cold, s1 = _decode(files, cache, size=8)
    warm, s2 = _decode(files, cache, size=8)
    assert (s1.decoded, s2.cached) == (5, 5)
    np.testing.assert_array_equal(cold, expected)
    np.testing.assert_array_equal(warm, expected)
    grey = tmp_path / "grey.png"
    Image.fromarray(tiles[1][..., 0]).save(grey)  # a one-channel file among colour: mixed, cold and warm
    for _ in range(2):
        with pytest.raises(DataError, match=r"\(1 grey-scale, 5 colour; first grey-scale file .*grey\.png\)"):
            _decode([*files, grey], cache, size=8)


def test_a_grey_manifest_stored_as_rgb_stays_grey(tmp_path: Path) -> None:
    files = _files(tmp_path, 4)
    for f in files[:2]:  # two of them exported as RGB with equal channels
        grey = np.asarray(Image.open(f))
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(f)
    expected = np.stack(
        [np.asarray(Image.open(f).convert("L").resize((16, 16), Image.Resampling.BILINEAR)) for f in files]
    )
    for _ in range(2):  # cold, then from the cache
        images, _ = _decode(files, tmp_path / "cache")
        np.testing.assert_array_equal(images, expected)


def test_a_same_size_rewrite_that_keeps_its_mtime_is_decoded_again(tmp_path: Path) -> None:
    from fedshift.common.dicom import write_dicom

    file, cache = tmp_path / "a.dcm", tmp_path / "cache"
    write_dicom(file, np.zeros((32, 32), np.uint8))
    st = file.stat()
    _decode([file], cache)
    time.sleep(0.05)  # past the kernel's coarse ctime clock tick
    write_dicom(tmp_path / "b.dcm", np.full((32, 32), 200, np.uint8))
    with file.open("r+b") as f:  # rewritten in place (same inode, same size), as a copy tool would
        f.write((tmp_path / "b.dcm").read_bytes())
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p / rsync -a / tar keep the old mtime
    assert (file.stat().st_size, file.stat().st_mtime_ns, file.stat().st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    images, stats = _decode([file], cache)
    assert (stats.decoded, stats.cached) == (1, 0) and np.all(images == 200)


def test_an_unwritable_cache_dir_is_one_line_naming_it(tmp_path: Path) -> None:
    files = _files(tmp_path, 2)
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    cache = tmp_path / "blocker" / "cache"
    with pytest.raises(DataError) as err:
        _decode(files, cache)
    msg = str(err.value)
    assert "decode cache in" in msg and str(cache) in msg and "make the folder writable" in msg
    assert "XDG_CACHE_HOME" in msg and "\n" not in msg


def test_latest_cached_size_is_the_last_written(tmp_path: Path) -> None:
    files, cache, manifest = _files(tmp_path, 3), tmp_path / "cache", tmp_path / "m.csv"
    assert decode_cache.latest_cached_size(cache, manifest) is None
    _decode(files, cache, size=16)
    time.sleep(0.05)
    _decode(files, cache, size=24)
    assert decode_cache.latest_cached_size(cache, manifest) == 24
    time.sleep(0.05)
    _decode(files, cache, size=16)  # warm at 16: nothing written, 24 stays the latest
    assert decode_cache.latest_cached_size(cache, manifest) == 24
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(files[0])  # changed: decoded again at 16 px
    _decode(files, cache, size=16)
    assert decode_cache.latest_cached_size(cache, manifest) == 16
    assert decode_cache.latest_cached_size(cache, tmp_path / "other.csv") is None
