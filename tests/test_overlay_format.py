"""``--overlay-format jpg``: score and evaluate write JPEG overlays (quality 90) instead of
PNGs, the same pictures up to JPEG's loss; --resume keeps one format per run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchcore_fast.cli import main


@pytest.fixture(scope="module")
def fitted(fit_demo):
    return fit_demo("overlay-format", seed=11, n_train=6, n_test_good=2, n_test_defect=2)


def _tests(root):
    return [str(root / "widget" / "test" / d) for d in ("good", "scratch", "spot")]


def _overlays(out, ext):
    return sorted((out / "overlays").rglob(f"*.{ext}"))


def test_score_writes_jpeg_overlays_of_the_same_pictures(fitted, tmp_path):
    root, model = fitted
    png, jpg = tmp_path / "png", tmp_path / "jpg"
    assert main(["score", str(model), *_tests(root), "-o", str(png), "--quiet"]) == 0
    assert main(["score", str(model), *_tests(root), "-o", str(jpg), "--quiet",
                 "--overlay-format", "jpg"]) == 0
    pngs, jpgs = _overlays(png, "png"), _overlays(jpg, "jpg")
    assert len(jpgs) == len(pngs) > 0 and not _overlays(jpg, "png")
    assert [p.name[:-4] for p in pngs] == [p.name[:-4] for p in jpgs]  # a.png.jpg
    for p, j in zip(pngs, jpgs):
        with Image.open(p) as a, Image.open(j) as b:
            assert b.format == "JPEG" and b.size == a.size
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.mean() < 4  # quality 90: the same picture
    # The scores and the run's other outputs do not depend on the format.
    a, b = (json.loads((d / "scores.json").read_text()) for d in (png, jpg))
    assert [r["score"] for r in a["images"]] == [r["score"] for r in b["images"]]
    assert b["run"]["overlay_format"] == "jpg" and a["run"]["overlay_format"] == "png"


def test_resume_keeps_the_format(fitted, tmp_path, capsys):
    root, model = fitted
    out = tmp_path / "o"
    assert main(["score", str(model), *_tests(root), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", str(model), *_tests(root), "-o", str(out), "--quiet", "--resume",
                 "--overlay-format", "jpg"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overlay-format: png then, jpg now" in err
    assert not _overlays(out, "jpg")
    # The same format resumes (nothing left to score).
    assert main(["score", str(model), *_tests(root), "-o", str(out), "--quiet",
                 "--resume"]) == 0


def test_evaluate_writes_jpeg_overlays(fitted, tmp_path):
    root, model = fitted
    out = tmp_path / "e"
    assert main(["evaluate", str(model), str(root), "--category", "widget", "-o", str(out),
                 "--quiet", "--overlay-format", "jpg"]) == 0
    jpgs = _overlays(out, "jpg")
    assert {p.parent.name for p in jpgs} == {"good", "scratch", "spot"}
    assert not _overlays(out, "png")
    with Image.open(jpgs[0]) as img:
        assert img.format == "JPEG"


def test_other_formats_are_refused(fitted, tmp_path, capsys):
    root, model = fitted
    assert main(["score", str(model), *_tests(root), "-o", str(tmp_path / "o"),
                 "--overlay-format", "gif"]) == 2
    assert "--overlay-format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
