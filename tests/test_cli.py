"""The command line: a small end-to-end run, save/load/score identity and bad input."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore, PatchCoreConfig
from patchcore_fast.cli import main
from patchcore_fast.demo import write_demo_data

SMALL = ["--image-size", "64", "--crop", "64", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, seed=1, n_train=8, n_test_good=3, n_test_defect=3)
    return root


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "widget.safetensors"
    rc = main(["fit", str(demo), "--category", "widget", "-o", str(out),
               "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.25", *SMALL])
    assert rc == 0 and out.is_file()
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err
    # Exactly one error line, last; anything before it is a one-line warning naming a file.
    assert lines and lines[-1].startswith("patchcore-fast: error: "), err
    assert all(l.startswith("patchcore-fast: warning: skipping ") for l in lines[:-1]), err
    return lines[-1]


def test_help_of_every_verb(capsys):
    for verb in ("fit", "score", "evaluate", "study", "demo-data"):
        assert main([verb, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "examples" in text
        if verb in ("score", "evaluate"):  # omitted runtime options keep the model's own
            assert text.count("default: the model's saved setting") == 3, text
            assert "(default 8)" not in text and "(default 0)" not in text, text
        elif verb != "demo-data":
            assert "images per batch (default 8)" in text, text


def test_evaluate_and_score_outputs(fitted, demo, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(fitted), str(demo), "--category", "widget", "-o", str(out),
                 *SMALL[4:]]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_threshold", "counts",
                "per_defect"):
        assert key in m
    assert m["counts"] == {"images": 9, "good": 3, "defective": 6}
    assert set(m["per_defect"]) == {"scratch", "spot"}
    assert (out / "roc.png").is_file() and len(list((out / "overlays").rglob("*.png"))) == 9
    sc = tmp_path / "score"
    imgs = demo / "widget" / "test" / "spot"
    assert main(["score", str(fitted), str(imgs), "-o", str(sc), "--threshold",
                 str(m["f1_threshold"]), "--save-maps", *SMALL[4:]]) == 0
    rows = list(csv.DictReader((sc / "scores.csv").open()))
    assert len(rows) == 3 and set(rows[0]) == {"file", "score", "normalised", "label",
                                                "regions", "largest_region_area"}
    js = json.loads((sc / "scores.json").read_text())
    assert len(js["images"]) == 3 and js["threshold"] == m["f1_threshold"]
    # Maps come back at the photo's own size (issue #15), not the 64 x 64 input.
    assert np.load(sc / "maps" / "000.png.npy").shape == (256, 256)
    assert len(list((sc / "overlays").glob("*.png"))) == 3
    assert not [p for p in _files(tmp_path) if p.name.endswith(".tmp")]


def test_study_rows_match_fit_and_evaluate(fitted, demo, tmp_path):
    # The study fits every ratio from one feature pass and scores spooled test features:
    # each row must be what fit + evaluate give at that ratio.
    out = tmp_path / "study"
    assert main(["study", str(demo), "--category", "widget", "-o", str(out),
                 "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.25", "0.05",
                 *SMALL]) == 0
    rows = list(csv.DictReader((out / "study.csv").open()))
    assert [float(r["coreset_ratio"]) for r in rows] == [0.05, 0.25]
    assert (out / "study.png").is_file() and (out / "study.json").is_file()
    ev = tmp_path / "eval"
    assert main(["evaluate", str(fitted), str(demo), "--category", "widget", "-o", str(ev),
                 "--no-overlays", *SMALL[4:]]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert int(rows[1]["bank_rows"]) == PatchCore.load(fitted).bank.shape[0]
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        assert float(rows[1][key]) == pytest.approx(m[key], abs=1e-12), key
    assert int(rows[0]["bank_rows"]) < int(rows[1]["bank_rows"])


@pytest.mark.parametrize("verb", ["fit", "study"])
def test_random_weights_warn_in_every_verb_that_builds_a_model(verb, demo, tmp_path, capsys,
                                                               monkeypatch):
    from patchcore_fast import cli

    # The warning is the point, not the run: no model is fitted.
    monkeypatch.setattr(cli.datasets, "fit_targets", lambda *a: [])
    monkeypatch.setattr(cli.evaluation, "study_category", lambda *a: [])
    monkeypatch.setattr(cli.outputs, "write_study", lambda *a: None)
    out = tmp_path / ("m.safetensors" if verb == "fit" else "study")
    capsys.readouterr()
    assert main([verb, str(demo), "--category", "widget", "-o", str(out), "--backbone",
                 "resnet18", "--pretrained", "false", *SMALL]) == 0
    err = capsys.readouterr().err
    assert "warning: --pretrained false: random backbone weights" in err, err


def test_save_load_score_identical(demo, tmp_path):
    cfg = PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, crop=64,
                          coreset_ratio=0.2, device="cpu")
    model = PatchCore(cfg).fit(demo / "widget" / "train" / "good")
    images = demo / "widget" / "test" / "scratch"
    before = model.predict(images)
    model.save(tmp_path / "m.safetensors")
    again = PatchCore.load(tmp_path / "m.safetensors", device="cpu")
    assert again.config == cfg
    assert torch.equal(again.bank, model.bank)
    after = again.predict(images)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.maps, before.maps)
    # And through the CLI, twice: identical scores.csv.
    for name in ("a", "b"):
        assert main(["score", str(tmp_path / "m.safetensors"), str(images), "-o",
                     str(tmp_path / name), "--no-overlays", "--quiet", "--device", "cpu"]) == 0
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()
    got = [float(r["score"]) for r in csv.DictReader((tmp_path / "a" / "scores.csv").open())]
    np.testing.assert_allclose(got, before.scores, rtol=0, atol=0)


def test_fit_skips_bad_files_and_counts_them(demo, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((demo / "widget" / "train" / "good").glob("*.png"))[:4]:
        (good / p.name).write_bytes(p.read_bytes())
    (good / "zero.png").write_bytes(b"")
    (good / "trunc.png").write_bytes((good / "000.png").read_bytes()[:300])
    (good / "fake.jpg").write_text("definitely not a jpeg")
    out = tmp_path / "m.safetensors"
    rc = main(["fit", str(good), "-o", str(out), "--backbone", "efficientnet_lite0",
               "--image-size", "64", "--crop", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file() and "Traceback" not in err
    for name in ("zero.png", "trunc.png", "fake.jpg"):
        assert any(name in l and "warning: skipping" in l for l in err.splitlines()), err
    assert "skipped 3 files (unreadable, unsupported" in err
    assert PatchCore.load(out).fit_stats["images"] == 4


def _bad_cases(tmp, demo, fitted):
    empty = tmp / "empty"
    empty.mkdir()
    notmodel = tmp / "notmodel.safetensors"
    notmodel.write_text("hello, I am a text file")
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(fitted.read_bytes()[:5000])
    badimgs = tmp / "badimgs"
    badimgs.mkdir()
    (badimgs / "a.png").write_bytes(b"")
    (badimgs / "b.png").write_text("nope")
    out = tmp / "out"
    model_out = str(tmp / "out" / "m.safetensors")
    lite = ["--backbone", "efficientnet_lite0", "--quiet"]
    return {
        "fit missing folder": ["fit", str(tmp / "missing"), "-o", model_out, *lite],
        "fit empty folder": ["fit", str(empty), "-o", model_out, *lite],
        "fit unknown backbone": ["fit", str(demo), "--category", "widget", "-o", model_out,
                                 "--backbone", "no_such_net_v9", "--quiet"],
        "fit unknown category": ["fit", str(demo), "--category", "nope", "-o", model_out, *lite],
        "fit all files bad": ["fit", str(badimgs), "-o", model_out, *lite],
        "fit missing weights": ["fit", str(demo), "--category", "widget", "-o", model_out,
                                "--weights", str(tmp / "w.pth"), "--quiet"],
        "score not a model": ["score", str(notmodel), str(demo), "-o", str(out), "--quiet"],
        "score truncated model": ["score", str(truncated), str(demo), "-o", str(out), "--quiet"],
        "score missing model": ["score", str(tmp / "nope.safetensors"), str(demo), "-o",
                                str(out), "--quiet"],
        "score missing input": ["score", str(fitted), str(tmp / "nothing"), "-o", str(out),
                                "--quiet"],
        "score all inputs bad": ["score", str(fitted), str(badimgs), "-o", str(out), "--quiet"],
        "evaluate not a model": ["evaluate", str(notmodel), str(demo), "--category", "widget",
                                 "-o", str(out), "--quiet"],
        "bad ratio": ["fit", str(demo), "-o", model_out, "--coreset-ratio", "2", "--quiet"],
        "missing -o": ["fit", str(demo)],
    }


def test_bad_input_matrix(demo, fitted, tmp_path, capsys):
    capsys.readouterr()
    for name, argv in _bad_cases(tmp_path, demo, fitted).items():
        rc = main(argv)
        assert rc == 2, name
        line = _error(capsys)
        assert len(line) < 400, (name, line)
        assert not _files(tmp_path / "out"), name


def test_incompatible_model_version(fitted, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(fitted), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["format_version"] = "99"
    path = tmp_path / "future.safetensors"
    save_file(tensors, str(path), metadata=meta)
    assert main(["score", str(path), str(fitted.parent), "-o", str(tmp_path / "out"),
                 "--quiet"]) == 2
    assert "format version 99" in _error(capsys)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    assert main(["score", str(other), str(fitted.parent), "-o", str(tmp_path / "out"),
                 "--quiet"]) == 2
    assert "not a patchcore-fast model" in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu(demo, fitted, tmp_path, capsys):
    for argv in (["fit", str(demo), "--category", "widget", "-o", str(tmp_path / "m.safetensors"),
                  "--backbone", "efficientnet_lite0", "--device", "cuda", "--quiet"],
                 ["score", str(fitted), str(demo / "widget" / "test" / "good"), "-o",
                  str(tmp_path / "o"), "--device", "cuda", "--quiet"]):
        assert main(argv) == 2
        assert "no CUDA GPU" in _error(capsys)
    assert not _files(tmp_path)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    import subprocess

    from child import CHILD_CWD, CLI, child_env

    proc = subprocess.run([*CLI, "fit", str(tmp_path / "missing"), "-o",
                           str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, env=child_env(), cwd=CHILD_CWD)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_offline_torchvision_weights_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise urllib.error.URLError("simulated offline")

    monkeypatch.setattr(tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        offline, raising=False)
    # The server answers the first look, then the download fails (the look itself failing,
    # no network at all, is tests/test_hostile_round2.py's case).
    from patchcore_fast import backbone

    monkeypatch.setattr(backbone, "_offline", lambda url, timeout=10.0: None)
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good / "a.png")
    assert main(["fit", str(good), "-o", str(tmp_path / "out" / "m.safetensors"),
                 "--quiet"]) == 2
    line = _error(capsys)
    assert "simulated offline" in line
    assert "--weights FILE" in line and "efficientnet_lite0" in line
    assert not _files(tmp_path / "out")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fit_evaluate_score(demo, fitted, tmp_path):
    # The default device on a GPU machine: bounded-memory fit, evaluate and score on CUDA.
    gpu = ["--image-size", "64", "--crop", "64", "--quiet", "--device", "cuda"]
    fit = ["fit", str(demo), "--category", "widget", "--backbone", "efficientnet_lite0",
           "--coreset-ratio", "0.25", *gpu]
    assert main([*fit, "-o", str(tmp_path / "s.safetensors")]) == 0
    assert main([*fit, "-o", str(tmp_path / "m.safetensors"), "--in-memory"]) == 0
    s, m = (PatchCore.load(tmp_path / f, device="cpu") for f in ("s.safetensors",
                                                                  "m.safetensors"))
    assert s.bank.numpy().tobytes() == m.bank.numpy().tobytes()
    cpu_bank = PatchCore.load(fitted, device="cpu").bank
    assert s.bank.shape == cpu_bank.shape
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "s.safetensors"), str(demo), "--category",
                 "widget", "-o", str(out), *gpu[4:]]) == 0
    ref = tmp_path / "eval_cpu"
    assert main(["evaluate", str(fitted), str(demo), "--category", "widget", "-o", str(ref),
                 *SMALL[4:]]) == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert got[key] == pytest.approx(want[key], abs=0.02), key
    assert main(["score", str(tmp_path / "s.safetensors"), str(demo / "widget" / "test"
                                                              / "spot"),
                 "-o", str(tmp_path / "score"), *gpu[4:]]) == 0
    assert len(list(csv.DictReader((tmp_path / "score" / "scores.csv").open()))) == 3


def test_fit_of_a_folder_into_a_folder_is_named_for_the_file(tmp_path):
    from patchcore_fast.datasets import fit_targets

    good = tmp_path / "photos" / "good"
    good.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(good / "a.png")
    models = tmp_path / "models"
    # "fit good: ..." then "wrote models/good.safetensors", not "fit models: ...".
    assert fit_targets(good, None, models, None) == [
        ("good", good, models / "good.safetensors")]
    assert fit_targets(good, None, models / "line3.safetensors", None)[0][0] == "line3"


def test_fit_and_score_wide_resnet50_with_threads(demo, tmp_path, two_threads):
    # The default backbone at its default size, with 2 intra-op threads: fit's reweighting
    # neighbors and scoring run the CPU k-NN kernel under torch.inference_mode on
    # 1,024-wide features, where its projected pre-pass is taken. A worker thread writing
    # an inference tensor made both verbs fail ("Inplace update to inference tensor outside
    # InferenceMode") on any CPU with more than one thread.
    from patchcore_fast import ops

    model = tmp_path / "wrn.safetensors"
    assert main(["fit", str(demo), "--category", "widget", "-o", str(model), "--backbone",
                 "wide_resnet50_2", "--pretrained", "false", "--coreset-ratio", "0.25",
                 "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "scores"
    tests = sorted(str(d) for d in (demo / "widget" / "test").iterdir())
    assert main(["score", str(model), *tests, "-o", str(out), "--quiet"]) == 0
    bank = PatchCore.load(model, device="cpu").bank
    _, _, stats = ops.knn_stats(bank, bank, 9)
    print(f"\nbank {tuple(bank.shape)}, neighbors: {stats}")
    assert stats["projected"] > 0, stats  # the path this test is about was taken
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == sum(len(_files(Path(t))) for t in tests)


def test_the_command_line_starts_without_the_evaluation_libraries():
    """Every command's start-up imports patchcore_fast.cli: scikit-learn (about 1.2 s of
    imports, scipy.stats with it) is left to the evaluation that needs it."""
    import subprocess

    from child import CHILD_CWD, child_env

    code = ("import sys, patchcore_fast.cli; "
            "print(sorted(m for m in ('sklearn', 'scipy.stats', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, env=child_env(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_process_ends_without_the_collector_passes(tmp_path):
    """process_main (the console script's and ``python -m``'s) returns main's exit code,
    with the live objects frozen out of the collector's passes at exit; a --quiet fit with
    a calibration does not import scipy.special for the summary nobody sees."""
    import subprocess

    from child import CHILD_CWD, child_env

    write_demo_data(tmp_path / "d", seed=0, n_train=4, n_test_good=0, n_test_defect=0)
    train = tmp_path / "d" / "widget" / "train" / "good"
    code = ("import gc, sys; from patchcore_fast.cli import process_main; "
            f"c = process_main(['fit', {str(train)!r}, '-o', {str(tmp_path / 'm.safetensors')!r}, "
            "'--backbone', 'resnet18', '--pretrained', 'false', '--quiet']); "
            "print(c, gc.get_freeze_count() > 0, 'scipy.special' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, env=child_env(),
                         capture_output=True, text=True)
    assert out.stdout.split() == ["0", "True", "False"], out.stdout + out.stderr
    assert (tmp_path / "m.safetensors").is_file()
