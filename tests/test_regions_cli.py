"""Defect regions through ``score`` (issue #21 item 3): regions in scores.json and their
summary in scores.csv, ``--min-region-area``, binary masks with ``--save-masks``, and the
bad inputs (one line, exit 2, nothing written)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from patchcore_fast.cli import main
from patchcore_fast.model import PatchCore
from patchcore_fast.outputs import unique_names
from patchcore_fast.regions import regions_json
from model_files import without_calibration


@pytest.fixture(scope="module")
def fitted(fit_demo):
    return fit_demo("regions", seed=11, n_train=8, n_test_good=2, n_test_defect=3)


def _inputs(root):
    return [root / "widget" / "test" / d for d in ("good", "scratch", "spot")]


def _score(model, root, out, *extra):
    return main(["score", str(model), *map(str, _inputs(root)), "-o", str(out), "--quiet",
                 *extra])


def test_scores_json_regions_match_the_api_and_masks_match_the_regions(fitted, tmp_path):
    root, model_file = fitted
    out = tmp_path / "o"
    assert _score(model_file, root, out, "--save-masks") == 0
    meta = json.loads((out / "scores.json").read_text())
    model = PatchCore.load(model_file, device="cpu")
    pred = model.predict(_inputs(root))
    assert meta["regions"]["pixel_threshold"] == model.calibration.pixel_threshold
    assert meta["regions"]["min_region_area"] == 0
    by_file = {r["file"]: r for r in meta["images"]}
    assert len(by_file) == len(pred.paths)
    names = dict(zip(pred.paths, unique_names(pred.paths)))
    rows = {r["file"]: r for r in csv.DictReader((out / "scores.csv").open())}
    with_regions = 0
    for path, found, amap in zip(pred.paths, pred.regions, pred.maps):
        rec = by_file[str(path)]
        assert rec["regions"] == regions_json(found)
        with_regions += bool(found)
        mask = np.asarray(Image.open(out / "masks" / f"{names[path]}.png"))
        assert mask.shape == amap.shape == Image.open(path).size[::-1]
        assert set(np.unique(mask)) <= {0, 255}
        # The mask is the regions' pixels: as many, and the pixels above the threshold.
        assert (mask == 255).sum() == sum(r["area"] for r in found)
        np.testing.assert_array_equal(mask == 255, amap > model.calibration.pixel_threshold)
        row = rows[str(path)]
        assert int(row["regions"]) == len(found)
        assert int(row["largest_region_area"]) == max((r["area"] for r in found), default=0)
    # The defective demo images have regions at the calibrated threshold (and the test
    # would otherwise compare empty lists only).
    assert with_regions >= 2


def test_min_region_area_drops_small_regions(fitted, tmp_path):
    root, model_file = fitted
    assert _score(model_file, root, tmp_path / "all", "--no-overlays") == 0
    every = json.loads((tmp_path / "all" / "scores.json").read_text())["images"]
    areas = sorted(r["area"] for rec in every for r in rec["regions"])
    assert areas, "no regions to filter"
    cut = areas[len(areas) // 2] + 1  # leaves out at least half of the regions
    out = tmp_path / "cut"
    assert _score(model_file, root, out, "--no-overlays", "--save-masks",
                  "--min-region-area", str(cut)) == 0
    meta = json.loads((out / "scores.json").read_text())
    assert meta["regions"]["min_region_area"] == cut
    for before, after in zip(every, meta["images"]):
        assert after["regions"] == [r for r in before["regions"] if r["area"] >= cut]
    # Labels are the image threshold's: the minimum area does not change them.
    assert [r["label"] for r in every] == [r["label"] for r in meta["images"]]
    masks = sorted((out / "masks").rglob("*.png"))
    assert sum(int((np.asarray(Image.open(m)) == 255).sum()) for m in masks) == \
        sum(r["area"] for rec in meta["images"] for r in rec["regions"])


@pytest.mark.parametrize("value", ["-1", "2.5", "x"])
def test_bad_min_region_area(fitted, tmp_path, capsys, value):
    root, model_file = fitted
    out = tmp_path / "o"
    assert _score(model_file, root, out, "--min-region-area", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--min-region-area" in err[0] and ">= 0" in err[0], err
    assert not out.exists()


def test_resume_with_another_min_region_area_is_refused(fitted, tmp_path, capsys):
    root, model_file = fitted
    out = tmp_path / "o"
    assert _score(model_file, root, out, "--no-overlays") == 0
    assert _score(model_file, root, out, "--no-overlays", "--resume",
                  "--min-region-area", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--min-region-area" in err[0], err


def test_save_masks_needs_a_calibrated_model(fitted, tmp_path, capsys):
    root, model_file = fitted
    old = tmp_path / "old.safetensors"
    without_calibration(model_file, old)
    out = tmp_path / "o"
    assert _score(old, root, out, "--save-masks") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save-masks" in err[0] and "refit" in err[0], err
    assert not out.exists()
    # Without masks it scores, with no regions (no pixel threshold) and no region columns.
    assert _score(old, root, out, "--no-overlays") == 0
    meta = json.loads((out / "scores.json").read_text())
    assert meta["regions"] is None and all("regions" not in r for r in meta["images"])
    assert "regions" not in next(csv.DictReader((out / "scores.csv").open()))


def test_resume_reads_the_regions_back_and_refuses_damaged_ones(fitted, tmp_path, capsys):
    from patchcore_fast.journal import JOURNAL, JOURNAL_TAG, REGIONS

    root, model_file = fitted
    full = tmp_path / "full"
    assert _score(model_file, root, full, "--no-overlays") == 0
    meta = json.loads((full / "scores.json").read_text())
    first = meta["images"][0]
    head = JOURNAL_TAG + json.dumps(meta["run"]) + f"\nfile,score,{REGIONS}\n"
    for text, code in ((json.dumps(first["regions"]), 0), ("5", 2), ('{"area": 3}', 2)):
        out = tmp_path / f"o{code}{len(text)}"
        out.mkdir()
        (out / JOURNAL).write_text(head + f"{first['file']},{first['score']},"
                                   + '"' + text.replace('"', '""') + '"\n')
        assert _score(model_file, root, out, "--no-overlays", "--resume") == code
        err = capsys.readouterr().err.strip().splitlines()
        if code:
            assert len(err) == 1 and "damaged" in err[0], err
        else:
            again = json.loads((out / "scores.json").read_text())["images"]
            assert again == meta["images"]
