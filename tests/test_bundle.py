"""The site model bundle: written by the final-model stage through the real ClientApp and egress guard,
loaded and verified, refused in one line when a file or the backbone does not match, never half-written."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedshift.client import bundle as bundle_module
from fedshift.client.app import make_client_app
from fedshift.client.bundle import (
    BUNDLE_DIR,
    CARD_JSON,
    CARD_MD,
    LOCAL_FILE,
    MANIFEST_FILE,
    SHARED_FILE,
    load_bundle,
    verify_bundle,
    write_bundle,
)
from fedshift.client.correction import CORRECTION_FILE, SiteCorrection, predict_logits, save_correction
from fedshift.client.egress import BOOKKEEPING, read_egress_log, stored_answer
from fedshift.client.inference import PRIOR_NONE
from fedshift.client.ledger import LEDGER_FILE, PrivacyLedger
from fedshift.client.norm_adaptation import adapted_norm_statistics
from fedshift.client.predict import predict_bundle
from fedshift.client.site import load_local_state
from fedshift.common import io as io_module
from fedshift.common.backbones import weights_file
from fedshift.common.calibration import Calibration
from fedshift.common.config import FederationConfig
from fedshift.common.data import load_npz
from fedshift.common.errors import BundleError
from fedshift.common.io import recover_folder
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.prior_estimation import PriorEstimate
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, FINAL_MODEL_QUERY, METRICS_KEY, NUM_SITES_KEY
from fedshift.common.shift_statistics import STAGE_KEY, STAGE_RELEASE
from fedshift.server.app import deliver_final_model, make_strategy
from fedshift.tests.helpers import call_client_app, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)
FINAL_MESSAGE = f"{MessageType.QUERY}.{FINAL_MODEL_QUERY}"


def _message(kind: str, arrays: ArrayRecord, **config: Any) -> Message:
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(config)})
    return Message(content, dst_node_id=0, message_type=kind)


def _final(arrays: ArrayRecord, server_round: int = 2, sites: int = 3) -> Message:
    return _message(FINAL_MESSAGE, arrays, **{"server-round": server_round, NUM_SITES_KEY: sites})


def _initial() -> ArrayRecord:
    return ArrayRecord(build_model(MODEL).shared_state_dict())


def test_a_dp_run_ends_with_a_bundle_whose_tensors_card_and_corrections_are_the_sites(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path, 150, n_val=30, n_test=40)
    privacy = {"dp": True, "dp-epsilon": 8.0, "dp-clip-norm": 1.0}
    config = site_run_config(
        tmp_path,
        num_rounds=2,
        **privacy,
        **{"ls-correction": True, "ls-bootstrap": 20, "ls-min-samples": 20, "ls-threshold": True},
    )
    app = make_client_app()
    arrays = _initial()
    # the statistics stage: under DP the site corrects from its DP release of its label counts
    release = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": 0})
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: release})
    call_client_app(app, Message(content, dst_node_id=0, message_type=MessageType.QUERY), config)
    for server_round in (1, 2):
        trained = call_client_app(
            app, _message(MessageType.TRAIN, arrays, **{"server-round": server_round}), config
        )
        arrays = trained.content.array_records[ARRAYS_KEY]
    val = call_client_app(
        app, _message(MessageType.EVALUATE, arrays, split="val", **{"server-round": 2}), config
    )
    test = call_client_app(
        app, _message(MessageType.EVALUATE, arrays, split="test", **{"server-round": 2}), config
    )
    reply = call_client_app(app, _final(arrays), config)
    # only the site's name leaves, and the egress guard logged the stage like any other
    assert dict(reply.content.config_records) == {"site": ConfigRecord({"name": "site-0"})}
    assert not reply.content.array_records and not reply.content.metric_records
    entry = read_egress_log(site_dir)[-1]
    assert (entry["stage"], entry["round"], entry["blocked"]) == (FINAL_MESSAGE, 2, [])
    assert {i["mechanism"] for i in entry["items"]} == {BOOKKEEPING}
    bundle = load_bundle(site_dir)  # the state directory, or the bundle folder itself
    assert bundle.path == site_dir / BUNDLE_DIR
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.equal(bundle.model.shared_state_dict()[key], value)
    local = load_local_state(site_dir)
    assert local is not None and set(local) == set(bundle.model.local_state_dict())
    for key, value in local.items():
        assert torch.equal(bundle.model.local_state_dict()[key], value)
    # the card's numbers: the ledger's epsilon at the site's delta, and the answers the site sent
    card = bundle.card
    assert card["privacy"]["epsilon"] == pytest.approx(PrivacyLedger.at(site_dir).epsilon(1e-5), abs=1e-12)
    assert card["privacy"]["delta"] == 1e-5 and card["privacy"]["budget_epsilon"] == 8.0
    assert 0 < card["privacy"]["epsilon"] <= 8.0
    sent_val = {k: float(v) for k, v in val.content.metric_records[METRICS_KEY].items()}  # type: ignore[arg-type]
    assert card["validation"] == {**sent_val, "round": 2.0}
    assert card["test"] == {k: float(v) for k, v in test.content.metric_records[METRICS_KEY].items()}  # type: ignore[arg-type]
    assert (card["run_id"], card["site"], card["rounds"], card["sites"]) == ("1", "site-0", 2, 3)
    assert card["finetune"] == "adapters" and card["label_shift"] == {"status": "on", "split": "test"}
    assert bundle.label_shift is not None and bundle.label_shift["run"] == card["run_id"] == "1"
    assert bundle.class_names == load_npz(site_dir / "data.npz").class_names
    assert card["backbone"]["sha256"] == bundle.backbone["sha256"] and len(card["backbone"]["sha256"]) == 64
    assert json.loads((bundle.path / CARD_JSON).read_text()) == card
    assert f"epsilon {card['privacy']['epsilon']:.3f} at delta 1e-05" in (bundle.path / CARD_MD).read_text()
    # the corrections are the site's label-shift state, and the model predicts as the site's own does
    kept = json.loads((site_dir / CORRECTION_FILE).read_text())
    assert bundle.correction is not None and bundle.label_shift == kept
    assert bundle.correction.to_json() == {
        k: v for k, v in kept.items() if k not in ("run", "split", "estimator")
    }
    model = build_model(MODEL)
    model.load_shared_state_dict(arrays.to_torch_state_dict())
    model.load_local_state_dict(local)
    images = load_npz(site_dir / "data.npz").split("test").images
    cpu = torch.device("cpu")
    np.testing.assert_array_equal(
        predict_logits(bundle.model, images, cpu), predict_logits(model, images, cpu)
    )
    calibrated = bundle.correction.calibration.apply(predict_logits(model, images, cpu))
    assert np.allclose(calibrated.sum(axis=1), 1.0)
    # test-time adaptation from the bundle is the federation's: relative to the site's val images, whose
    # norm moments the bundle keeps (not the images)
    val_images = load_npz(site_dir / "data.npz").split("val").images
    with adapted_norm_statistics(model, images, cpu, reference=val_images):
        expected = predict_logits(model, images, cpu)
    adapted = predict_bundle(bundle, images, cpu, prior=PRIOR_NONE, tta=True)
    np.testing.assert_allclose(adapted.logits, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(adapted.logits, predict_logits(model, images, cpu), atol=1e-3)
    # the manifest lists every file with its sha256
    manifest = verify_bundle(bundle.path)
    assert sorted(manifest["files"]) == sorted(
        p.name for p in bundle.path.iterdir() if p.name != MANIFEST_FILE
    )


def _plain_bundle(root: Path) -> Path:
    """A site without DP or correction, its bundle written at the initial adapters (no training)."""
    site_dir = write_site(root)
    reply = call_client_app(make_client_app(), _final(_initial(), sites=2), site_run_config(root))
    assert not reply.has_error()
    return site_dir


def test_without_dp_or_correction_the_card_says_so_and_there_is_no_correction(tmp_path: Path) -> None:
    site_dir = _plain_bundle(tmp_path)
    bundle = load_bundle(site_dir / BUNDLE_DIR)
    assert bundle.correction is None and not (bundle.path / CORRECTION_FILE).exists()
    assert bundle.card["label_shift"] == {"status": "off", "split": None}
    assert bundle.card["privacy"]["dp"] is False and bundle.card["privacy"]["epsilon"] is None
    assert bundle.card["validation"] == {} and bundle.card["test"] == {} and bundle.card["sites"] == 2
    assert "no differential privacy" in (bundle.path / CARD_MD).read_text()
    assert stored_answer(site_dir, "1", 2, "val") is None


def test_a_correction_fitted_in_another_run_stays_out_of_the_bundle(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    prior = np.array([0.5, 0.5])
    estimate = PriorEstimate(prior, prior, "em", 10, 1, True, fallback=True, reason="too few")
    correction = SiteCorrection(Calibration.identity(2), "", estimate, None)
    config = site_run_config(tmp_path, **{"ls-correction": True})
    for run, included in (("0", False), ("1", True)):  # the final-model message is run 1's
        save_correction(site_dir, correction, "test", run=run)
        assert not call_client_app(make_client_app(), _final(_initial()), config).has_error()
        bundle = load_bundle(site_dir)
        assert (bundle.correction is not None) == included
        assert bundle.card["label_shift"]["status"] == ("on" if included else "not-fitted")


def _one_line(exc: pytest.ExceptionInfo[BundleError], *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and text.startswith("Expected")
    for needle in needles:
        assert needle in text, text


def test_every_corruption_is_refused_in_one_line_naming_the_file(tmp_path: Path) -> None:
    site_dir = _plain_bundle(tmp_path)
    folder = site_dir / BUNDLE_DIR
    good = {p.name: p.read_bytes() for p in folder.iterdir()}

    def restore() -> None:
        for name, data in good.items():
            (folder / name).write_bytes(data)

    (folder / LOCAL_FILE).unlink()
    with pytest.raises(BundleError) as exc:
        load_bundle(folder)
    _one_line(exc, str(folder / LOCAL_FILE), "missing", "run the federation")
    restore()
    blob = bytearray(good[SHARED_FILE])
    blob[-1] ^= 0xFF
    (folder / SHARED_FILE).write_bytes(bytes(blob))
    with pytest.raises(BundleError) as exc:
        load_bundle(folder)
    _one_line(exc, str(folder / SHARED_FILE), "sha256")
    restore()
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError) as exc:
        verify_bundle(folder)
    _one_line(exc, str(folder / MANIFEST_FILE), "valid JSON")
    (folder / MANIFEST_FILE).write_text("[]")  # JSON, but not a manifest
    with pytest.raises(BundleError) as exc:
        verify_bundle(folder)
    _one_line(exc, str(folder / MANIFEST_FILE), "format-1 manifest")
    manifest = json.loads(good[MANIFEST_FILE])
    del manifest["files"][CARD_JSON]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as exc:
        verify_bundle(folder)
    _one_line(exc, str(folder), repr(CARD_JSON))
    restore()
    shutil.rmtree(folder)
    with pytest.raises(BundleError) as exc:
        load_bundle(site_dir)
    _one_line(exc, str(site_dir), "there is none")


def test_a_bundle_built_on_other_backbone_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = _plain_bundle(tmp_path)
    installed = weights_file(MODEL.backbone)
    assert load_bundle(site_dir).backbone["weights"] == installed.name
    other = tmp_path / installed.name  # other weights installed under the same name
    blob = bytearray(installed.read_bytes())
    blob[-1] ^= 0xFF
    other.write_bytes(bytes(blob))
    monkeypatch.setattr(bundle_module, "weights_file", lambda name, weights=None: other)
    with pytest.raises(BundleError) as exc:
        verify_bundle(site_dir)
    _one_line(exc, "efficientnet_lite0", installed.name, "backbone.json", "install the weights")


def test_a_crash_mid_write_leaves_the_old_bundle_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = _plain_bundle(tmp_path)
    before = {p.name: p.read_bytes() for p in (site_dir / BUNDLE_DIR).iterdir()}
    new = {SHARED_FILE: b"new"}  # a write that never gets as far as a valid bundle
    real_write = io_module._write_synced

    def crash_at_manifest(path: Path, data: bytes) -> None:
        if path.name == MANIFEST_FILE:
            raise KeyboardInterrupt  # the process dies here
        real_write(path, data)

    monkeypatch.setattr(io_module, "_write_synced", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(site_dir, new)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (site_dir / BUNDLE_DIR).iterdir()} == before
    assert sorted(p.name for p in site_dir.iterdir() if p.name.startswith(".model")) == []
    load_bundle(site_dir)
    # the swap itself interrupted (old bundle set aside, the new one not yet in place): still readable,
    # and the next write puts it back first
    real_rename = os.rename
    calls: list[str] = []

    def die_on_second(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(io_module.os, "rename", die_on_second)
    with pytest.raises(OSError, match="power cut"):
        write_bundle(site_dir, new)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (site_dir / BUNDLE_DIR).iterdir()} == before
    os.rename(site_dir / BUNDLE_DIR, site_dir / ".model.old")  # as a crash between the renames leaves it
    assert load_bundle(site_dir).path == site_dir / ".model.old"
    recover_folder(site_dir / BUNDLE_DIR)
    assert {p.name: p.read_bytes() for p in (site_dir / BUNDLE_DIR).iterdir()} == before


def test_the_server_stage_reaches_the_real_client_app_and_logs_a_failing_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_dir = write_site(tmp_path)
    run_config = site_run_config(tmp_path)
    app = make_client_app()
    cfg = FederationConfig.from_run_config({**run_config, "run-dir": str(tmp_path / "run")})
    shared = build_model(cfg.model).shared_state_dict()
    strategy = make_strategy(cfg, ArrayRecord(dict(shared)), shared, 0, None)

    class Grid:
        run = type("Run", (), {"run_id": 1})()

        def get_node_ids(self) -> list[int]:
            return [0]

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            return [call_client_app(app, m, run_config) for m in messages]

    assert deliver_final_model(Grid(), ArrayRecord(dict(shared)), strategy, 10.0) == ["site-0"]  # type: ignore[arg-type]
    bundle = load_bundle(site_dir)
    assert bundle.card["sites"] == 1 and bundle.card["rounds"] == 2
    assert read_egress_log(site_dir)[-1]["request"][CONFIG_KEY] == {"server-round": 2, NUM_SITES_KEY: 1}
    (site_dir / LEDGER_FILE).write_text("{not a ledger")  # a site whose ledger cannot be trusted
    with caplog.at_level(logging.WARNING, logger="fedshift.server.ask"):
        assert deliver_final_model(Grid(), ArrayRecord(dict(shared)), strategy, 10.0) == []  # type: ignore[arg-type]
    assert "Final model: no bundle at site-0: the site reported an error: site-error" in caplog.text
    assert read_egress_log(site_dir)[-1]["error"].startswith("site-error")
