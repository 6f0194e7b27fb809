"""``fedshift predict`` and ``fedshift evaluate --model`` on a site's bundle, against the federation's own
evaluation (the real ClientApp handlers), and their bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedshift.client.app import make_client_app
from fedshift.client.bundle import load_bundle
from fedshift.client.inference import predict_logits, softmax
from fedshift.common.cli import main
from fedshift.common.data import Dataset, load_npz, save_npz
from fedshift.common.errors import DataError
from fedshift.common.image_folders import load_image_folder
from fedshift.common.label_shift import correct_posteriors
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, FINAL_MODEL_QUERY, METRICS_KEY, NUM_SITES_KEY
from fedshift.simulations.manifest_export import export_manifest
from fedshift.tests.helpers import call_client_app, one_line_error, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

SHIFT = {"ls-correction": True, "ls-bootstrap": 20, "ls-min-samples": 20, "ls-threshold": True}


def _message(kind: str, arrays: ArrayRecord, **config: Any) -> Message:
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(config)})
    return Message(content, dst_node_id=0, message_type=kind)


def _federated_site(root: Path, **values: Any) -> tuple[Path, dict[str, float]]:
    """A site after one round of training, its final test evaluation and its bundle (the real handlers)."""
    site_dir = write_site(root, 150, n_val=30, n_test=40)
    config = site_run_config(root, num_rounds=1, **values)
    app = make_client_app()
    arrays = ArrayRecord(build_model(ModelConfig(image_size=32)).shared_state_dict())
    trained = call_client_app(app, _message(MessageType.TRAIN, arrays, **{"server-round": 1}), config)
    arrays = trained.content.array_records[ARRAYS_KEY]
    test = call_client_app(
        app, _message(MessageType.EVALUATE, arrays, split="test", **{"server-round": 1}), config
    )
    final = f"{MessageType.QUERY}.{FINAL_MODEL_QUERY}"
    reply = call_client_app(app, _message(final, arrays, **{"server-round": 1, NUM_SITES_KEY: 1}), config)
    assert not reply.has_error()
    metrics = {k: float(v) for k, v in test.content.metric_records[METRICS_KEY].items()}  # type: ignore[arg-type]
    return site_dir, metrics


def _read_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str], list[str]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    ids = [r["id"] for r in rows]
    raw = np.array([[float(r[k]) for k in r if k.startswith("raw_")] for r in rows])
    corrected = np.array([[float(r[k]) for k in r if k.startswith("corrected_")] for r in rows])
    return ids, raw, corrected, [r["predicted"] for r in rows], [r["threshold"] for r in rows]


def _sklearn(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The federation's metric names, computed independently from the CSV's probabilities."""
    return {
        "auc": float(roc_auc_score(labels, probs[:, 1])),
        "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
        "log-loss": float(log_loss(labels, probs, labels=[0, 1])),
    }


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_equals_the_federation_test_metrics_with_correction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir, sent = _federated_site(tmp_path, **SHIFT)
    labels = load_npz(site_dir / "data.npz").split("test").labels
    out = tmp_path / "predictions.csv"
    base = ["--model", str(site_dir), "--images", str(site_dir / "data.npz"), "--split", "test"]
    code, printed, _ = _predict(capsys, *base, "--out", str(out))
    assert code == 0 and "40 images" in printed and "calibration (bcts)" in printed
    ids, raw, corrected, predicted, threshold = _read_csv(out)
    assert ids == [f"test:{i}" for i in range(40)] and set(threshold) == {"0.5"}
    assert predicted == [("normal", "lesion")[k] for k in corrected.argmax(axis=1)]
    for key, value in _sklearn(labels, raw).items():
        assert value == pytest.approx(sent[key], abs=1e-6)
    for key, value in _sklearn(labels, corrected).items():  # the label-shift corrected ones
        assert value == pytest.approx(sent[f"ls-{key}"], abs=1e-6)
    code, printed, _ = _predict(capsys, *base, "--out", str(out), "--prior", "training")
    _, _, calibrated, _, _ = _read_csv(out)
    for key, value in _sklearn(labels, calibrated).items():
        assert value == pytest.approx(sent[f"cal-{key}"], abs=1e-6)
    bundle = load_bundle(site_dir)
    assert bundle.correction is not None and bundle.correction.threshold is not None
    code, printed, _ = _predict(
        capsys, *base, "--out", str(out), "--prior", "training", "--threshold", "site"
    )
    *_, predicted, threshold = _read_csv(out)
    pred = np.array([("normal", "lesion").index(p) for p in predicted])
    assert float(accuracy_score(labels, pred)) == pytest.approx(sent["thr-accuracy"], abs=1e-6)
    assert set(threshold) == {repr(bundle.correction.threshold)}
    # fedshift evaluate on the bundle, on a file holding only the test split
    test_only = tmp_path / "test_only.npz"
    test = load_npz(site_dir / "data.npz").split("test")
    save_npz(test_only, Dataset({"test": test}, ("normal", "lesion"), "held-out", True))
    report = tmp_path / "evaluate.json"
    assert main(["evaluate", "--model", str(site_dir), "--data", str(test_only), "--json", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["raw"]["log_loss"] == pytest.approx(sent["log-loss"], abs=1e-6)
    assert written["corrected"]["log_loss"] == pytest.approx(sent["ls-log-loss"], abs=1e-6)
    assert written["corrected"]["auc"] == pytest.approx(sent["ls-auc"], abs=1e-6)


def test_predict_equals_the_federation_test_metrics_without_correction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir, sent = _federated_site(tmp_path)
    assert "ls-log-loss" not in sent and load_bundle(site_dir).correction is None
    labels = load_npz(site_dir / "data.npz").split("test").labels
    out = tmp_path / "p.csv"
    code, printed, _ = _predict(
        capsys, "--model", str(site_dir), "--images", str(site_dir / "data.npz"), "--out", str(out)
    )
    assert code == 0 and "no correction state at this site" in printed
    _, raw, corrected, _, _ = _read_csv(out)
    np.testing.assert_array_equal(raw, corrected)
    for key, value in _sklearn(labels, raw).items():
        assert value == pytest.approx(sent[key], abs=1e-6)


def _write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_bad_inputs_end_in_one_line_and_leave_no_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir, _ = _federated_site(tmp_path, **SHIFT)
    out = tmp_path / "predictions.csv"
    out.write_text("the previous predictions\n")
    args = ["--model", str(site_dir), "--out", str(out)]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _predict(capsys, *args, "--images", str(empty))
    one_line_error(code, err, str(empty), "found none")
    # --out a directory: refused before any work
    data = str(site_dir / "data.npz")
    code, _, err = _predict(capsys, "--model", str(site_dir), "--out", str(empty), "--images", data)
    one_line_error(code, err, str(empty), "is a directory")
    folder = tmp_path / "new-patients"
    for i in range(3):
        _write_png(folder / f"p{i}.png", i)
    (folder / "broken.png").write_bytes(b"not a png")
    code, _, err = _predict(capsys, *args, "--images", str(folder))
    one_line_error(code, err, str(folder / "broken.png"))
    for bad in (["--prior", "sometimes"], ["--threshold", "1.5"]):
        code, _, err = _predict(capsys, *args, "--images", str(folder), *bad)
        one_line_error(code, err, bad[1])
    (folder / "broken.png").unlink()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    code, _, err = _predict(capsys, *args, "--images", str(folder), "--explain", str(a_file))
    one_line_error(code, err, str(a_file), "but it is a file")
    for k in ("0", "-2"):
        code, _, err = _predict(
            capsys, *args, "--images", str(folder), "--explain", str(tmp_path / "x"), "--explain-k", k
        )
        one_line_error(code, err, "positive integer", k)
    with pytest.raises(SystemExit) as stopped:  # argparse's own line
        main(
            [
                "predict",
                *args,
                "--images",
                str(folder),
                "--explain",
                str(tmp_path / "x"),
                "--explain-k",
                "2.5",
            ]
        )
    one_line_error(int(str(stopped.value.code)), capsys.readouterr().err, "--explain-k", "2.5")
    labelled = tmp_path / "labelled"
    _write_png(labelled / "normal" / "a.png", 7)
    _write_png(labelled / "pneumonia" / "b.png", 8)
    code, _, err = _predict(capsys, *args, "--images", str(labelled), "--explain", str(tmp_path / "x"))
    one_line_error(code, err, "named after the model's classes (normal, lesion)", "'pneumonia'")
    assert out.read_text() == "the previous predictions\n"  # nothing half-written, nothing replaced
    assert a_file.read_text() == "not a folder" and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (folder / "broken.png").write_bytes(b"not a png")
    # too few images for a prior estimate: not estimated here, and the output says what was done instead
    (folder / "broken.png").unlink()
    code, printed, _ = _predict(capsys, *args, "--images", str(folder))
    assert code == 0 and "only 3 unlabeled samples, fewer than min_samples=20" in printed
    ids, raw, _, _, _ = _read_csv(out)
    assert ids == ["p0.png", "p1.png", "p2.png"] and raw.shape == (3, 2)
    stored = load_bundle(site_dir).correction
    assert stored is not None and not stored.estimate.fallback  # the site's test split gave an estimate
    assert "the site's stored estimate instead" in printed
    # ... and the corrected probabilities are the calibrated ones under that stored prior (Bayes' rule;
    # log(raw) are the logits up to a constant, which the temperature-style calibration ignores)
    assert stored.calibration.kind in ("ts", "bcts")
    calibrated = stored.calibration.apply(np.log(raw))
    expected = correct_posteriors(calibrated, stored.source_prior, stored.estimate.prior)
    np.testing.assert_allclose(_read_csv(out)[2], expected, atol=1e-6)


def test_an_npz_of_new_patients_needs_no_labels_and_may_hold_one_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir, _ = _federated_site(tmp_path)
    test = load_npz(site_dir / "data.npz").split("test")
    out = tmp_path / "p.csv"
    unlabelled = tmp_path / "new.npz"
    np.savez(unlabelled, test_images=test.images[:10])  # images only, as a scanner export might be
    code, printed, _ = _predict(
        capsys, "--model", str(site_dir), "--images", str(unlabelled), "--out", str(out)
    )
    ids, raw, _, _, _ = _read_csv(out)
    assert code == 0 and ids == [f"test:{i}" for i in range(10)] and "auc" not in printed.lower()
    bundle = load_bundle(site_dir)
    expected = softmax(predict_logits(bundle.model, test.images[:10], torch.device("cpu")))
    np.testing.assert_allclose(raw, expected, atol=1e-12)
    normals = tmp_path / "normals.npz"  # every image of one class: labels kept, no class-count refusal
    keep = test.labels == 0
    np.savez(normals, test_images=test.images[keep], test_labels=test.labels[keep])
    code, printed, _ = _predict(capsys, "--model", str(site_dir), "--images", str(normals), "--out", str(out))
    assert code == 0 and len(_read_csv(out)[0]) == int(keep.sum()) and "accuracy" in printed
    code, _, err = _predict(
        capsys, "--model", str(site_dir), "--images", str(unlabelled), "--split", "val", "--out", str(out)
    )
    one_line_error(code, err, "'val' split", "['test']")


def test_evaluate_a_checkpoint_on_a_test_only_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fedshift.client.inference import predict_logits, softmax
    from fedshift.common.checkpoint import save_checkpoint
    from fedshift.common.metrics import classification_metrics

    config = ModelConfig(image_size=32)
    model = build_model(config)
    arrays = {k: v.numpy() for k, v in model.shared_state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", arrays, config, 2)
    site_dir = write_site(tmp_path)
    test = load_npz(site_dir / "data.npz").split("test")
    held_out = tmp_path / "held-out" / "test_only.npz"
    save_npz(held_out, Dataset({"test": test}, ("normal", "lesion"), "held-out", True))
    report = tmp_path / "m.json"
    args = ["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(held_out)]
    assert main([*args, "--json", str(report)]) == 0
    logits = predict_logits(model, test.images, torch.device("cpu"))
    expected = classification_metrics(test.labels, softmax(logits))
    assert json.loads(report.read_text())["log_loss"] == pytest.approx(expected["log_loss"], abs=1e-6)
    code = main([*args, "--split", "val"])
    one_line_error(code, capsys.readouterr().err, "Expected a 'val' split", "add val_images and val_labels")


def test_a_labelled_folder_prints_its_metrics_and_tta_adapts_the_norms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fedshift.client.explain import grad_cam, overlay
    from fedshift.client.inference import predict_logits, softmax
    from fedshift.client.norm_adaptation import adapted_norm_statistics

    site_dir, _ = _federated_site(tmp_path, **SHIFT, **{"image-size": 64})
    bundle = load_bundle(site_dir)
    assert bundle.class_names == ("normal", "lesion")
    test = load_npz(site_dir / "data.npz").split("test")
    folder = tmp_path / "labelled"  # class folders named as the model's classes; sorted, they are reversed
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        (folder / bundle.class_names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / bundle.class_names[label] / f"{i:03d}.png")
    out, explained = tmp_path / "p.csv", tmp_path / "explained"
    args = ["--model", str(site_dir), "--images", str(folder), "--out", str(out)]
    code, printed, _ = _predict(
        capsys, *args, "--prior", "none", "--explain", str(explained), "--explain-k", "3"
    )
    assert code == 0
    ids, raw, _, predicted, _ = _read_csv(out)
    order = np.concatenate([np.flatnonzero(test.labels == 1), np.flatnonzero(test.labels == 0)])
    assert ids == [f"{bundle.class_names[test.labels[i]]}/{i:03d}.png" for i in order]  # lesion/ sorts first
    labels = test.labels[order]
    log_loss_row = next(line for line in printed.splitlines() if line.strip().startswith("log_loss"))
    assert float(log_loss_row.split()[1]) == pytest.approx(log_loss(labels, raw, labels=[0, 1]), abs=1e-6)
    # --explain: the first 3 images' overlays of the CSV's predicted class, recomputed from grad_cam
    assert f"3 Grad-CAM overlays -> {explained}" in printed
    names = sorted(p.name for p in explained.iterdir())
    assert names == [f"{ident.replace('/', '_')}-gradcam.png" for ident in ids[:3]]
    resized = load_image_folder(folder, image_size=64).split("train").images[:3]
    classes = np.array([bundle.class_names.index(c) for c in predicted[:3]])
    cams, _ = grad_cam(bundle.model, resized, classes=classes)
    for name, image, cam in zip(names, resized, cams, strict=True):
        decoded = np.asarray(Image.open(explained / name))
        assert decoded.shape == (64, 64, 3) and test.images.shape[1:] == (28, 28)  # the model's input size
        np.testing.assert_array_equal(decoded, overlay(image, cam))
    # --tta: the norm statistics adapted to these images relative to the site's own (the bundle's moments)
    tta_args = ["--prior", "none", "--tta", "--explain", str(explained), "--explain-k", "2"]
    code, printed, _ = _predict(capsys, *args, *tta_args)
    assert code == 0 and "test-time norm adaptation" in printed
    _, adapted, _, adapted_predicted, _ = _read_csv(out)
    all_images = load_image_folder(folder, image_size=64).split("train").images
    cpu = torch.device("cpu")
    classes = np.array([bundle.class_names.index(c) for c in adapted_predicted[:2]])
    assert bundle.reference is not None
    with adapted_norm_statistics(bundle.model, all_images, cpu, reference=bundle.reference):
        expected = softmax(predict_logits(bundle.model, all_images, cpu))
        adapted_cams, _ = grad_cam(bundle.model, all_images[:2], classes=classes)
    np.testing.assert_allclose(adapted, expected, atol=1e-9)
    assert np.abs(adapted - raw).max() > 1e-4  # it changed the predictions
    # the overlays explain the adapted model (the earlier folder replaced whole: 2 overlays now)
    assert sorted(p.name for p in explained.iterdir()) == names[:2]
    for name, image, cam in zip(names[:2], all_images[:2], adapted_cams, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(explained / name)), overlay(image, cam))
    assert not np.allclose(adapted_cams, cams[:2])


def test_class_folders_map_to_the_model_classes_by_name_or_in_sorted_order(tmp_path: Path) -> None:
    from fedshift.client.predict import read_images

    for name, seed in (("b-cls/one.png", 0), ("b-cls/two.png", 1), ("a-cls/x.png", 2)):
        _write_png(tmp_path / "split" / "test" / name, seed)
        _write_png(tmp_path / "flat" / name, seed)
    names = ("b-cls", "a-cls")
    for root, ids in ((tmp_path / "flat", []), (tmp_path / "split", ["test/"])):
        by_name = read_images(root, "test", 28, 2, names)
        prefix = ids[0] if ids else ""
        assert by_name.ids == [f"{prefix}a-cls/x.png", f"{prefix}b-cls/one.png", f"{prefix}b-cls/two.png"]
        assert by_name.labels is not None and by_name.labels.tolist() == [1, 0, 0]
        assert by_name.class_names == names
        np.testing.assert_array_equal(by_name.images[0], np.asarray(Image.open(root / by_name.ids[0])))
        in_order = read_images(root, "test", 28, 2, None)  # an older bundle: sorted folder names
        assert in_order.labels is not None and in_order.labels.tolist() == [0, 1, 1]
        assert in_order.class_names == ("a-cls", "b-cls") and in_order.ids == by_name.ids
    with pytest.raises(
        DataError, match=r"named after the model's classes \(normal, lesion\), but .* 'a-cls'"
    ):
        read_images(tmp_path / "flat", "test", 28, 2, ("normal", "lesion"))
    with pytest.raises(DataError, match=r"Expected 3 class folders .* found 2"):
        read_images(tmp_path / "flat", "test", 28, 3, None)


def test_a_manifest_of_new_patients_is_predicted_row_by_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir, _ = _federated_site(tmp_path)
    data = load_npz(site_dir / "data.npz")
    manifest = export_manifest(data, tmp_path / "export", fmt="png")  # every split; predict takes test's
    out = tmp_path / "p.csv"
    code, printed, _ = _predict(
        capsys, "--model", str(site_dir), "--images", str(manifest), "--out", str(out), "--split", "test"
    )
    ids, raw, _, _, _ = _read_csv(out)
    test = data.split("test")
    assert code == 0 and ids == [f"images/test/{i:06d}.png" for i in range(len(test))]
    # the PNGs read and resized independently (PIL bilinear, the reader's resize) give the same probabilities
    images = np.stack(
        [
            np.asarray(Image.open(tmp_path / "export" / i).resize((32, 32), Image.Resampling.BILINEAR))
            for i in ids
        ]
    )
    bundle = load_bundle(site_dir)
    np.testing.assert_allclose(
        raw, softmax(predict_logits(bundle.model, images, torch.device("cpu"))), atol=1e-12
    )
    auc = next(line.split()[1] for line in printed.splitlines() if line.split()[:1] == ["auc"])
    assert float(auc) == pytest.approx(roc_auc_score(test.labels, raw[:, 1]), abs=1e-6)  # labels read too

    rows = manifest.read_text().splitlines()  # a label the model does not know: one line, no CSV
    manifest.write_text(
        "\n".join([rows[0], rows[-1].replace(",normal,", ",effusion,").replace(",abnormal,", ",effusion,")])
        + "\n"
    )
    out.unlink()
    code, _, err = _predict(capsys, "--model", str(site_dir), "--images", str(manifest), "--out", str(out))
    one_line_error(code, err, "effusion", "row 1")
    assert not out.exists()


def test_evaluate_a_checkpoint_on_a_manifest_keeps_the_site_split(tmp_path: Path) -> None:
    from fedshift.common.checkpoint import load_checkpoint, save_checkpoint
    from fedshift.common.data import load_dataset
    from fedshift.common.metrics import classification_metrics

    config = ModelConfig(image_size=32)
    save_checkpoint(
        tmp_path / "ckpt",
        {k: v.numpy() for k, v in build_model(config).shared_state_dict().items()},
        config,
        1,
    )
    manifest = export_manifest(
        load_npz(write_site(tmp_path) / "data.npz"), tmp_path / "export", with_split=False
    )
    state = tmp_path / "state"
    trained = load_dataset(manifest, image_size=32, state_dir=state)  # the site's first round saves the split
    rows = manifest.read_text().splitlines()
    new = [r.replace("/000", "/new").replace(",train-", ",new-") for r in rows[1:11]]  # 10 new patients
    manifest.write_text("\n".join([*rows, *new]) + "\n")
    for f in (tmp_path / "export" / "images" / "train").glob("00000[0-9].dcm"):
        (f.parent / f.name.replace("000", "new", 1)).write_bytes(f.read_bytes())
    report = tmp_path / "m.json"
    args = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--data",
        str(manifest),
        "--json",
        str(report),
    ]
    assert main([*args, "--site-state", str(state)]) == 0
    # the saved test patients are still the test split (new patients joined without moving them)
    evaluated = load_dataset(manifest, image_size=32, state_dir=state).split("test")
    assert trained.split("test").patients is not None and evaluated.patients is not None
    assert set(trained.split("test").patients.tolist()) <= set(evaluated.patients.tolist())
    assert not set(evaluated.patients.tolist()) & set(trained.split("train").patients.tolist())
    # ... and the command evaluated exactly those images
    model = build_model(config)
    model.load_shared_state_dict(load_checkpoint(tmp_path / "ckpt").arrays)
    expected = classification_metrics(
        evaluated.labels, softmax(predict_logits(model, evaluated.images, torch.device("cpu")))
    )
    assert json.loads(report.read_text())["log_loss"] == pytest.approx(expected["log_loss"], abs=1e-9)


def test_manifest_labels_without_the_models_class_names_must_be_indices(tmp_path: Path) -> None:
    from fedshift.client.predict import read_images

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,pneumonia\n")
    with pytest.raises(DataError, match=r"name the model's 2 classes, but they name 1 \(pneumonia\)"):
        read_images(manifest, "test", 32, 2, None)  # a bundle without class names: 'pneumonia' is not class 0
    manifest.write_text("path,label\na.png,1\n")
    found = read_images(manifest, "test", 32, 2, None)
    assert found.labels is not None and found.labels.tolist() == [1]
    assert read_images(manifest, "test", 32, 2, ("normal", "pneumonia")).labels.tolist() == [1]  # type: ignore[union-attr]
