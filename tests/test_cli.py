"""Bad user input: one line on stderr, a non-zero exit code, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedshift.common.cli import main
from fedshift.tests.helpers import one_line_error


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_unknown_backbone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(["simulate", "--backbone", "resnet_99", "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "resnet_99")


def test_missing_data_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(["simulate", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "nope.npz")


def test_corrupt_npz(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    code, err = _run(["simulate", "--data", str(bad), "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "bad.npz")


def test_image_folder_with_one_class(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "images" / "normal"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    code, err = _run(["simulate", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "2 class")


def test_non_integer_labels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "floats.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([0.0, 0.5, 1.0, 1.0]))
    code, err = _run(["simulate", "--data", str(path), "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "label")


@pytest.mark.parametrize("sites", ["0", "-3"])
def test_non_positive_sites(capsys: pytest.CaptureFixture[str], tmp_path: Path, sites: str) -> None:
    code, err = _run(["simulate", "--sites", sites, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "--sites", sites)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--epsilon", "8,4"], ("--epsilon", "one per site (4)", "2 values")),
        (["--epsilon", "-1"], ("epsilon", "-1")),
        (["--epsilon", "8", "--delta", "0.01"], ("delta", "0.01")),
        (["--epsilon", "8", "--clip-norm", "0"], ("dp-clip-norm", "0")),
    ],
)
def test_bad_privacy_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], needles: tuple[str, ...]
) -> None:
    code, err = _run(["simulate", *args, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(["simulate", "--device", "cuda:0", "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "cuda:0", "auto")
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_unknown_device(capsys: pytest.CaptureFixture[str], tmp_path: Path, device: str) -> None:
    code, err = _run(["simulate", "--device", device, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, device)


def test_missing_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(["evaluate", "--checkpoint", str(tmp_path), "--data", "x.npz"], capsys)
    one_line_error(code, err, "checkpoint.json")


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedshift.common.cli",
            "simulate",
            "--sites",
            "0",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fedshift simulate: error: Expected --sites")
