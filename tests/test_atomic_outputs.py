"""A run killed while it writes leaves every output file either old or new, never half.

Each output goes to a temporary file in its folder and is renamed onto its name
(``files.atomic_path``). The tests run the real command in a child process that SIGKILLs
itself at a chosen rename, i.e. after the temporary file is complete and before it takes
the name: the worst moment. Then every visible file must be whole (PNG decodes, .npy
loads, CSV and JSON parse), a file that existed before must be byte-identical, and the
killed run can be finished (``score --resume``) or redone.
"""

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.cli import main
from patchcore_fast.journal import JOURNAL
from patchcore_fast.outputs import unique_names
from child import CHILD_CWD, child_env

SMALL = ["--image-size", "64", "--crop", "64", "--device", "cpu", "--quiet"]

# The child replaces os.replace by a version that kills the process at the chosen call:
# by count ("3": the third rename) or by the target's name ("metrics.json").
CHILD = """
import os, signal, sys
when, argv = sys.argv[1], sys.argv[2:]
real, calls = os.replace, [0]
def replace(src, dst, *a, **k):
    calls[0] += 1
    if (when.isdigit() and calls[0] == int(when)) or os.path.basename(str(dst)) == when:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from patchcore_fast.cli import main
sys.exit(main(argv))
"""


def _killed_run(when: str, argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, when, *argv], capture_output=True,
                          text=True, env=child_env(), cwd=CHILD_CWD)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _assert_whole(folder: Path, size: tuple[int, int] = (256, 256)) -> None:
    """Every visible output parses completely (maps at the demo photos' own size)."""
    for p in _visible(folder):
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".npy":
            assert np.load(p).shape == size, p
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            rows = list(csv.DictReader(p.open()))
            assert rows and all(r["score"] for r in rows), p
        elif p.suffix == ".safetensors":
            PatchCore.load(p, device="cpu")


@pytest.fixture(scope="module")
def setup(fit_demo):
    return fit_demo("atomic", seed=5, n_train=6, n_test_good=2, n_test_defect=1)


def test_fit_killed_at_the_rename_keeps_the_old_model(setup, tmp_path):
    root, model = setup
    target = tmp_path / "m.safetensors"
    target.write_bytes(model.read_bytes())
    argv = ["fit", str(root), "--category", "widget", "-o", str(target), "--backbone",
            "efficientnet_lite0", "--coreset-ratio", "0.05", *SMALL]
    assert _killed_run("m.safetensors", argv) == -signal.SIGKILL
    assert target.read_bytes() == model.read_bytes()
    _assert_whole(tmp_path)
    # Nothing but the (hidden) temporary file of the killed run is left; a rerun works.
    assert main(argv) == 0
    assert PatchCore.load(target).bank.shape[0] < PatchCore.load(model).bank.shape[0]


def test_score_killed_at_every_stage_then_resumed(setup, tmp_path):
    root, model = setup
    inputs = [str(root / "widget" / "test" / d) for d in ("good", "scratch", "spot")]
    argv = ["score", str(model), *inputs, "--save-maps", "--batch-size", "2", *SMALL[4:]]
    full = tmp_path / "full"
    assert main([*argv, "-o", str(full)]) == 0
    want = list(csv.DictReader((full / "scores.csv").open()))
    n = len(want)                    # 4 images: overlay + map each, then CSV and JSON
    names = dict(zip((r["file"] for r in want), unique_names([Path(r["file"]) for r in want])))
    renames = 2 * n + 2
    for k in (1, 2, 2 * n, 2 * n + 1, renames):
        out = tmp_path / f"kill{k}"
        assert _killed_run(str(k), [*argv, "-o", str(out)]) == -signal.SIGKILL, k
        _assert_whole(out)
        # Renames so far: k - 1, an overlay and a map per image, from the writer threads in
        # whatever order they finish; each rename is one whole file.
        renamed = min(k - 1, 2 * n)
        pngs, npys = ({str(p.relative_to(out / d))[:-4] for p in (out / d).rglob(f"*.{x}")}
                      for d, x in (("overlays", "png"), ("maps", "npy")))
        assert len(pngs) + len(npys) == renamed, k
        # The journal (its run record, then CSV rows) lists a prefix of the inputs, in order,
        # each of them with both files in place. It may lag the files by the images whose
        # record the main thread had not written yet (the resumed run redoes those).
        done = list(csv.DictReader((out / JOURNAL).read_text().splitlines()[1:])) \
            if (out / JOURNAL).exists() else []
        assert [r["file"] for r in done] == [r["file"] for r in want[:len(done)]], k
        for r in done:
            assert names[r["file"]] in pngs & npys, (k, r["file"])
        if k == 1:
            assert not done
        if k > 2 * n:   # every file written: the CSV waits for the last record
            assert len(done) == n, k
        assert (out / "scores.json").exists() == (k > renames)
        assert (out / "scores.csv").exists() == (k > 2 * n + 1)
        assert main([*argv, "-o", str(out), "--resume"]) == 0
        got = list(csv.DictReader((out / "scores.csv").open()))
        assert [r["file"] for r in got] == [r["file"] for r in want], k
        np.testing.assert_allclose([float(r["score"]) for r in got],
                                   [float(r["score"]) for r in want], rtol=1e-5)
        assert len(list((out / "overlays").rglob("*.png"))) == n
        assert not (out / JOURNAL).exists()


def test_evaluate_killed_keeps_the_old_metrics(setup, tmp_path):
    root, model = setup
    out = tmp_path / "eval"
    argv = ["evaluate", str(model), str(root), "--category", "widget", "-o", str(out),
            *SMALL[4:]]
    assert main(argv) == 0
    old = (out / "metrics.json").read_bytes()
    (out / "metrics.json").write_bytes(old.replace(b'"category"', b'"old_run": 1, "category"'))
    marked = (out / "metrics.json").read_bytes()
    assert _killed_run("metrics.json", argv) == -signal.SIGKILL
    assert (out / "metrics.json").read_bytes() == marked
    _assert_whole(out)
    assert main(argv) == 0
    assert (out / "metrics.json").read_bytes() != marked
