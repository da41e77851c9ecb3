"""Hostile and unlucky input on the command line (issue #13, phase 2): output paths that
would climb out of the output folder, land on or inside the inputs or on each other;
formula-like CSV cells and non-finite numbers; ``--resume`` over another run's results
and damaged journals; Ctrl-C at startup and during a run; misleading messages.

Every case runs through :func:`_run`, which checks what the issue asks of each: the
documented exit code, at most three lines on stderr and no traceback, every input file
byte for byte unchanged (SHA-256 before and after), nothing written outside the output
location and no temporary file left behind.
"""

import csv
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from patchcore_fast.cli import main
from patchcore_fast.files import ArraySpool
from patchcore_fast.journal import JOURNAL, JOURNAL_TAG
from patchcore_fast.outputs import csv_text, evaluation_names, unique_names

SMALL = ["--device", "cpu", "--quiet"]
FIT = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--crop", "64",
       "--coreset-ratio", "0.25", *SMALL]


@pytest.fixture(scope="module")
def demo(fit_demo):
    return fit_demo("hostile_cli", seed=13, n_train=4, n_test_good=2, n_test_defect=1)


def _hashes(root: Path, skip: Path | None = None) -> dict[Path, str]:
    """SHA-256 of every file under ``root`` (except under ``skip``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and not (skip and p.is_relative_to(skip)):
            out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv: list[str], capsys, watched: list[Path], out: Path | None, code: int = 2,
         words: str = "") -> list[str]:
    """Run the CLI; check exit code, stderr, untouched inputs and the output location.

    Args:
        argv: the command line.
        watched: folders whose every file must be unchanged and where nothing may appear
            (the output location excepted).
        out: the output location (None: nothing may be written at all).
        code: the exit code expected.
        words: text the last stderr line must hold.

    Returns:
        the stderr lines.
    """
    before = {w: _hashes(w, out) for w in watched}
    out_before = _hashes(out) if out is not None and out.is_dir() else {}
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    if code:
        assert 1 <= len(lines) <= 3 and lines[-1].startswith("patchcore-fast: error: "), err
        assert words in lines[-1], (words, lines[-1])
        assert len(lines[-1]) < 400, lines[-1]
    for w in watched:
        assert _hashes(w, out) == before[w], f"files under {w} changed or appeared"
        assert not [p for p in w.rglob("*.tmp")], "temporary file left behind"
    if code and out is not None:  # refused up front: the output location is untouched too
        assert (_hashes(out) if out.is_dir() else {}) == out_before
    return lines


def _images(folder: Path, names: list[str], size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(names):
        p = folder / n
        Image.new("RGB", (size, size), (30 * i % 255, 90, 160)).save(p)
        out.append(p)
    return out


# ----- 1. every output path checked before any work ---------------------------------------

def test_category_cannot_climb_out(demo, tmp_path, capsys):
    root, _ = demo
    (tmp_path / "cats").mkdir()
    for bad in ("../other/cat", "..", "a/b", "/etc"):
        _run(["fit", str(root), "--category", bad, "-o", str(tmp_path / "cats"), *FIT], capsys,
             [tmp_path, root], None, words="--category")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_category_trailing_slash(demo, tmp_path, capsys):
    root, _ = demo
    cats = tmp_path / "cats"
    _run(["fit", str(root), "--category", "widget/", "-o", str(cats) + "/", *FIT], capsys,
         [root], cats, code=0)
    assert sorted(p.name for p in cats.iterdir()) == ["widget.safetensors"]


def test_output_inside_or_over_the_inputs(demo, tmp_path, capsys):
    _, model = demo
    images = tmp_path / "IMAGES"
    _images(images / "overlays", ["a.png.png", "b.png"])
    _images(images, ["a.png"])
    watched = [images, model.parent]
    # The case: overlays of IMAGES/overlays/*.png would land on themselves.
    _run(["score", str(model), str(images / "overlays"), "-o", str(images), *SMALL], capsys,
         watched, images, words="into the input folder")
    # The output folder is the input folder, or inside it.
    for out in (images, images / "results"):
        _run(["score", str(model), str(images), "-o", str(out), *SMALL], capsys, watched,
             out, words="inside the input folder")
    # An output file would replace an input image given by name (a PNG named scores.json).
    Image.new("RGB", (40, 40)).save(images / "scores.json", format="PNG")
    _run(["score", str(model), str(images / "scores.json"), str(images / "a.png"),
          "-o", str(images), "--no-overlays", *SMALL], capsys, watched, images,
         words="would overwrite the input file")
    # fit: the model file inside the training folder.
    _run(["fit", str(images), "-o", str(images / "m.safetensors"), *FIT], capsys, watched,
         None, words="inside the input folder")


def test_output_that_is_a_file_or_a_folder_in_the_way(demo, tmp_path, capsys):
    root, model = demo
    images = tmp_path / "in"
    _images(images, ["a.png"])
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    t0 = time.perf_counter()
    _run(["score", str(model), str(images), "-o", str(taken), *SMALL], capsys,
         [tmp_path], None, words=f"-o {taken}: {taken} is a file, not a folder")
    out = tmp_path / "out"
    (out / "scores.csv").mkdir(parents=True)
    _run(["score", str(model), str(images), "-o", str(out), *SMALL], capsys, [tmp_path], None,
         words="scores.csv is a folder where that file goes")
    folder_model = tmp_path / "m.safetensors"
    folder_model.mkdir()
    _run(["fit", str(root), "--category", "widget", "-o", str(folder_model), *FIT], capsys,
         [tmp_path], None, words="m.safetensors is a folder where that file goes")
    # Up front: none of these loaded a model or read an image (well under a fit's time).
    print(f"three refusals in {time.perf_counter() - t0:.2f} s")


def test_output_folder_not_writable(demo, tmp_path, capsys, monkeypatch):
    _, model = demo
    images = tmp_path / "in"
    _images(images, ["a.png"])
    # Tests run as root, whom a read-only folder does not stop: mock the OS's answer.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == tmp_path
                        else real(p, m, **k))
    _run(["score", str(model), str(images), "-o", str(tmp_path / "out"), *SMALL], capsys,
         [tmp_path], None, words=f"cannot write in {tmp_path}: permission denied")


def test_unique_names():
    p = [Path("/d/a.png"), Path("/d/a.jpg"), Path("/d/a_1.png"), Path("/e/a.png"),
         Path("/d/A.PNG"), Path("/d/a.png")]
    names = unique_names(p)
    assert len({n.casefold() for n in names}) == len(names)
    assert names[1:3] == ["a.jpg", "a_1.png"]
    assert names[3] == "e/a.png" and names[0].endswith("d/a.png")
    assert unique_names([Path("x/b.png")]) == ["b.png"]


def test_colliding_stems_get_their_own_files(demo, tmp_path, capsys):
    _, model = demo
    images = tmp_path / "in"
    paths = _images(images, ["a.png", "a_1.png"]) + [images / "a.jpg"]
    Image.new("RGB", (40, 40), (250, 10, 10)).save(paths[-1])
    out = tmp_path / "out"
    _run(["score", str(model), *map(str, paths), "-o", str(out), "--save-maps", *SMALL],
         capsys, [images], out, code=0)
    assert sorted(p.name for p in (out / "overlays").rglob("*.png")) == \
        ["a.jpg.png", "a.png.png", "a_1.png.png"]
    assert len(list((out / "maps").rglob("*.npy"))) == 3


def test_evaluate_x_png_and_x_jpg(demo, tmp_path, capsys):
    _, model = demo
    good, bad = tmp_path / "good", tmp_path / "bad"
    _images(good, ["x.png", "y.png"])
    _images(bad, ["x.png"])
    Image.new("RGB", (40, 40), (250, 10, 10)).save(bad / "x.jpg")
    out = tmp_path / "eval"
    _run(["evaluate", str(model), "--good", str(good), "--defective", str(bad), "-o",
          str(out), "--save-maps", *SMALL], capsys, [good, bad], out, code=0)
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    assert len(list((out / "maps").rglob("*.npy"))) == 4


def test_evaluation_names_keep_defect_and_extension():
    class Item:
        def __init__(self, path, defect):
            self.path, self.defect = Path(path), defect

    names = evaluation_names([Item("/t/bad/x.png", "bad"), Item("/t/bad/x.jpg", "bad"),
                              Item("/t/good/x.png", "good")])
    assert names == ["bad/x.png", "bad/x.jpg", "good/x.png"]


def test_demo_data_refuses_a_non_empty_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "widget").mkdir()
    (mine / "widget" / "notes.txt").write_text("my own notes")
    _run(["demo-data", str(mine), "--quiet"], capsys, [tmp_path], None,
         words="is not empty; choose an empty or new folder, or give --overwrite")
    (tmp_path / "file").write_text("x")
    _run(["demo-data", str(tmp_path / "file"), "--quiet"], capsys, [tmp_path], None,
         words="is a file, not a folder")
    assert main(["demo-data", str(mine), "--overwrite", "--quiet"]) == 0
    assert (mine / "widget" / "notes.txt").read_text() == "my own notes"
    assert len(list((mine / "widget" / "train" / "good").glob("*.png"))) == 40


# ----- 2. CSV cells, JSON numbers ----------------------------------------------------------

def test_csv_formula_cells_neutralised():
    rows = [["=HYPERLINK(1)", "+1", "-cmd", "@SUM", "\tx", "\rx", "ok=", -1.5, 3]]
    text = csv_text(["=h", "b", "c", "d", "e", "f", "g", "h", "i"], rows)
    got = list(csv.reader(io.StringIO(text, newline="")))
    assert got[0][0] == "'=h"
    assert got[1] == ["'=HYPERLINK(1)", "'+1", "'-cmd", "'@SUM", "'\tx", "'\rx", "ok=",
                      "-1.5", "3"]


def test_score_csv_formula_file_names(demo, tmp_path, capsys, monkeypatch):
    _, model = demo
    names = ["=cmd.png", "+a.png", "-b.png", "@c.png"]
    _images(tmp_path / "in", names)
    monkeypatch.chdir(tmp_path / "in")
    out = tmp_path / "out"
    _run(["score", "-o", str(out), "--no-overlays", "--threshold", "1", *SMALL, "--",
          str(model), *names], capsys, [tmp_path / "in"], out, code=0)
    cells = [r[0] for r in csv.reader((out / "scores.csv").open())][1:]
    assert cells == ["'" + n for n in names]
    # The JSON keeps the true names, and only strict JSON.
    data = json.loads((out / "scores.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [r["file"] for r in data["images"]] == names


@pytest.mark.parametrize("argv,words", [
    (["score", "m.safetensors", "a.png", "-o", "o", "--threshold", "nan"], "--threshold"),
    (["score", "m.safetensors", "a.png", "-o", "o", "--threshold", "inf"], "--threshold"),
    (["score", "m.safetensors", "a.png", "-o", "o", "--threshold", "-Infinity"],
     "--threshold"),
    (["fit", "d", "-o", "m.safetensors", "--seed", "99999999999999999999"],
     "--seed: expected an integer from 0 to 2**64 - 1"),
    (["fit", "d", "-o", "m.safetensors", "--seed", "-1"], "--seed"),
    (["demo-data", "d", "--seed", "1e3"], "--seed"),
    # Checked in one process too, not only once torchrun starts the collectives.
    (["score", "m.safetensors", "a.png", "-o", "o", "--dist-timeout", "-1"],
     "--dist-timeout: expected a positive number of seconds"),
    (["evaluate", "m.safetensors", "d", "-o", "o", "--dist-timeout", "nan"], "--dist-timeout"),
    # datetime.timedelta overflows: a one-line refusal, not an OverflowError under torchrun.
    (["score", "m.safetensors", "a.png", "-o", "o", "--dist-timeout", "1e15"],
     "--dist-timeout: expected a positive number of seconds, at most 2,592,000"),
    # A width that no allocator can hold: refused before any work, not a traceback.
    (["fit", "d", "-o", "m.safetensors", "--embed-dim", "1000000000000"],
     "_embed_dim (--embed-dim) should be at most 65,536"),
])
def test_numbers_refused_at_the_command_line(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(argv, capsys, [tmp_path], None, words=words)


@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                 "8000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
    pytest.param("cuda", id="torch.OutOfMemoryError"),
])
def test_out_of_memory_is_one_line(error, tmp_path, capsys, monkeypatch):
    import torch

    from patchcore_fast import cli

    if error == "cuda":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def fit(args, log):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(cli._VERBS, "fit", fit)
    lines = _run(["fit", "d", "-o", "m.safetensors", *SMALL], capsys, [tmp_path], None,
                 words="out of memory")
    assert "lower --batch-size" in lines[-1]


def test_other_runtime_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only allocation failures become one line: a bug stays a bug."""
    from patchcore_fast import cli

    def fit(args, log):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(cli._VERBS, "fit", fit)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["fit", "d", "-o", "m.safetensors", *SMALL])


