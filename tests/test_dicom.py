"""DICOM display pixels: files written with pydicom from known arrays, read back and compared with an
independent numpy computation of the DICOM PS3.3 C.11 transforms (within 1 grey level)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from fedshift.common.dicom import read_dicom, window, write_dicom
from fedshift.common.errors import DataError

RNG = np.random.default_rng(13)


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) to 0..255, written out as the standard's three cases."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    mid = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.select([x <= lo, x > hi], [0.0, 255.0], mid)


def _linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 (LINEAR_EXACT) to 0..255."""
    mid = ((x - c) / w + 0.5) * 255.0
    return np.select([x <= c - w / 2, x > c + w / 2], [0.0, 255.0], mid)


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(np.int64) - np.rint(expected).astype(np.int64)).max() <= 1


def test_monochrome2_8bit_is_used_as_is(tmp_path: Path) -> None:
    stored = RNG.integers(0, 256, (17, 23), dtype=np.uint8)
    write_dicom(tmp_path / "a.dcm", stored)
    np.testing.assert_array_equal(read_dicom(tmp_path / "a.dcm"), stored)


def test_monochrome1_16bit_rescale_and_window(tmp_path: Path) -> None:
    stored = RNG.integers(0, 4096, (20, 20), dtype=np.uint16)
    elements = {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    write_dicom(tmp_path / "ct.dcm", stored, photometric="MONOCHROME1", bits_stored=16, elements=elements)
    hu = stored.astype(np.float64) * 0.5 - 1024
    expected = 255.0 - _linear(hu, 40, 400)
    got = read_dicom(tmp_path / "ct.dcm")
    _close(got, expected)
    assert 0 < (got == 255).sum() < got.size  # the window clips part of the image


def test_12bit_signed_linear_exact_uses_first_window(tmp_path: Path) -> None:
    stored = RNG.integers(-2048, 2048, (16, 16), dtype=np.int16)
    elements = {"WindowCenter": [100, 900], "WindowWidth": [700, 50], "VOILUTFunction": "LINEAR_EXACT"}
    write_dicom(tmp_path / "s.dcm", stored, bits_stored=12, elements=elements)
    assert dcmread(tmp_path / "s.dcm").PixelRepresentation == 1
    _close(read_dicom(tmp_path / "s.dcm"), _linear_exact(stored.astype(np.float64), 100, 700))


def test_sigmoid_window(tmp_path: Path) -> None:
    stored = RNG.integers(0, 1024, (8, 8), dtype=np.uint16)
    elements = {"WindowCenter": 500, "WindowWidth": 300, "VOILUTFunction": "SIGMOID"}
    write_dicom(tmp_path / "g.dcm", stored, bits_stored=10, elements=elements)
    expected = 255.0 / (1.0 + np.exp(-4.0 * (stored - 500.0) / 300.0))  # PS3.3 C.11.2.1.3.1
    _close(read_dicom(tmp_path / "g.dcm"), expected)


def test_window_linear_width_one_is_a_threshold() -> None:
    np.testing.assert_array_equal(window(np.array([9.0, 9.5, 10.0]), 10, 1), [0.0, 0.0, 255.0])


def test_voi_lut_sequence_is_scaled_from_its_entry_depth(tmp_path: Path) -> None:
    stored = RNG.integers(0, 1024, (12, 12), dtype=np.uint16)
    lut = np.sort(RNG.integers(0, 4096, 256)).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 100, 12])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    write_dicom(tmp_path / "v.dcm", stored, bits_stored=10, elements={"VOILUTSequence": Sequence([item])})
    expected = lut[np.clip(stored.astype(np.int64) - 100, 0, 255)] * 255.0 / 4095.0
    _close(read_dicom(tmp_path / "v.dcm"), expected)


def test_deep_data_without_voi_is_min_max_scaled(tmp_path: Path) -> None:
    stored = RNG.integers(300, 3000, (10, 14), dtype=np.uint16)
    write_dicom(tmp_path / "d.dcm", stored, bits_stored=12)
    x = stored.astype(np.float64)
    _close(read_dicom(tmp_path / "d.dcm"), (x - x.min()) / (x.max() - x.min()) * 255.0)


