"""The calibrated verdict through the CLI and the Python API (issue #21): fit calibrates
from the good images, the model file keeps it, score labels by default; old model files
load and say that they have no threshold; bad options are one line, exit 2."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from sklearn.metrics import roc_auc_score

from patchcore_fast import calibration
from patchcore_fast.cli import main
from patchcore_fast.model import PatchCore
from model_files import without_calibration


@pytest.fixture(scope="module")
def fitted(fit_demo):
    root, model = fit_demo("verdict", seed=5, n_train=8, n_test_good=3, n_test_defect=2)
    return root, model


def _tests(root):
    return [root / "widget" / "test" / d for d in ("good", "scratch", "spot")]


def _rows(out):
    return list(csv.DictReader((out / "scores.csv").open()))


def test_fit_keeps_a_calibration_and_score_labels_by_default(fitted, tmp_path, capsys):
    root, model_file = fitted
    model = PatchCore.load(model_file, device="cpu")
    cal = model.calibration
    assert cal is not None and cal.images == 8 and cal.scheme == "crossfit"
    assert cal.false_reject_rate == calibration.DEFAULT_FALSE_REJECT_RATE
    assert model.fit_stats["calibration_seconds"] > 0
    assert main(["score", str(model_file), *map(str, _tests(root)), "-o",
                 str(tmp_path / "o"), "--no-overlays"]) == 0
    err = capsys.readouterr().err
    assert "labels: defective above the model's calibrated threshold" in err
    rows = _rows(tmp_path / "o")
    raw = np.array([float(r["score"]) for r in rows])
    norm = np.array([float(r["normalised"]) for r in rows])
    assert [r["label"] for r in rows] == [calibration.LABELS[int(s > cal.image_threshold)]
                                          for s in raw]
    assert ((norm > 0.5) == (raw > cal.image_threshold)).all()
    truth = [0 if "/good/" in r["file"] else 1 for r in rows]
    assert abs(roc_auc_score(truth, raw) - roc_auc_score(truth, norm)) < 1e-6
    meta = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert meta["threshold"] == cal.image_threshold
    assert meta["labelled"] == "defective when score > threshold"


def test_python_api_has_the_verdict(fitted):
    root, model_file = fitted
    model = PatchCore.load(model_file, device="cpu")
    pred = model.predict(_tests(root))
    cal = model.calibration
    assert pred.labels.tolist() == (pred.scores > cal.image_threshold).tolist()
    np.testing.assert_allclose(pred.normalised, calibration.normalise(pred.scores, cal))
    assert len(pred.regions) == len(pred.paths)
    for regions, amap in zip(pred.regions, pred.maps):
        for r in regions:
            assert r["peak"] > cal.pixel_threshold and r["area"] >= 1
            x0, y0, x1, y1 = r["bbox"]
            assert 0 <= x0 < x1 <= amap.shape[1] and 0 <= y0 < y1 <= amap.shape[0]
    # At a pixel threshold below every map's median, each map has a region.
    low = float(min(np.median(m) for m in pred.maps))
    model.calibration = dataclasses.replace(cal, pixel_threshold=low)
    again = model.predict(_tests(root))
    assert all(again.regions) and all(sum(x["area"] for x in r) >= m.size // 3
                                      for r, m in zip(again.regions, again.maps))
    big = model.predict(_tests(root), min_region_area=10 ** 9)
    assert all(r == [] for r in big.regions)


def test_threshold_overrides_raw_or_normalised(fitted, tmp_path, capsys):
    root, model_file = fitted
    good = str(root / "widget" / "test" / "good")
    assert main(["score", str(model_file), good, "-o", str(tmp_path / "a"), "--no-overlays",
                 "--threshold", "-1"]) == 0
    assert "at or above raw score -1.0 (--threshold" in capsys.readouterr().err
    assert {r["label"] for r in _rows(tmp_path / "a")} == {"defective"}
    assert main(["score", str(model_file), good, "-o", str(tmp_path / "b"), "--no-overlays",
                 "--normalised-threshold", "0.999999"]) == 0
    assert {r["label"] for r in _rows(tmp_path / "b")} == {"good"}
    assert main(["score", str(model_file), good, "-o", str(tmp_path / "c"), "--no-overlays",
                 "--normalised-threshold", "0.5", "--threshold", "3"]) == 2
    assert "not both" in capsys.readouterr().err


def test_old_model_file_scores_without_labels(fitted, tmp_path, capsys):
    root, model_file = fitted
    old = tmp_path / "old.safetensors"
    meta, tensors = without_calibration(model_file, old)
    assert PatchCore.load(old, device="cpu").calibration is None
    assert main(["score", str(old), str(root / "widget" / "test" / "good"), "-o",
                 str(tmp_path / "o"), "--no-overlays"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "calibrated" in line]
    assert len(err) == 1 and "no calibrated threshold" in err[0] and "--threshold" in err[0]
    rows = _rows(tmp_path / "o")
    assert rows and "label" not in rows[0] and "normalised" not in rows[0]
    pred = PatchCore.load(old, device="cpu").predict(root / "widget" / "test" / "good")
    assert pred.labels is None and pred.normalised is None and pred.regions == []
    assert main(["score", str(old), str(root / "widget" / "test" / "good"), "-o",
                 str(tmp_path / "p"), "--normalised-threshold", "0.5"]) == 2
    assert "needs a calibrated model" in capsys.readouterr().err
    meta["calibration"] = json.dumps({"image_threshold": 1.0})
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(bad), metadata=meta)
    assert main(["score", str(bad), str(root / "widget" / "test" / "good"), "-o",
                 str(tmp_path / "q")]) == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("rate", ["0", "0.7", "-0.1", "nan", "x"])
def test_bad_false_reject_rate(fitted, tmp_path, capsys, rate):
    root, _ = fitted
    out = tmp_path / "m.safetensors"
    assert main(["fit", str(root / "widget" / "train" / "good"), "-o", str(out),
                 "--false-reject-rate", rate]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--false-reject-rate" in err[0] and "(0, 0.5]" in err[0]
    assert not out.exists()


def test_update_adds_rejected_good_images_and_keeps_the_bank(fitted, tmp_path, capsys):
    root, model_file = fitted
    new = sorted((root / "rod" / "train" / "good").glob("*.png"))[:4]
    first = PatchCore.load(model_file, device="cpu")
    before = first.predict(new)
    assert before.labels.all()  # another product: every one rejected
    out = tmp_path / "m2.safetensors"
    assert main(["fit", "--update", str(model_file), *map(str, new), "-o", str(out),
                 "--quiet"]) == 0
    second = PatchCore.load(out, device="cpu")
    m = first.bank.shape[0]
    assert torch.equal(second.bank[:m], first.bank) and second.bank.shape[0] > m
    u = second.fit_stats["updates"][-1]
    assert u["images"] == 4 and u["rows_added"] == second.bank.shape[0] - m
    after = second.predict(new)
    assert not after.labels.any()
    assert (after.scores < second.calibration.image_threshold).all()
    assert second.calibration.images == first.calibration.images + 4
    # The old rows' neighbors equal a recompute on the updated bank (tie-tolerantly).
    from patchcore_fast.scoring import bank_neighbors
    want = bank_neighbors(second.bank, second.config.num_neighbors)
    assert (second.neighbors == want).float().mean() > 0.999


def test_update_refuses_other_settings(fitted, tmp_path, capsys):
    root, model_file = fitted
    new = str(sorted((root / "rod" / "train" / "good").glob("*.png"))[0])
    for option in (["--backbone", "resnet18"], ["--image-size", "96"],
                   ["--resize", "stretch"]):
        out = tmp_path / "x.safetensors"
        assert main(["fit", "--update", str(model_file), new, "-o", str(out), *option]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--update keeps the model's settings" in err[0]
        assert not out.exists()


def test_evaluate_reports_the_verdict_at_the_model_thresholds(fitted, tmp_path, capsys):
    root, model_file = fitted
    out = tmp_path / "e"
    assert main(["evaluate", str(model_file), str(root), "--category", "widget", "-o",
                 str(out), "--no-overlays"]) == 0
    assert "at the model's thresholds: false rejects" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    a = metrics["at_threshold"]
    model = PatchCore.load(model_file, device="cpu")
    assert a["image_threshold"] == model.calibration.image_threshold
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows
    c = a["counts"]
    assert c["good"] == 3 and c["defective"] == 4
    assert a["false_reject_rate"] == c["false_rejects"] / 3
    assert a["miss_rate"] == c["misses"] / 4
    for k in ("pixel_precision", "pixel_recall", "pixel_iou", "region_hit_rate"):
        assert a[k] is None or 0.0 <= a[k] <= 1.0
    assert c["gt_regions"] >= 4  # every defective image has a mask with a region


def test_score_killed_mid_run_with_overlays_resumes(fitted, tmp_path):
    """Issue #21 / #26 family D: overlays are written as the images are scored and the
    journal records each one once its files are on disk, so a score killed mid-run
    resumes from the images already done, and the result equals an uninterrupted run
    (the model's fixed colour scale: the same overlay bytes)."""
    import signal
    import subprocess
    import time

    from patchcore_fast.journal import JOURNAL

    root, model_file = fitted
    inputs = [str(p) for p in (*_tests(root), root / "widget" / "train" / "good",
                               root / "rod" / "train" / "good", root / "rod" / "test" / "good")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["score", str(model_file), *inputs, "-o", str(full), "--batch-size", "1",
                 "--quiet"]) == 0
    from child import CHILD_CWD, CLI, child_env

    env = child_env()
    proc = subprocess.Popen([*CLI, "score",
                             str(model_file), *inputs, "-o", str(cut), "--batch-size", "1",
                             "--quiet"], env=env, cwd=CHILD_CWD)
    journal = cut / JOURNAL
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 5:
            break  # tag, header and at least 3 images recorded
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "score finished before it could be killed"
    done = len(journal.read_text().splitlines()) - 2
    assert 3 <= done < len(_rows(full))
    assert not (cut / "scores.csv").exists()
    assert main(["score", str(model_file), *inputs, "-o", str(cut), "--batch-size", "1",
                 "--resume", "--quiet"]) == 0
    a, b = _rows(full), _rows(cut)
    assert [r["file"] for r in a] == [r["file"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([float(r["score"]) for r in a], [float(r["score"]) for r in b],
                               rtol=1e-5)
    pngs = sorted(p.relative_to(full) for p in (full / "overlays").rglob("*.png"))
    assert pngs == sorted(p.relative_to(cut) for p in (cut / "overlays").rglob("*.png"))
    assert len(pngs) == len(a)
    assert all((full / p).read_bytes() == (cut / p).read_bytes() for p in pngs)
    # The regions of the images scored before the kill come back from the journal.
    regions = [json.loads((o / "scores.json").read_text())["images"] for o in (full, cut)]
    assert [r["regions"] for r in regions[0]] == [r["regions"] for r in regions[1]]
