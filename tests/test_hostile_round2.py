"""Hostile and unlucky input, second round (issue #26), through the command line and the
public API, on small images made here.

A. One decision per image about how it is read: the orientation of a photo recorded
   outside an ``eXIf`` chunk (a ``Raw profile type exif`` text chunk, XMP, an ``eXIf``
   chunk after the pixels) turns the photo for its size, its pixels, its map, its overlay
   and its mask alike.
B. Names and places: file names that are not UTF-8, names too long for an overlay name,
   empty paths, outputs inside the folders evaluate lists, one folder as good and
   defective, one image given several times.
C. No silent nonsense: one-neighbour reweighting, 16-bit / RGBA / palette / JPEG masks,
   masks missing for some images, F1-max without good images.
D. Streams and journals: stderr into a closed pipe or closed, non-finite journal rows, two
   runs into one output folder.
E. Messages and the API: settings of the wrong type, an offline backbone, matplotlib's
   own messages, evaluate without ``train/good``, an unusable ``--temp-dir``, FIFOs and
   symbolic-link loops, ``--workers`` beyond the CPUs, the model file's permissions.

Every command-line case is checked by :func:`_cli`: the exit code, no traceback, an error
as one line naming what is wrong, inputs unchanged, nothing written outside ``-o``.
"""

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from patchcore_fast import PatchCore, PatchCoreConfig, PatchCoreError
from patchcore_fast.cli import main
from patchcore_fast.journal import JOURNAL, JOURNAL_TAG
from patchcore_fast.metrics import f1_max
from child import CHILD_CWD, CLI, child_env

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--quiet"]
FIT = [*SMALL, "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.25",
       "--image-size", "64", "--crop", "64"]  # as the demo model is fitted


@pytest.fixture(scope="module")
def demo(fit_demo):
    """(data root, model file): widget with 2 good and 2 + 2 defective test images."""
    return fit_demo("round2", seed=26, n_train=4, n_test_good=2, n_test_defect=2)


def _hashes(root: Path, skip: Path | None = None) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and not (skip and p.is_relative_to(skip))}


def _cli(argv: list, capsys, watched: list = (), out: Path | None = None, code: int = 0,
         words: str = "") -> list[str]:
    """Run the command in this process; return its stderr lines.

    Checks: the exit code; no traceback; on an error, one last line
    ``patchcore-fast: error: ...`` holding ``words`` and, when ``out`` is given, nothing
    written there; every file under ``watched`` unchanged, no new file there (outside
    ``out``), no temporary file left.
    """
    before = {w: _hashes(w, out) for w in watched}
    out_before = _hashes(out) if out is not None and out.exists() else None
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert rc == code, (rc, err)
    if code:
        assert lines and lines[-1].startswith("patchcore-fast: error: "), err
        assert words in lines[-1], (words, lines[-1])
        if out is not None:
            assert (_hashes(out) if out.exists() else None) == out_before, "wrote into -o"
    for w in watched:
        assert _hashes(w, out) == before[w], f"files under {w} changed or appeared"
        assert not list(w.rglob("*.tmp")), "temporary file left behind"
    return lines


