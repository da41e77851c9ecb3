"""The bad-file matrix through fit, score and evaluate, with --on-error skip and fail."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.cli import main
from patchcore_fast.demo import write_demo_data

SMALL = ["--image-size", "64", "--crop", "64", "--device", "cpu", "--backbone",
         "efficientnet_lite0"]
UNREADABLE = ("zero.png", "truncated.png", "text.png")
READABLE = ("deep16.png", "cmyk.jpg", "one.png", "huge.png", "rotated.jpg")


def _write_matrix(folder: Path, good: Path) -> None:
    """Every kind of odd file in ``folder``; ``good`` is a real image to derive them from."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.open(good).convert("RGB")
    full = good.read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("this is a text file, not a PNG\n")
    a = np.asarray(img.convert("L")).astype(np.uint16) * 257
    Image.fromarray(a).save(folder / "deep16.png")                 # 16-bit grey
    img.convert("CMYK").save(folder / "cmyk.jpg", quality=95)     # CMYK JPEG
    Image.new("RGB", (1, 1), (120, 60, 30)).save(folder / "one.png")
    # 10,000 x 10,000 = 100 M pixels: above Pillow's warning limit, below its error limit.
    Image.new("L", (10_000, 10_000), 128).save(folder / "huge.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side; displayed rotated by 90 degrees
    img.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    demo = root / "demo"
    write_demo_data(demo, seed=2, n_train=4, n_test_good=2, n_test_defect=2)
    w = demo / "widget"
    train = root / "train"
    shutil.copytree(w / "train" / "good", train)
    _write_matrix(train, train / "000.png")
    good = root / "test_good"
    shutil.copytree(w / "test" / "good", good)
    _write_matrix(good, good / "000.png")
    defective = root / "test_defective"
    masks = root / "masks"
    shutil.copytree(w / "test", defective, ignore=lambda d, names: ["good"] if d.endswith(
        "test") else [])
    shutil.copytree(w / "ground_truth", masks)
    # A mask of the wrong size: cannot be aligned with its image.
    Image.new("L", (17, 9), 255).save(masks / "spot" / "001_mask.png")
    return {"root": root, "train": train, "good": good, "defective": defective,
            "masks": masks}


def _lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [l for l in err.splitlines() if l.strip()]


def _warned(lines, name) -> bool:
    # (progress bars share the terminal line with a warning: match inside the line)
    return any("patchcore-fast: warning: skipping " in l and name in l for l in lines)


def test_skip_fit_score_evaluate(case, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert main(["fit", str(case["train"]), "-o", str(model), *SMALL]) == 0
    lines = _lines(capsys)
    for name in UNREADABLE:
        assert _warned(lines, name), (name, lines)
    for name in READABLE:
        assert not _warned(lines, name), (name, lines)
    assert any("skipped 3 files (unreadable, unsupported" in l for l in lines), lines
    assert PatchCore.load(model).fit_stats["images"] == 4 + len(READABLE)

    out = tmp_path / "score"
    assert main(["score", str(model), str(case["good"]), "-o", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    lines = _lines(capsys)
    assert all(_warned(lines, n) for n in UNREADABLE), lines
    rows = json.loads((out / "scores.json").read_text())
    scored = sorted(Path(r["file"]).name for r in rows["images"])
    assert scored == sorted(["000.png", "001.png", *READABLE])
    assert all(np.isfinite(r["score"]) for r in rows["images"])
    assert sorted(Path(p).name for p in rows["skipped"]) == sorted(UNREADABLE)
    assert len(list((out / "overlays").glob("*.png"))) == len(scored)

    ev = tmp_path / "eval"
    assert main(["evaluate", str(model), "--good", str(case["good"]), "--defective",
                 str(case["defective"]), "--masks", str(case["masks"]), "-o", str(ev),
                 "--device", "cpu", "--quiet"]) == 0
    lines = _lines(capsys)
    assert all(_warned(lines, n) for n in UNREADABLE), lines
    assert any("spot/001.png" in l and "mask" in l and "17 x 9" in l for l in lines), lines
    m = json.loads((ev / "metrics.json").read_text())
    # 2 + 5 readable good images; 4 defective minus the one with the wrong-size mask.
    assert m["counts"]["good"] == 2 + len(READABLE) and m["counts"]["defective"] == 3
    assert m["pixel_auroc"] is not None


@pytest.mark.parametrize("verb", ["fit", "score", "evaluate"])
def test_fail_stops_with_one_line(case, verb, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    if verb != "fit":
        ok = tmp_path / "ok"
        shutil.copytree(case["train"], ok, ignore=lambda d, n: [x for x in n if x in
                                                                 UNREADABLE])
        assert main(["fit", str(ok), "-o", str(model), *SMALL, "--quiet",
                     "--on-error", "fail"]) == 0
    out = tmp_path / "out"
    argv = {
        "fit": ["fit", str(case["train"]), "-o", str(out / "m.safetensors"), *SMALL],
        "score": ["score", str(model), str(case["good"]), "-o", str(out), "--device", "cpu"],
        "evaluate": ["evaluate", str(model), "--good", str(case["good"]), "--defective",
                     str(case["defective"]), "--masks", str(case["masks"]), "-o", str(out),
                     "--device", "cpu"],
    }[verb]
    capsys.readouterr()
    assert main([*argv, "--quiet", "--on-error", "fail"]) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("patchcore-fast: error: cannot use "), lines
    assert "--on-error" in lines[0] and len(lines[0]) < 400
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_fail_on_wrong_size_mask_only(case, tmp_path, capsys):
    # Only the mask is bad: the good folder holds nothing odd.
    good = tmp_path / "good"
    good.mkdir()
    for n in ("000.png", "001.png"):
        shutil.copy(case["good"] / n, good / n)
    model = tmp_path / "m.safetensors"
    assert main(["fit", str(good), "-o", str(model), *SMALL, "--quiet"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["evaluate", str(model), "--good", str(good), "--defective",
                 str(case["defective"]), "--masks", str(case["masks"]), "-o", str(out),
                 "--device", "cpu", "--quiet", "--on-error", "fail"]) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "001_mask.png" in lines[0] and "17 x 9" in lines[0], lines
    assert not out.exists()