def test_rgb_and_ybr_full_colour(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    write_dicom(tmp_path / "rgb.dcm", rgb)
    np.testing.assert_array_equal(read_dicom(tmp_path / "rgb.dcm"), rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    got = read_dicom(tmp_path / "ybr.dcm")
    assert got.shape == rgb.shape and np.abs(got.astype(int) - rgb).max() <= 2  # two 8-bit roundings


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_lossless_matches_the_transform(tmp_path: Path, syntax: str) -> None:
    stored = RNG.integers(0, 4096, (32, 32), dtype=np.uint16)
    elements = {"RescaleSlope": 2, "RescaleIntercept": -500, "WindowCenter": 3000, "WindowWidth": 5000}
    write_dicom(tmp_path / "c.dcm", stored, bits_stored=12, transfer_syntax=syntax, elements=elements)
    assert dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == syntax
    _close(read_dicom(tmp_path / "c.dcm"), _linear(stored * 2.0 - 500, 3000, 5000))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_rgb_is_lossless(tmp_path: Path, syntax: str) -> None:
    rgb = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write_dicom(tmp_path / "c.dcm", rgb, transfer_syntax=syntax)
    np.testing.assert_array_equal(read_dicom(tmp_path / "c.dcm"), rgb)


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "ybr-422"])
def test_jpeg_baseline_matches_pil(tmp_path: Path, colour: bool) -> None:
    y, x = np.mgrid[0:32, 0:32]
    source = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    source = source if colour else source[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, "JPEG", quality=90)  # colour: YCbCr 4:2:0 inside
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        reference = np.asarray(im)
    write_dicom(tmp_path / "j.dcm", source)
    ds = dcmread(tmp_path / "j.dcm")
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if colour:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.save_as(tmp_path / "j.dcm", enforce_file_format=True)
    got = read_dicom(tmp_path / "j.dcm")
    assert got.shape == source.shape
    # Grey: the same IDCT to within 1; colour: decoders differ in chroma upsampling by a few levels.
    assert np.abs(got.astype(int) - reference).max() <= (3 if colour else 1)


def test_multi_frame_needs_a_frame(tmp_path: Path) -> None:
    frames = RNG.integers(0, 256, (3, 6, 7), dtype=np.uint8)
    write_dicom(tmp_path / "mf.dcm", frames, photometric="MONOCHROME2")
    with pytest.raises(DataError, match=r"mf\.dcm.*3 frames.*'frame' column") as info:
        read_dicom(tmp_path / "mf.dcm")
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(read_dicom(tmp_path / "mf.dcm", frame=2), frames[2])
    with pytest.raises(DataError, match=r"frame in 0\.\.2.*got 3"):
        read_dicom(tmp_path / "mf.dcm", frame=3)
    write_dicom(tmp_path / "one.dcm", frames[0])
    np.testing.assert_array_equal(read_dicom(tmp_path / "one.dcm", frame=0), frames[0])