# ----- 3. --resume ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(demo, fit_demo):
    _, other = fit_demo("hostile_cli_other", seed=14, n_train=4, n_test_good=1,
                        n_test_defect=1)
    return demo[1], other


def test_resume_refuses_another_model_or_options(demo, two_models, tmp_path, capsys):
    root, _ = demo
    model, other = two_models
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"
    assert main(["score", str(model), str(images), "-o", str(out), *SMALL]) == 0
    # A finished run's scores.json, then a killed run's journal: each is checked.
    for journal in (False, True):
        if journal:
            run = json.loads((out / "scores.json").read_text())["run"]
            (out / JOURNAL).write_text(JOURNAL_TAG + json.dumps(run) + "\nfile,score\n")
            (out / "scores.json").unlink()
        _run(["score", str(other), str(images), "-o", str(out), "--resume", *SMALL], capsys,
             [root, tmp_path], None, words="the model file's SHA-256")
        _run(["score", str(model), str(images), "-o", str(out), "--resume", "--save-maps",
              *SMALL], capsys, [root, tmp_path], None, words="--save-maps: False then, True now")
        _run(["score", str(model), str(images), "-o", str(out), "--resume", "--no-overlays",
              *SMALL], capsys, [root, tmp_path], None, words="overlays")
    # The threshold labels every row at the end: it may change.
    assert main(["score", str(model), str(images), "-o", str(out), "--resume",
                 "--threshold", "0", *SMALL]) == 0
    labels = {r["label"] for r in json.loads((out / "scores.json").read_text())["images"]}
    assert labels == {"defective"}