def _command(argv: list, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """The command as a separate process (this source tree first on its path)."""
    return subprocess.Popen([*CLI, *map(str, argv)], env={**child_env(), **(env or {})},
                            **{"cwd": CHILD_CWD, **kwargs})


def _square(path: Path, colour=(40, 90, 160), size=(40, 40), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _rows(csv_path: Path) -> list[dict]:
    text = csv_path.read_bytes().decode("utf-8")  # strict UTF-8
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _strict_json(path: Path):
    """JSON that strict readers accept: UTF-8 (no lone surrogates), no NaN / Infinity."""
    text = path.read_bytes().decode("utf-8")
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {path}"))
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # no lone surrogate escapes
    return data


# ===== A. one decision per image about how it is read ======================================

def _orientation_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show it upright
    return exif.tobytes()


_XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
        '02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        out.append((kind, data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def _png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
        for k, d in chunks)


def _oriented(path: Path, how: str) -> Path:
    """A 60 x 40 photo (red left third) whose orientation 6 is recorded ``how``."""
    a = np.full((40, 60, 3), (60, 140, 200), np.uint8)
    a[:, :20] = (230, 30, 30)
    a[5:12, 30:50] = (250, 250, 40)
    img, raw = Image.fromarray(a), _orientation_exif()
    info = PngImagePlugin.PngInfo()
    if how in ("raw-profile-ztxt", "raw-profile-text"):
        text = f"\nexif\n{len(raw):8d}\n{raw.hex()}\n"
        info.add_text("Raw profile type exif", text, zip=how.endswith("ztxt"))
    elif how == "xmp-itxt":
        info.add_itxt("XML:com.adobe.xmp", _XMP)
    if how == "jpeg-exif":
        img.save(path, format="JPEG", quality=95, exif=raw)
    elif how == "exif-after-idat":
        img.save(path, format="PNG", exif=raw)
        chunks = _png_chunks(path.read_bytes())
        exif = [c for c in chunks if c[0] == b"eXIf"]
        rest = [c for c in chunks if c[0] != b"eXIf"]
        path.write_bytes(_png_bytes(rest[:-1] + exif + rest[-1:]))  # before IEND
    else:
        img.save(path, format="PNG", pnginfo=info)
    return path


ORIENTATIONS = ["raw-profile-ztxt", "raw-profile-text", "xmp-itxt", "exif-after-idat",
                "jpeg-exif"]


@pytest.mark.parametrize("how", ORIENTATIONS)
def test_orientation_outside_exif_chunk_score(how, demo, tmp_path, capsys):
    _, model = demo
    src = tmp_path / "in"
    src.mkdir()
    photo = _oriented(src / ("p.jpg" if how == "jpeg-exif" else "p.png"), how)
    upright = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    assert upright.size == (40, 60)  # Pillow, the authority, turns it
    upright.save(src / "ref.png")  # the same pixels, upright, without any orientation
    out = tmp_path / "out"
    _cli(["score", model, photo, src / "ref.png", "-o", out, "--save-maps", *SMALL], capsys,
         [src], out)
    maps = {n: np.load(out / "maps" / f"{n}.npy") for n in (photo.name, "ref.png")}
    assert maps[photo.name].shape == (60, 40)
    np.testing.assert_allclose(maps[photo.name], maps["ref.png"], rtol=1e-4, atol=1e-5)
    scores = {Path(r["file"]).name: float(r["score"]) for r in _rows(out / "scores.csv")}
    assert scores[photo.name] == pytest.approx(scores["ref.png"], rel=1e-4)
    ov = np.asarray(Image.open(out / "overlays" / f"{photo.name}.png").convert("RGB"))
    assert ov.shape == (60, 40, 3)
    # The overlay is drawn on the upright photo: the red third is the top rows now.
    top, bottom = ov[:15].astype(int), ov[-15:].astype(int)
    assert (top[..., 0] - top[..., 2]).mean() > (bottom[..., 0] - bottom[..., 2]).mean() + 40


@pytest.mark.parametrize("how", ["raw-profile-ztxt", "xmp-itxt"])
def test_orientation_outside_exif_chunk_api_and_masks(how, demo, tmp_path, capsys):
    root, model = demo
    good, bad, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for p in sorted((root / "widget" / "test" / "good").glob("*.png")):
        good.mkdir(exist_ok=True)
        shutil.copy(p, good / p.name)
    bad.mkdir()
    photo = _oriented(bad / "p.png", how)
    upright = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    upright.save(tmp_path / "ref.png")
    # API: the map of the tagged photo is the map of its upright pixels.
    m = PatchCore.load(model, device="cpu")
    pred = m.predict([photo, tmp_path / "ref.png"])
    assert pred.maps[0].shape == pred.maps[1].shape == (60, 40)
    np.testing.assert_allclose(pred.maps[0], pred.maps[1], rtol=1e-4, atol=1e-5)
    # A mask drawn on the upright photo (as any viewer shows it) fits it.
    mask = np.zeros((60, 40), np.uint8)
    mask[30:50, 10:30] = 255
    masks.mkdir()
    Image.fromarray(mask).save(masks / "p_mask.png")
    out = tmp_path / "eval"
    lines = _cli(["evaluate", model, "--good", good, "--defective", bad, "--masks", masks,
                  "-o", out, "--device", "cpu"], capsys, [good, bad, masks], out)
    assert not [l for l in lines if "warning" in l], lines
    metrics = _strict_json(out / "metrics.json")
    assert metrics["pixel_auroc"] is not None and metrics["counts"]["images"] == 3


# ===== B. names and places =================================================================

def test_file_name_not_utf8(demo, tmp_path, capsys):
    _, model = demo
    src = tmp_path / "in"
    weird = src / os.fsdecode(b"caf\xe9.png")  # Latin-1 name from an old share
    _square(weird, (200, 40, 40))
    _square(src / "plain.png")
    folder = tmp_path / os.fsdecode(b"d\xfcrr")  # and a folder of such a name
    _square(folder / "x.png", (20, 200, 20))
    out = tmp_path / "out"
    lines = _cli(["score", model, src, folder, "-o", out, "--save-maps", "--device", "cpu"],
                 capsys, [src, folder], out)
    assert any("caf\\xe9.png" in l and "UTF-8" in l for l in lines), lines
    rows = _rows(out / "scores.csv")
    assert len(rows) == 3
    assert {Path(r["file"]).name for r in rows} == {"caf\\xe9.png", "plain.png", "x.png"}
    assert any("d\\xfcrr" in r["file"] for r in rows)
    data = _strict_json(out / "scores.json")
    assert len(data["images"]) == 3
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len([p for p in written if p.suffix == ".png"]) == 3
    assert len([p for p in written if p.suffix == ".npy"]) == 3
    for p in written:  # every output name is text
        os.fsencode(str(p.relative_to(out))).decode("utf-8")
    # A resumed run knows these images are done.
    lines = _cli(["score", model, src, folder, "-o", out, "--save-maps", "--resume",
                  "--device", "cpu"], capsys, [src, folder], None)
    assert "scored 0 images" in lines[-1], lines


def test_file_name_not_utf8_evaluate(demo, tmp_path, capsys):
    root, model = demo
    good, bad, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for p in sorted((root / "widget" / "test" / "good").glob("*.png")):
        good.mkdir(exist_ok=True)
        shutil.copy(p, good / p.name)
    spot = sorted((root / "widget" / "test" / "spot").glob("*.png"))[0]
    bad.mkdir()
    masks.mkdir()
    shutil.copy(spot, bad / os.fsdecode(b"\xe9t\xe9.png"))
    shutil.copy(root / "widget" / "ground_truth" / "spot" / f"{spot.stem}_mask.png",
                masks / os.fsdecode(b"\xe9t\xe9_mask.png"))
    out = tmp_path / "eval"
    _cli(["evaluate", model, "--good", good, "--defective", bad, "--masks", masks, "-o", out,
          *SMALL], capsys, [good, bad, masks], out)
    metrics = _strict_json(out / "metrics.json")
    assert metrics["pixel_auroc"] is not None
    assert any(r["file"].endswith("\\xe9t\\xe9.png") for r in _rows(out / "scores.csv"))


def test_long_file_names(demo, tmp_path, capsys):
    _, model = demo
    src = tmp_path / "in"
    names = ["a" * 247 + ".png",           # 251 bytes: name.png.png is 255
             "b" * 251 + ".png",           # 255 bytes: the longest name a file can have
             "c" * 250 + "1.png", "c" * 250 + "2.png"]  # equal but for the end
    for i, n in enumerate(names):
        _square(src / n, (40 * i, 80, 120))
    out = tmp_path / "out"
    _cli(["score", model, src, "-o", out, "--save-maps", *SMALL], capsys, [src], out)
    overlays = sorted((out / "overlays").iterdir())
    maps = sorted((out / "maps").iterdir())
    assert len(overlays) == len(maps) == 4
    assert all(len(os.fsencode(p.name)) <= 255 for p in overlays + maps)
    assert len(_rows(out / "scores.csv")) == 4
    lines = _cli(["score", model, src, "-o", out, "--save-maps", "--resume", *SMALL], capsys,
                 [src], None)
    assert sorted((out / "overlays").iterdir()) == overlays  # the same names again


def test_output_path_too_long_refused_before_any_work(demo, tmp_path, capsys):
    root, model = demo
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # more than 4,096 bytes
    _cli(["score", model, root / "widget" / "test" / "good", "-o", deep, *SMALL], capsys,
         [tmp_path, root], None, code=2, words="too long")
    assert not (tmp_path / ("d" * 200)).exists()


@pytest.mark.parametrize("argv,words", [
    (["score", "m.safetensors", "a.png", "-o", ""], "-o"),
    (["evaluate", "m.safetensors", "data", "-o", ""], "-o"),
    (["fit", "data", "-o", ""], "-o"),
    (["study", "data", "-o", ""], "-o"),
    (["demo-data", ""], "DIR"),
    (["score", "m.safetensors", "", "-o", "out"], "INPUT"),
    (["score", "", "a.png", "-o", "out"], "MODEL"),
    (["fit", "", "-o", "m.safetensors"], "DATA"),
    (["evaluate", "m.safetensors", "--good", "", "--defective", "d", "-o", "out"], "--good"),
    (["evaluate", "m.safetensors", "--good", "g", "--defective", "d", "--masks", "", "-o",
      "out"], "--masks"),
    (["score", "m.safetensors", "a.png", "-o", "out", "--temp-dir", ""], "--temp-dir"),
    (["fit", "data", "-o", "m.safetensors", "--weights", ""], "--weights"),
])
def test_empty_paths_refused(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path must not mean this folder
    _square(tmp_path / "a.png")
    lines = _cli(argv, capsys, [tmp_path], None, code=2, words=words)
    assert "empty" in lines[-1], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def _copy_category(root: Path, dest: Path, train: bool = True) -> Path:
    parts = ["test", "ground_truth"] + (["train"] if train else [])
    for part in parts:
        shutil.copytree(root / "widget" / part, dest / "widget" / part)
    return dest


def test_evaluate_output_inside_the_folders_it_lists(demo, tmp_path, capsys):
    root, model = demo
    data = _copy_category(root, tmp_path / "data")
    cat = data / "widget"
    for out in (cat / "test" / "out", cat / "test", cat / "ground_truth" / "out"):
        _cli(["evaluate", model, data, "--category", "widget", "-o", out, *SMALL], capsys,
             [data], out, code=2, words="inside the input folder")
    # The folder layout: a defective folder of defect-type sub-folders is listed too.
    _cli(["evaluate", model, "--good", cat / "test" / "good", "--defective", cat / "test",
          "-o", cat / "test" / "out", *SMALL], capsys, [data], None, code=2)


def test_same_folder_good_and_defective(demo, tmp_path, capsys):
    root, model = demo
    data = _copy_category(root, tmp_path / "data")
    test = data / "widget" / "test"
    good, spot = test / "good", test / "spot"
    out = tmp_path / "out"
    _cli(["evaluate", model, "--good", good, "--defective", good, "-o", out, *SMALL],
         capsys, [data], out, code=2, words="--defective")
    # The good folder inside the defective one: "good" would become a defect type.
    _cli(["evaluate", model, "--good", good, "--defective", test, "-o", out, *SMALL],
         capsys, [data], out, code=2, words="--good")
    # Images as their own masks.
    _cli(["evaluate", model, "--good", good, "--defective", spot, "--masks", spot, "-o", out,
          *SMALL], capsys, [data], out, code=2, words="--masks")
    # One file, by a link, in both folders.
    other = tmp_path / "bad"
    other.mkdir()
    first = sorted(good.glob("*.png"))[0]
    os.symlink(first, other / "linked.png")
    shutil.copy(sorted(spot.glob("*.png"))[0], other / "real.png")
    _cli(["evaluate", model, "--good", good, "--defective", other, "-o", out, *SMALL],
         capsys, [data, other], out, code=2, words=first.name)


def test_same_image_given_three_times(demo, tmp_path, capsys, monkeypatch):
    _, model = demo
    src = tmp_path / "in"
    _square(src / "a.png")
    _square(src / "b.png", (200, 30, 30))
    monkeypatch.chdir(src)
    out = tmp_path / "out"
    lines = _cli(["score", model, "a.png", "a.png", "./a.png", "-o", out, "--device", "cpu"],
                 capsys, [src], out)
    assert any("a.png" in l and "3 times" in l for l in lines), lines
    assert len(_rows(out / "scores.csv")) == 1
    assert len(list((out / "overlays").iterdir())) == 1
    out2 = tmp_path / "out2"
    _cli(["score", model, src, src / "b.png", "-o", out2, *SMALL], capsys, [src], out2)
    assert sorted(Path(r["file"]).name for r in _rows(out2 / "scores.csv")) == \
        ["a.png", "b.png"]


# ===== C. no silent nonsense ================================================================

def test_one_neighbour_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cli(["fit", "data", "-o", "m.safetensors", "--num-neighbors", "1", *SMALL], capsys,
         [tmp_path], None, code=2, words="--num-neighbors")
    with pytest.raises(PatchCoreError, match="num_neighbors"):
        PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", num_neighbors=1))


def test_one_row_bank_keeps_the_nearest_distance(tmp_path, capsys):
    train = tmp_path / "train"
    _square(train / "one.png", (90, 90, 90), (32, 32))
    model = tmp_path / "m.safetensors"
    lines = _cli(["fit", train, "-o", model, "--backbone", "efficientnet_lite0",
                  "--image-size", "16", "--crop", "16", "--coreset-ratio", "0.25",
                  "--device", "cpu"], capsys, [train], None)
    assert any("one row" in l and "reweighting" in l for l in lines), lines
    m = PatchCore.load(model, device="cpu")
    assert m.bank.shape[0] == 1
    probes = [_square(tmp_path / f"p{i}.png", c, (32, 32))
              for i, c in enumerate([(200, 20, 20), (20, 200, 20), (90, 90, 91)])]
    scores = m.predict(probes).scores
    m.neighbors = None  # s = s*, the nearest distance
    np.testing.assert_allclose(scores, m.predict(probes).scores, rtol=1e-6)
    assert (scores > 0).all()


def _mask_variants(mask: np.ndarray) -> dict:
    """One binary mask (bool [H, W]) written in the ways users write masks."""
    m8 = mask.astype(np.uint8)
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[...] = (255, 255, 255, 0)  # transparent white background
    rgba[mask] = (255, 0, 0, 255)
    la = np.zeros(mask.shape + (2,), np.uint8)
    la[mask] = (255, 255)
    la[~mask] = (255, 0)
    pal = Image.new("P", (mask.shape[1], mask.shape[0]))
    pal.putdata(m8.ravel().tolist())  # index 1, white, is defect
    pal.putpalette([0, 0, 0, 255, 255, 255])
    return {
        "grey-255.png": Image.fromarray(m8 * 255),
        "grey-label-1.png": Image.fromarray(m8),
        "i16-label-1.png": Image.fromarray(m8.astype(np.uint16)),  # mode I;16
        "i16-max.png": Image.fromarray(m8.astype(np.uint16) * 65535),
        "rgba-transparent.png": Image.fromarray(rgba),
        "la-transparent.png": Image.fromarray(la),
        "palette.png": pal,
        "bool.tif": Image.fromarray(mask),
    }


@pytest.fixture(scope="module")
def mask_runs(demo, tmp_path_factory):
    """metrics.json of evaluate with the demo's masks written in each variant."""
    root, model = demo
    results = {}
    names = list(_mask_variants(np.zeros((2, 2), bool))) + ["jpeg.jpg"]
    for variant in names:
        base = tmp_path_factory.mktemp("masks")
        data = _copy_category(root, base / "data")
        gt = data / "widget" / "ground_truth"
        for f in sorted(gt.rglob("*_mask.png")):
            mask = np.asarray(Image.open(f)) > 0
            f.unlink()
            stem, ext = variant.rsplit(".", 1)
            if variant == "jpeg.jpg":
                Image.fromarray(mask.astype(np.uint8) * 255).save(f.with_suffix(".jpg"),
                                                                  quality=60)
            else:
                _mask_variants(mask)[variant].save(f.with_suffix("." + ext))
        out = base / "out"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["evaluate", str(model), str(data), "--category", "widget", "-o",
                       str(out), "--no-overlays", "--device", "cpu"])
        assert rc == 0 and "Traceback" not in err.getvalue(), err.getvalue()
        results[variant] = (json.loads((out / "metrics.json").read_text()), err.getvalue())
    return results


@pytest.mark.parametrize("variant", list(_mask_variants(np.zeros((2, 2), bool)))[1:])
def test_mask_variants_mean_the_same(variant, mask_runs):
    ref, _ = mask_runs["grey-255.png"]
    got, err = mask_runs[variant]
    assert ref["pixel_auroc"] is not None
    assert got["ground_truth"]["defect_pixels"] == ref["ground_truth"]["defect_pixels"] > 0
    assert got["pixel_auroc"] == ref["pixel_auroc"] and got["pro"] == ref["pro"]
    assert "warning" not in err, err


def test_jpeg_masks_thresholded_and_named(mask_runs):
    ref, _ = mask_runs["grey-255.png"]
    got, err = mask_runs["jpeg.jpg"]
    warned = [l for l in err.splitlines() if "_mask.jpg" in l and "lossy" in l]
    assert len(warned) == ref["counts"]["defective"], err
    # JPEG's ringing around the defect is not defect: about the same pixels as the PNG.
    ratio = got["ground_truth"]["defect_pixels"] / ref["ground_truth"]["defect_pixels"]
    assert 0.95 < ratio < 1.05, ratio
    assert abs(got["pixel_auroc"] - ref["pixel_auroc"]) < 0.01


def test_masks_missing_for_some_images(demo, tmp_path, capsys):
    root, model = demo
    data = _copy_category(root, tmp_path / "data")
    gone = sorted((data / "widget" / "ground_truth" / "spot").glob("*_mask.png"))[0]
    gone.unlink()
    image = data / "widget" / "test" / "spot" / gone.name.replace("_mask", "")
    out = tmp_path / "out"
    lines = _cli(["evaluate", model, data, "--category", "widget", "-o", out,
                  "--no-overlays", "--device", "cpu"], capsys, [data], out)
    assert [l for l in lines if "warning" in l and str(image) in l and "mask" in l], lines
    metrics = _strict_json(out / "metrics.json")
    assert metrics["pixel_auroc"] is not None and metrics["pro"] is not None
    gt = metrics["ground_truth"]
    assert gt["missing"] == [str(image)]
    assert gt["masks"] == metrics["counts"]["defective"] - 1
    # The folder layout, one mask missing.
    masks = tmp_path / "masks"
    shutil.copytree(data / "widget" / "ground_truth" / "spot", masks)
    out2 = tmp_path / "out2"
    lines = _cli(["evaluate", model, "--good", data / "widget" / "test" / "good",
                  "--defective", data / "widget" / "test" / "spot", "--masks", masks,
                  "-o", out2, "--no-overlays", "--device", "cpu"], capsys, [data], out2)
    assert [l for l in lines if "warning" in l and str(image) in l], lines
    assert _strict_json(out2 / "metrics.json")["pixel_auroc"] is not None


def test_f1_max_needs_both_classes(demo, tmp_path, capsys):
    assert f1_max([1, 1, 1], [0.1, 0.5, 0.9]) == (None, None)
    assert f1_max([0, 0], [0.1, 0.5]) == (None, None)
    root, model = demo
    data = _copy_category(root, tmp_path / "data")
    shutil.rmtree(data / "widget" / "test" / "good")
    out = tmp_path / "out"
    _cli(["evaluate", model, data, "--category", "widget", "-o", out, "--no-overlays",
          *SMALL], capsys, [data], out)
    metrics = _strict_json(out / "metrics.json")
    assert metrics["f1_max"] is None and metrics["f1_threshold"] is None
    assert metrics["image_auroc"] is None


# ===== D. streams and journals ==============================================================

def _score_outputs_complete(out: Path, n: int) -> None:
    assert len(_rows(out / "scores.csv")) == n
    assert len(_strict_json(out / "scores.json")["images"]) == n
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == n
    for p in overlays:
        Image.open(p).verify()


def _many(root: Path, folder: Path, n: int = 12) -> Path:
    """``n`` test images (copies of the demo's good ones) in ``folder``."""
    folder.mkdir()
    images = sorted((root / "widget" / "test" / "good").glob("*.png"))
    for i in range(n):
        shutil.copy(images[i % len(images)], folder / f"{i:02d}.png")
    return folder


def test_stderr_into_a_closed_pipe(demo, tmp_path):
    root, model = demo
    images = _many(root, tmp_path / "in")
    out = tmp_path / "out"
    # 2>&1 | head -c 100: the reader leaves after 100 bytes of progress.
    proc = _command(["score", model, images, "-o", out, "--device", "cpu"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.read(100)
    proc.stdout.close()
    assert proc.wait(timeout=600) == 0
    _score_outputs_complete(out, 12)


def test_stderr_closed(demo, tmp_path):
    root, model = demo
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"
    proc = _command(["score", model, images, "-o", out, "--device", "cpu"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: os.close(2))  # 2>&-
    assert proc.wait(timeout=600) == 0
    _score_outputs_complete(out, 2)
    # A failing run still says so by its exit code.
    proc = _command(["score", model, tmp_path / "missing.png", "-o", tmp_path / "o2"],
                    stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
    assert proc.wait(timeout=600) == 2


@pytest.mark.parametrize("where", ["journal", "scores.json"])
def test_non_finite_scores_of_an_earlier_run(where, demo, tmp_path, capsys):
    root, model = demo
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"
    _cli(["score", model, images, "-o", out, "--no-overlays", *SMALL], capsys, [root], out)
    data = json.loads((out / "scores.json").read_text())
    files = [r["file"] for r in data["images"]]
    if where == "journal":
        (out / JOURNAL).write_text(JOURNAL_TAG + json.dumps(data["run"], sort_keys=True)
                                   + f"\nfile,score\n{files[0]},nan\n{files[1]},1e999\n")
        (out / "scores.json").unlink()
    else:
        text = (out / "scores.json").read_text()
        for r in data["images"]:
            text = text.replace(json.dumps(r["score"]), "NaN")
        (out / "scores.json").write_text(text)
    lines = _cli(["score", model, images, "-o", out, "--no-overlays", "--resume",
                  "--device", "cpu"], capsys, [root], None)
    assert [l for l in lines if "warning" in l and files[0] in l], lines
    assert "scored 2 images" in lines[-1], lines
    final = _strict_json(out / "scores.json")
    assert all(np.isfinite(r["score"]) for r in final["images"])
    assert "nan" not in (out / "scores.csv").read_text().lower()


def _locked(folder: Path) -> bool:
    """Whether another process holds the output folder's lock."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_two_runs_into_one_output_folder(demo, tmp_path, capsys):
    root, model = demo
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another run holds the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for verb in (["score", model, images], ["evaluate", model, root, "--category",
                                                  "widget"]):
            _cli([*verb, "-o", out, *SMALL], capsys, [root], out, code=2,
                 words="another patchcore-fast run")
    finally:
        os.close(fd)
    # A real score run holds the folder while it writes (seen from outside), and finishes.
    many = _many(root, tmp_path / "many")
    first = _command(["score", model, many, "-o", out, "--device", "cpu", "--quiet"],
                     stderr=subprocess.PIPE, text=True)
    t0, seen = time.monotonic(), False
    while not seen and first.poll() is None and time.monotonic() - t0 < 300:
        seen = _locked(out)
        time.sleep(0.005)
    err1 = first.communicate(timeout=600)[1]
    assert seen, "the score run was never seen holding its output folder"
    assert first.returncode == 0, err1
    _score_outputs_complete(out, 12)
    # A second real process is refused while another process holds the folder (a holder
    # that keeps the lock until told: no race with how fast a run is), and runs once it is
    # released.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _command(["score", model, many, "-o", out, "--device", "cpu", "--quiet"],
                          stderr=subprocess.PIPE, text=True)
        err2 = second.communicate(timeout=600)[1]
        assert second.returncode == 2 and "another patchcore-fast run" in err2, err2
    finally:
        holder.communicate(input="", timeout=60)
    _score_outputs_complete(out, 12)


# ===== E. messages and the API ==============================================================

def test_fit_each_ratio_without_ratios(tmp_path):
    _square(tmp_path / "a.png")
    model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", image_size=32,
                                      device="cpu"))
    with pytest.raises(PatchCoreError, match="ratio"):
        list(model.fit_each_ratio(tmp_path, []))


@pytest.mark.parametrize("setting,value", [
    ("coreset_ratio", "0.1"), ("image_size", 224.5), ("image_size", "224"),
    ("num_neighbors", 2.0), ("batch_size", True), ("pretrained", "no"),
    ("mean", [0.5, 0.5, "x"]), ("crop", None), ("backbone", 18), ("layers", "layer2"),
    ("blur_sigma", float("nan")), ("num_workers", -1),
])
def test_config_settings_checked_for_type_and_meaning(setting, value):
    with pytest.raises(PatchCoreError, match=setting):
        PatchCoreConfig(**{setting: value}).validate()
    with pytest.raises(PatchCoreError, match=setting):
        PatchCore(PatchCoreConfig(), **{setting: value})


def test_config_numbers_of_other_kinds_accepted():
    PatchCoreConfig(coreset_ratio=1, blur_sigma=2, mean=[0, 0, 0]).validate()


_COUNT_ATTEMPTS = """
import os, socket
def _note(what):
    with open(os.environ["NETWORK_ATTEMPTS"], "a") as fh:
        fh.write(what + "\\n")
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *args, **kwargs):
    _note(f"resolve {host}")
    return _getaddrinfo(host, *args, **kwargs)
def connect(self, address):
    _note(f"connect {address}")
    return _connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


class _ClosingProxy:
    """A local "proxy" that accepts connections and closes them: every download through
    it fails as on a machine without network, whatever the machine has."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def env(self, home: Path) -> dict:
        url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "TORCH_HOME", "XDG_", "HUGGINGFACE"))
               and k.lower() not in ("no_proxy", "all_proxy")}
        return {**env, "HOME": str(home), "http_proxy": url, "https_proxy": url,
                "HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": "", "no_proxy": "",
                "PYTHONPATH": child_env({})["PYTHONPATH"]}

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_050", "wide_resnet50_2"])
def test_offline_backbone_one_line_no_retries_no_cache_folder(backbone, demo, tmp_path):
    """Offline as a machine without DNS is (timm's hub: a host that never resolves) or
    behind a dead proxy (torchvision's fixed URL): one line, one try, no folder left."""
    root, _ = demo
    home = tmp_path / "home"
    home.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_COUNT_ATTEMPTS)
    attempts = tmp_path / "attempts.txt"
    attempts.write_text("")
    proxy = _ClosingProxy()
    env = proxy.env(home)
    if backbone != "wide_resnet50_2":
        env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
        env["HF_ENDPOINT"] = "https://hub.invalid"  # RFC 2606: never resolves
    env["PYTHONPATH"] = child_env({}, hook)["PYTHONPATH"]
    env["NETWORK_ATTEMPTS"] = str(attempts)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "patchcore_fast.cli", "fit", str(root), "--category",
             "widget", "-o", str(tmp_path / "m.safetensors"), "--backbone", backbone,
             "--image-size", "64", "--device", "cpu", "--quiet"],
            env=env, capture_output=True, text=True, timeout=600, cwd=CHILD_CWD)
    finally:
        proxy.close()
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("patchcore-fast: error: "), proc.stderr
    assert "--weights" in lines[0]
    tries = attempts.read_text().splitlines()
    assert 1 <= len(tries) <= 2, tries  # one look at the network, no retries
    assert not list(home.iterdir()), list(home.rglob("*"))


def test_matplotlib_says_nothing(demo, tmp_path):
    root, model = demo
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR",) and not k.startswith("XDG_")}
    proc = subprocess.run(
        [sys.executable, "-m", "patchcore_fast.cli", "evaluate", str(model), str(root),
         "--category", "widget", "-o", str(tmp_path / "out"), "--no-overlays",
         "--device", "cpu", "--quiet"],
        env=child_env({**env, "HOME": str(home)}), capture_output=True, text=True,
        timeout=600, cwd=CHILD_CWD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert (tmp_path / "out" / "roc.png").is_file()


def test_evaluate_needs_no_training_folder(demo, tmp_path, capsys):
    root, model = demo
    data = _copy_category(root, tmp_path / "data", train=False)
    for args in ([data, "--category", "widget"], [data / "widget"], [data, "--category",
                                                                     "all"]):
        out = tmp_path / f"out{len(args)}"
        _cli(["evaluate", model, *args, "-o", out, "--no-overlays", *SMALL], capsys, [data],
             out)
        assert (out / "metrics.json").is_file() or (out / "widget" / "metrics.json").is_file()


def test_unusable_temp_dir_one_clear_line(demo, tmp_path, capsys):
    root, model = demo
    out = tmp_path / "out"
    lines = _cli(["score", model, root / "widget" / "test" / "good", "-o", out,
                  "--temp-dir", "/proc", *SMALL], capsys, [root], out, code=2,
                 words="--temp-dir /proc")
    assert "with --temp-dir to a" not in lines[-1], lines
    assert not out.exists()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifo_is_not_a_missing_file(demo, tmp_path):
    root, model = demo
    fifo = _fifo(tmp_path / "m.safetensors")
    # A separate process with a timeout: opening a FIFO for reading would wait forever.
    for argv, words in (
            (["score", fifo, root / "widget" / "test" / "good", "-o", tmp_path / "o"],
             "named pipe"),
            (["fit", root, "--category", "widget", "-o", tmp_path / "n.safetensors",
              "--backbone", "resnet18", "--weights", fifo], "named pipe")):
        proc = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", *map(str, argv),
                               *SMALL], env=child_env(), cwd=CHILD_CWD,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "does not exist" not in proc.stderr, proc.stderr
    # An image named on the command line that is a FIFO: skipped, named as a pipe.
    pipe = _fifo(tmp_path / "p.png")
    good = _square(tmp_path / "good.png")
    proc = subprocess.run([sys.executable, "-m", "patchcore_fast.cli", "score", str(model),
                           str(pipe), str(good), "-o", str(tmp_path / "o3"), "--device",
                           "cpu", "--quiet"], env=child_env(), cwd=CHILD_CWD,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "p.png" in proc.stderr and "named pipe" in proc.stderr, proc.stderr


def test_symlink_loop_is_not_dangling(demo, tmp_path, capsys):
    root, model = demo
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    _cli(["score", a, root / "widget" / "test" / "good", "-o", tmp_path / "o", *SMALL],
         capsys, [root], None, code=2, words="loop of symbolic links")
    src = tmp_path / "in"
    _square(src / "ok.png")
    os.symlink(src / "y.png", src / "x.png")
    os.symlink(src / "x.png", src / "y.png")
    lines = _cli(["score", model, src, "-o", tmp_path / "o2", "--device", "cpu"], capsys,
                 [src], tmp_path / "o2")
    warned = [l for l in lines if "warning" in l]
    looped = [l for l in warned if "x.png" in l or "y.png" in l]
    assert len(looped) == 2 and all("loop of symbolic links" in l for l in looped), lines
    assert not [l for l in warned if "dangling" in l], lines


def test_workers_capped_at_the_cpus(demo, tmp_path, capsys, monkeypatch):
    import torch.utils.data as tud

    root, model = demo
    asked = []
    real = tud.DataLoader.__init__

    def record(self, *args, **kwargs):
        asked.append(kwargs.get("num_workers", 0))
        kwargs["num_workers"] = 0  # whatever was asked, this test starts no process
        real(self, *args, **kwargs)

    monkeypatch.setattr(tud.DataLoader, "__init__", record)
    cpus = len(os.sched_getaffinity(0))
    lines = _cli(["score", model, root / "widget" / "test" / "good", "-o", tmp_path / "o",
                  "--workers", "64", "--no-overlays", "--device", "cpu"], capsys, [root],
                 tmp_path / "o")
    assert asked and max(asked) <= cpus, asked
    assert [l for l in lines if "--workers 64" in l and f"capped at {cpus}" in l], lines


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_file_permissions_like_every_output(umask, demo, tmp_path, capsys):
    root, _ = demo
    old = os.umask(umask)
    try:
        model = tmp_path / "m.safetensors"
        _cli(["fit", root, "--category", "widget", "-o", model, *FIT], capsys, [root], None)
        _cli(["score", model, root / "widget" / "test" / "good", "-o", tmp_path / "out",
              *SMALL], capsys, [root], None)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in
             [model, tmp_path / "out" / "scores.csv",
              *(tmp_path / "out" / "overlays").iterdir()]}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