@pytest.mark.parametrize(
    ("relabel", "needles"),
    [
        (None, ("RLE Lossless", "1.2.840.10008.1.2.5", "pip install pylibjpeg pylibjpeg-rle")),
        (
            JPEGLSLossless,
            ("JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", 'pip install "fedshift[dicom]"', "jpegls"),
        ),
    ],
    ids=["rle", "jpeg-ls"],
)
def test_missing_decoder_names_syntax_and_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relabel: UID | None, needles: tuple[str, ...]
) -> None:
    path = tmp_path / "x.dcm"
    write_dicom(path, RNG.integers(0, 256, (8, 8), dtype=np.uint8), transfer_syntax=RLELossless)
    if relabel is not None:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = relabel
        ds.save_as(path, enforce_file_format=True)
    decoder = get_decoder(relabel or RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    with pytest.raises(DataError) as info:
        read_dicom(path)
    message = str(info.value)
    assert "x.dcm" in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_corrupt_and_non_image_files(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 20)
    with pytest.raises(DataError, match=r"junk\.dcm.*no DICOM preamble"):
        read_dicom(tmp_path / "junk.dcm")
    write_dicom(tmp_path / "full.dcm", RNG.integers(0, 256, (40, 40), dtype=np.uint8))
    data = (tmp_path / "full.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 800])
    with pytest.raises(DataError, match=r"cut\.dcm") as info:
        read_dicom(tmp_path / "cut.dcm")
    assert "\n" not in str(info.value)
    ds = dcmread(tmp_path / "full.dcm")
    for keyword in ("PixelData", "Rows", "Columns", "PhotometricInterpretation"):
        delattr(ds, keyword)
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"report\.dcm.*no pixel data"):
        read_dicom(tmp_path / "report.dcm")
    with pytest.raises(DataError, match=r"missing\.dcm.*does not exist"):
        read_dicom(tmp_path / "missing.dcm")


def test_modality_lut_sequence_then_window(tmp_path: Path) -> None:
    stored = RNG.integers(0, 512, (10, 10), dtype=np.uint16)
    table = (np.arange(300, dtype=np.float64) ** 1.5).astype(np.uint16)  # a non-linear modality LUT
    item = Dataset()
    item.add_new(0x00283002, "US", [300, 50, 16])  # entries, first value mapped, bits
    item.add_new(0x00283004, "LO", "US")  # Modality LUT Type (unspecified units)
    item.add_new(0x00283006, "US", table.tolist())
    elements = {"ModalityLUTSequence": Sequence([item]), "WindowCenter": 2000, "WindowWidth": 3000}
    write_dicom(tmp_path / "m.dcm", stored, bits_stored=9, elements=elements)
    modality = table[np.clip(stored.astype(np.int64) - 50, 0, 299)].astype(np.float64)
    _close(read_dicom(tmp_path / "m.dcm"), _linear(modality, 2000, 3000))


def test_low_bit_depth_is_stretched(tmp_path: Path) -> None:
    mask = RNG.integers(0, 2, (6, 9), dtype=np.uint8)
    write_dicom(tmp_path / "mask.dcm", mask, bits_stored=1)
    np.testing.assert_array_equal(read_dicom(tmp_path / "mask.dcm"), mask * 255)


def test_palette_colour(tmp_path: Path) -> None:
    index = RNG.integers(0, 4, (5, 5), dtype=np.uint8)
    luts = [np.array(c, np.uint16) for c in ([0, 255, 10, 40], [0, 0, 200, 40], [0, 7, 9, 250])]
    write_dicom(tmp_path / "p.dcm", index, photometric="PALETTE COLOR", bits_stored=8)
    ds = dcmread(tmp_path / "p.dcm")
    for offset, lut in enumerate(luts):  # Red/Green/Blue Palette Color LUT Descriptor and Data
        ds.add_new(0x00281101 + offset, "US", [4, 0, 8])  # entries, first value mapped, bits
        ds.add_new(0x00281201 + offset, "OW", lut.astype("<u2").tobytes())  # 8-bit entries in 16-bit words
    ds.save_as(tmp_path / "p.dcm", enforce_file_format=True)
    expected = np.stack([lut[index] for lut in luts], axis=-1)
    np.testing.assert_array_equal(read_dicom(tmp_path / "p.dcm"), expected)
    write_dicom(tmp_path / "nolut.dcm", index, photometric="PALETTE COLOR", bits_stored=8)
    with pytest.raises(DataError, match=r"Palette Color LUT in .*nolut\.dcm.*re-export"):
        read_dicom(tmp_path / "nolut.dcm")


def test_enhanced_multi_frame_functional_groups(tmp_path: Path) -> None:
    frames = RNG.integers(0, 4096, (3, 8, 8), dtype=np.uint16)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -1000, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    per_frame = []
    for center in (0, 1500, 3000):
        voi, item = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 2000
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    elements = {
        "SharedFunctionalGroupsSequence": Sequence([shared]),
        "PerFrameFunctionalGroupsSequence": Sequence(per_frame),
    }
    write_dicom(tmp_path / "e.dcm", frames, photometric="MONOCHROME2", bits_stored=12, elements=elements)
    for index, center in enumerate((0, 1500, 3000)):
        expected = _linear(frames[index] * 2.0 - 1000, center, 2000)
        _close(read_dicom(tmp_path / "e.dcm", frame=index), expected)


def test_empty_window_and_rescale_elements_are_absent(tmp_path: Path) -> None:
    stored = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    write_dicom(tmp_path / "e.dcm", stored)
    ds = dcmread(tmp_path / "e.dcm")
    for tag in (0x00281050, 0x00281051, 0x00281052, 0x00281053):  # Window C/W, Rescale Intercept/Slope
        ds.add_new(tag, "DS", None)
    ds.save_as(tmp_path / "e.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(tmp_path / "e.dcm"), stored)


def _voi_item(descriptor_vr: str, descriptor: list[int], lut: np.ndarray, data_vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, descriptor_vr, descriptor)  # LUT Descriptor: entries, first value mapped, bits
    data = lut.astype("<u2").tobytes() if data_vr == "OW" else lut.tolist()
    item.add_new(0x00283006, data_vr, data)  # LUT Data
    return item


@pytest.mark.parametrize("data_vr", ["US", "OW"])
def test_8bit_voi_lut_with_more_than_256_entries(tmp_path: Path, data_vr: str) -> None:
    stored = RNG.integers(0, 4096, (16, 16), dtype=np.uint16)
    lut = RNG.integers(0, 256, 4096).astype(np.uint16)  # 4096 entries of 8 bits (PS3.3 C.11.2.1.1)
    item = _voi_item("US", [4096, 0, 8], lut, data_vr)
    write_dicom(tmp_path / "v.dcm", stored, bits_stored=12, elements={"VOILUTSequence": Sequence([item])})
    np.testing.assert_array_equal(read_dicom(tmp_path / "v.dcm"), lut[stored])


@pytest.mark.parametrize("descriptor_vr", ["SS", "US"])
def test_voi_lut_with_a_negative_first_value_on_signed_data(tmp_path: Path, descriptor_vr: str) -> None:
    stored = RNG.integers(-300, 300, (12, 12), dtype=np.int16)
    lut = np.sort(RNG.integers(0, 65536, 400)).astype(np.uint16)  # entries for -200..199
    first = -200 if descriptor_vr == "SS" else 2**16 - 200  # a signed first value, or it written as US
    item = _voi_item(descriptor_vr, [400, first, 16], lut)
    write_dicom(tmp_path / "n.dcm", stored, bits_stored=16, elements={"VOILUTSequence": Sequence([item])})
    expected = lut[np.clip(stored.astype(np.int64) + 200, 0, 399)] * 255.0 / 65535.0
    _close(read_dicom(tmp_path / "n.dcm"), expected)


def test_signed_data_with_rescale_and_window(tmp_path: Path) -> None:
    stored = RNG.integers(-2048, 2048, (16, 16), dtype=np.int16)
    elements = {"RescaleSlope": 1.5, "RescaleIntercept": -100, "WindowCenter": 200, "WindowWidth": 2500}
    write_dicom(tmp_path / "s.dcm", stored, bits_stored=12, elements=elements)
    _close(read_dicom(tmp_path / "s.dcm"), _linear(stored * 1.5 - 100.0, 200, 2500))


def test_monochrome1_without_a_window(tmp_path: Path) -> None:
    stored = RNG.integers(0, 256, (7, 9), dtype=np.uint8)
    write_dicom(tmp_path / "m8.dcm", stored, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom(tmp_path / "m8.dcm"), 255 - stored)
    deep = RNG.integers(100, 4000, (7, 9), dtype=np.uint16)
    write_dicom(tmp_path / "m12.dcm", deep, photometric="MONOCHROME1", bits_stored=12)
    x = deep.astype(np.float64)
    _close(read_dicom(tmp_path / "m12.dcm"), 255.0 - (x - x.min()) / (x.max() - x.min()) * 255.0)


@pytest.mark.parametrize(
    ("keyword", "tag", "elements"),
    [
        ("WindowCenter", 0x00281050, {"WindowCenter": "77", "WindowWidth": 400}),
        ("WindowWidth", 0x00281051, {"WindowCenter": 40, "WindowWidth": "77"}),
        ("RescaleSlope", 0x00281053, {"RescaleSlope": "77"}),
        ("RescaleIntercept", 0x00281052, {"RescaleIntercept": "77"}),
    ],
)
def test_corrupt_numeric_element_names_file_and_element(
    tmp_path: Path, keyword: str, tag: int, elements: dict[str, object]
) -> None:
    write_dicom(
        tmp_path / "b.dcm", RNG.integers(0, 4096, (8, 8), dtype=np.uint16), bits_stored=12, elements=elements
    )
    raw = tag.to_bytes(4, "big")
    encoded = raw[1::-1] + raw[:1:-1] + b"DS\x02\x00"  # explicit VR little endian: group, element, VR, length
    data = (tmp_path / "b.dcm").read_bytes()
    assert data.count(encoded + b"77") == 1
    (tmp_path / "b.dcm").write_bytes(data.replace(encoded + b"77", encoded + b"ab"))
    with pytest.raises(
        DataError, match=rf"number in {keyword} of .*b\.dcm, but got 'ab'; fix or remove"
    ) as info:
        read_dicom(tmp_path / "b.dcm")
    assert "\n" not in str(info.value)


def test_sigmoid_far_outside_the_window_does_not_overflow() -> None:
    x = np.array([-60000.0, -5.0, 0.0, 3.0, 60000.0])
    with np.errstate(all="raise"):
        got = window(x, 0.0, 2.0, "SIGMOID")
    expected = [0.0, 255.0 / (1.0 + np.exp(10.0)), 127.5, 255.0 / (1.0 + np.exp(-6.0)), 255.0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