def test_resume_damaged_journals(demo, tmp_path, capsys):
    root, model = demo
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"
    out.mkdir()
    # A 0-byte journal (the disk filled before its header): nothing to keep, started anew.
    (out / JOURNAL).write_bytes(b"")
    lines = _run(["score", str(model), str(images), "-o", str(out), "--resume",
                  "--device", "cpu"], capsys, [root], out, code=0)
    assert "scored 2 images" in lines[-1], lines
    assert not (out / JOURNAL).exists()
    # A journal without the header (an older version's): one line, nothing changed.
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / JOURNAL).write_text(f"file,score\n{images / '000.png'},1.0\n")
    _run(["score", str(model), str(images), "-o", str(out2), "--resume", *SMALL], capsys,
         [root, tmp_path], None, words="has no header naming its model")
    # A header cut short by a kill: holds no row; the run starts the journal again.
    run = json.loads((out / "scores.json").read_text())["run"]
    (out2 / JOURNAL).write_text(JOURNAL_TAG + json.dumps(run)[:20])
    assert main(["score", str(model), str(images), "-o", str(out2), "--resume", *SMALL]) == 0
    assert len(json.loads((out2 / "scores.json").read_text())["images"]) == 2


def test_journal_survives_a_failed_append(demo, tmp_path, monkeypatch):
    # The disk fills while a row is appended: the rows before it and the header stay valid.
    from patchcore_fast.journal import Journal, read_done
    from patchcore_fast.errors import PatchCoreError

    run = {"model_sha256": "x", "weights_sha256": None, "overlays": True, "save_maps": False}
    j = Journal(tmp_path, resume=False, run=run)
    j.record([(Path("a.png"), 1.0)])
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(PatchCoreError, match="No space left on device"):
        j.record([(Path("b.png"), 2.0)])
    j.close()
    monkeypatch.setattr(os, "fsync", real)
    with open(tmp_path / JOURNAL, "a") as fh:
        fh.write("c.png,3")  # and a row cut short
    assert read_done(tmp_path, run) == {"a.png": 1.0, "b.png": 2.0}
    j = Journal(tmp_path, resume=True, run=run)
    j.record([(Path("d\r,\n.png"), 4.0)])  # a name the csv module does not quote alone
    j.close()
    assert read_done(tmp_path, run) == {"a.png": 1.0, "b.png": 2.0, "d\r,\n.png": 4.0}
    assert (tmp_path / JOURNAL).read_text().splitlines()[0].startswith(JOURNAL_TAG)


