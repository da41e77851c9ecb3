"""score writes maps as it goes and --resume skips the images already scored."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from patchcore_fast.cli import main
from patchcore_fast.journal import JOURNAL, JOURNAL_TAG


@pytest.fixture(scope="module")
def setup(fit_demo):
    root, model = fit_demo("resume", seed=3, n_train=6, n_test_good=3, n_test_defect=2)
    inputs = [str(root / "widget" / "test" / d) for d in ("good", "scratch", "spot")]
    full = root / "full"
    assert main(["score", str(model), *inputs, "-o", str(full), "--save-maps",
                 "--batch-size", "2", "--quiet"]) == 0
    return model, inputs, full


def _same_scores(a: Path, b: Path, exact_rows: int = 0) -> None:
    """Same files in the same order; the first ``exact_rows`` scores (copied from the
    journal) exactly, the rest to float32 accuracy (batches composed differently from the
    reference run change the backbone's rounding)."""
    ra, rb = (list(csv.DictReader(p.open())) for p in (a / "scores.csv", b / "scores.csv"))
    assert [r["file"] for r in ra] == [r["file"] for r in rb]
    assert [r["score"] for r in ra[:exact_rows]] == [r["score"] for r in rb[:exact_rows]]
    np.testing.assert_allclose([float(r["score"]) for r in ra],
                               [float(r["score"]) for r in rb], rtol=1e-5)


def _overlays(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "overlays").rglob("*.png"))


def test_full_run_outputs(setup):
    _, _, full = setup
    rows = json.loads((full / "scores.json").read_text())["images"]
    assert len(rows) == 7 and len(_overlays(full)) == 7
    assert len(list((full / "maps").rglob("*.npy"))) == 7
    assert not (full / JOURNAL).exists()


def test_resume_after_a_kill(setup, tmp_path, capsys):
    model, inputs, full = setup
    out = tmp_path / "out"
    out.mkdir()
    lines = (full / "scores.csv").read_text().splitlines()
    # A killed run: three images finished, the fourth's line cut short.
    # Its header records the run: the same model, without --save-maps (as resumed below).
    run = {**json.loads((full / "scores.json").read_text())["run"], "save_maps": False}
    (out / JOURNAL).write_text(JOURNAL_TAG + json.dumps(run) + "\n" + "\n".join(lines[:4])
                               + "\n" + lines[4][:10])
    capsys.readouterr()
    assert main(["score", str(model), *inputs, "-o", str(out), "--resume",
                 "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming: 3 of 7 images already scored" in err, err
    assert "scored 4 images" in err, err
    _same_scores(out, full, exact_rows=3)
    assert not (out / JOURNAL).exists()
    # Overlays of this run only: the earlier run wrote its own before it was killed.
    assert len(_overlays(out)) == 4

    # Resuming a finished run scores nothing and keeps the result, byte for byte.
    before = (out / "scores.csv").read_text()
    assert main(["score", str(model), *inputs, "-o", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "scored 0 images" in err
    assert (out / "scores.csv").read_text() == before


def test_without_resume_scores_everything(setup, tmp_path, capsys):
    model, inputs, full = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL).write_text((full / "scores.csv").read_text())
    assert main(["score", str(model), *inputs, "-o", str(out), "--no-overlays"]) == 0
    assert "scored 7 images" in capsys.readouterr().err
    _same_scores(out, full)