# ----- 4. Ctrl-C -------------------------------------------------------------------------------

def _entry_command() -> list[str]:
    """What the installed console script runs (its entry point, read from the metadata)."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "patchcore-fast"]
    module, func = ep.value.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; "
            f"sys.exit({func}())"]


def test_entry_point_imports_nothing_heavy():
    cmd = _entry_command()
    module = cmd[-1].split("from ")[1].split(" import")[0]
    assert module != "patchcore_fast.cli"  # the package root imports torch
    proc = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def _interrupt(argv: list[str], when, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Start the console script, wait until ``when(process)`` is true, send SIGINT."""
    proc = subprocess.Popen(_entry_command() + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    t0 = time.monotonic()
    while not when(proc) and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    print(f"SIGINT at {time.monotonic() - t0:.2f} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _loading_torch(proc) -> bool:
    try:
        return "torch" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("when", ["0.2 s", "while torch loads"])
def test_ctrl_c_at_startup(when, tmp_path):
    t0 = time.monotonic()
    cond = ((lambda p: time.monotonic() - t0 >= 0.2) if when == "0.2 s"
            else _loading_torch)
    proc = _interrupt(["score", "m.safetensors", "x.png", "-o", str(tmp_path / "o")], cond)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "patchcore-fast: interrupted", proc.stderr
    assert not list(tmp_path.iterdir())


def test_ctrl_c_during_a_run(demo, tmp_path):
    root, model = demo
    target = tmp_path / "m.safetensors"
    lines: list[str] = []

    def fitting(proc) -> bool:  # the first log line: the fit has begun
        lines.append(proc.stderr.readline())
        return lines[-1].startswith("fit ")

    proc = _interrupt(["fit", str(root), "--category", "widget", "-o", str(target),
                       *FIT[:-1]], fitting)
    err = "".join(lines) + proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    # Besides the log line and progress bars: one line.
    said = [l for l in err.splitlines() if l.startswith("patchcore-fast:")]
    assert said == ["patchcore-fast: interrupted"], err
    assert not list(tmp_path.iterdir())


# ----- 5. messages ---------------------------------------------------------------------------

def test_model_path_that_is_a_folder(demo, tmp_path, capsys):
    root, _ = demo
    folder = tmp_path / "models"
    folder.mkdir()
    _run(["score", str(folder), str(root / "widget" / "test" / "good"), "-o",
          str(tmp_path / "o"), *SMALL], capsys, [tmp_path, root], None,
         words=f"model file {folder} is a folder")
    _run(["evaluate", str(folder / "x.safetensors"), str(root), "--category", "widget", "-o",
          str(tmp_path / "o"), *SMALL], capsys, [tmp_path, root], None,
         words="does not exist")


def test_temp_dir_named_in_the_hint(demo, tmp_path, capsys, monkeypatch):
    root, model = demo
    _run(["score", str(model), str(root / "widget" / "test" / "good"), "-o",
          str(tmp_path / "o"), "--temp-dir", str(tmp_path / "nope"), *SMALL], capsys,
         [tmp_path, root], None, words=f"--temp-dir {tmp_path / 'nope'} is not an existing")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    import numpy as np
    from patchcore_fast.errors import PatchCoreError

    for temp_dir, hint in ((tmp_path, "choose another folder with --temp-dir"),
                           (None, "set TMPDIR (or --temp-dir)")):
        with pytest.raises(PatchCoreError, match=hint.replace("(", r"\(").replace(")", r"\)")):
            ArraySpool((2,), np.float32, temp_dir).append(np.zeros((1, 2), np.float32))


def test_skipped_count_says_what_was_skipped(demo, tmp_path, capsys):
    root, model = demo
    images = tmp_path / "in"
    _images(images, ["ok.png"])
    (images / "zero.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(images / "anim.gif")
    os.symlink(tmp_path / "gone.png", images / "link.png")
    out = tmp_path / "out"
    lines = _run(["score", str(model), str(images), "-o", str(out), "--device", "cpu"],
                 capsys, [images], out, code=0)
    assert "skipped 3 files (unreadable, unsupported, not images or dangling links" \
        in lines[-1], lines
