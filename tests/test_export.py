"""ONNX export (issue #23): the graph in ONNX Runtime against the package on the same
inputs, the standalone example in a process that cannot import patchcore_fast, external
data, and bad output paths refused in one line."""

import ast
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore_fast import PatchCore
from patchcore_fast.cli import main
from patchcore_fast.calibration import label, normalise
from patchcore_fast.datasets import iterate_images, list_images
from patchcore_fast.demo import write_demo_data
from patchcore_fast.errors import PatchCoreError
from patchcore_fast.export import export_onnx
from child import child_env

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

EXAMPLE = Path(__file__).resolve().parents[1] / "patchcore_fast" / "onnx_example.py"
# Two models between them cover both geometries and both image scores: Lite0 on the
# default padded square (rod photos, 1:1 to 1:3, are padded), a random ResNet-18 on the
# paper's resize-and-crop without the reweighting.
MODELS = {
    "lite0-longer": ["--backbone", "efficientnet_lite0", "--image-size", "64"],
    "resnet18-crop": ["--backbone", "resnet18", "--pretrained", "false", "--resize",
                      "shorter", "--image-size", "72", "--crop", "64",
                      "--num-neighbors", "0"],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, seed=3, n_train=6, n_test_good=2, n_test_defect=2)
    return root


@pytest.fixture(scope="module")
def photos(demo, tmp_path_factory) -> list[Path]:
    """Square widget photos and elongated rod photos, copied to unique names (the example
    names its maps after the photos)."""
    out = tmp_path_factory.mktemp("photos")
    for path in sorted(demo.glob("*/test/*/*.png")):
        category, _, kind, name = path.relative_to(demo).parts
        shutil.copy(path, out / f"{category}_{kind}_{name}")
    return list_images([out], "input", [])


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, demo, tmp_path_factory) -> tuple[Path, Path]:
    """(model file, .onnx file), both written through the command line."""
    out = tmp_path_factory.mktemp(request.param)
    model = out / "m.safetensors"
    assert main(["fit", str(demo), "--category", "widget", "-o", str(model),
                 "--coreset-ratio", "0.25", "--device", "cpu", "--quiet",
                 *MODELS[request.param]]) == 0
    onnx_file = out / "m.onnx"
    assert main(["export", str(model), "-o", str(onnx_file), "--quiet"]) == 0
    return model, onnx_file


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_close(onnx_scores, scores, onnx_maps, maps) -> None:
    """Scores within 1e-4 relative, maps within 1e-3 of each map's range (the issue's
    acceptance)."""
    scores = np.asarray(scores, np.float64)
    np.testing.assert_allclose(onnx_scores, scores, rtol=1e-4, atol=0)
    for got, want in zip(onnx_maps, maps):
        want = np.asarray(want, np.float64)
        assert got.shape == want.shape
        span = want.max() - want.min()
        assert span > 0
        assert np.abs(got - want).max() <= 1e-3 * span


def test_graph_equals_the_package_on_the_same_inputs(exported, photos):
    model_file, onnx_file = exported
    model = PatchCore.load(model_file, device="cpu")
    session = _session(onnx_file)
    batches = list(iterate_images(photos, model.preprocess, batch_size=5))
    assert len(batches) >= 2
    for _, batch, _ in batches + [([0], batches[0][1][:1], None)]:  # batch 1: the dynamic axis
        with torch.inference_mode():
            patches, grid = model.embedder(batch)
            scores, maps = model.score_embeddings(patches, grid, tuple(batch.shape[-2:]))
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"images": batch.numpy()})))
        got_scores, got_maps = got["score"], got["map"]
        assert got_scores.dtype == np.float32 and got_maps.shape == tuple(maps.shape)
        _assert_close(got_scores, scores.numpy(), got_maps, maps.numpy())
        # The verdict: the package's normalisation and label of the graph's own score, and
        # of the package's score away from the threshold (the scores agree to 1e-4).
        cal = model.calibration
        assert cal is not None  # fit calibrates by default
        np.testing.assert_allclose(got["normalised"], normalise(got_scores.astype(np.float64),
                                                                cal), rtol=0, atol=1e-6)
        assert got["label"].dtype == np.bool_
        np.testing.assert_array_equal(got["label"], label(got_scores, cal))
        clear = np.abs(scores.numpy() - cal.image_threshold) > 1e-3 * cal.image_threshold
        np.testing.assert_array_equal(got["label"][clear], label(scores.numpy(), cal)[clear])


def test_graph_is_standard_onnx_with_the_bank_once(exported):
    model_file, onnx_file = exported
    model = PatchCore.load(model_file, device="cpu")
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom operator
    m, d = model.bank.shape
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    assert shapes.count((m, d)) == 1  # one constant serves the Gemm and the Gathers
    meta = {p.key: p.value for p in proto.metadata_props}
    c = model.config
    assert (meta["resize"], int(meta["image_size"]), int(meta["crop"])) == (
        c.resize, c.image_size, c.crop)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["score", "map", "normalised", "label"]
    assert float(meta["image_threshold"]) == model.calibration.image_threshold
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    side = c.crop or c.image_size
    assert dims[0].dim_param and [x.dim_value for x in dims[1:]] == [3, side, side]


def _bare_site(folder: Path) -> Path:
    """A folder holding links to numpy, onnxruntime and Pillow (and the shared libraries
    their wheels ship in ``*.libs``) and nothing else: the example's whole import path."""
    import importlib.util

    folder.mkdir()
    for name in ("numpy", "onnxruntime", "PIL"):
        package = Path(importlib.util.find_spec(name).submodule_search_locations[0])
        (folder / name).symlink_to(package)
        for libs in package.parent.glob("*.libs"):
            if not (folder / libs.name).exists():
                (folder / libs.name).symlink_to(libs)
    return folder


def test_example_runs_without_the_package(exported, photos, tmp_path):
    """The example, in an interpreter whose import path is the standard library plus
    numpy, onnxruntime and Pillow (no site-packages, where patchcore_fast is installed),
    gives the package's scores and its maps at each photo's own size."""
    model_file, onnx_file = exported
    # A folder of its own: the .onnx file and the script, as a user would copy them.
    work = tmp_path / "standalone"
    work.mkdir()
    shutil.copy(onnx_file, work / "model.onnx")
    shutil.copy(EXAMPLE, work / "onnx_example.py")
    site = _bare_site(tmp_path / "site")
    guard = ("import sys, importlib.util, runpy; sys.path.append(sys.argv[1]); "
             "assert importlib.util.find_spec('patchcore_fast') is None, sys.path; "
             "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    names = [str(p) for p in photos]
    # -I: no PYTHONPATH, user site or script folder; -S: no site-packages.
    run = subprocess.run([sys.executable, "-I", "-S", "-c", guard, str(site),
                          "onnx_example.py", "model.onnx", *names, "--maps", "maps",
                          "--batch-size", "3"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split(",") for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == names
    pred = PatchCore.load(model_file, device="cpu").predict(photos)
    maps = [np.load(work / "maps" / (p.stem + ".npy")) for p in photos]
    _assert_close(np.array([float(r[1]) for r in rows]), pred.scores, maps, pred.maps)


def test_example_imports_only_onnxruntime_numpy_pillow():
    tree = ast.parse(EXAMPLE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    third_party = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "onnxruntime", "PIL"}


@pytest.mark.parametrize("exported", ["lite0-longer"], indirect=True)
def test_external_data_gives_the_same_graph(exported, photos, tmp_path):
    """Above the threshold the constants go to FILE.onnx.data, found by its file name: the
    pair still runs after moving together to another folder."""
    model_file, onnx_file = exported
    model = PatchCore.load(model_file, device="cpu")
    report = export_onnx(model, tmp_path / "a" / "x.onnx", model_file, external_data_above=0)
    assert report.data_path == tmp_path / "a" / "x.onnx.data"
    # Every constant but the few tiny ones (<= 256 bytes) that stay in the graph.
    assert report.data_path.stat().st_size >= 0.99 * report.constant_bytes
    assert (tmp_path / "a" / "x.onnx").stat().st_size < 10 ** 6
    shutil.move(tmp_path / "a", tmp_path / "b")
    _, batch, _ = next(iter(iterate_images(photos, model.preprocess, batch_size=3)))
    want = _session(onnx_file).run(None, {"images": batch.numpy()})
    got = _session(tmp_path / "b" / "x.onnx").run(None, {"images": batch.numpy()})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x.onnx", "x.onnx.data"]


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("patchcore-fast: error: ")
    return lines[0]


@pytest.mark.parametrize("exported", ["resnet18-crop"], indirect=True)
def test_bad_outputs_are_refused_in_one_line(exported, tmp_path, capsys):
    model_file, _ = exported
    before = model_file.read_bytes()
    folder = tmp_path / "a folder"
    folder.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {str(model_file): "would overwrite the input file",
             str(folder): "is a folder",
             str(a_file / "x.onnx"): "is a file, not a folder"}
    if Path("/proc/self").is_dir():  # a place nobody, root included, can create files in
        cases["/proc/x.onnx"] = "cannot write"
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[str(locked / "x.onnx")] = "permission denied"
    for out, why in cases.items():
        line = _refused(["export", str(model_file), "-o", out], capsys)
        assert why in line and out.split("/")[-1] in line, line
    assert model_file.read_bytes() == before
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == (
        sorted(["a folder", "file.txt"] + (["locked"] if os.geteuid() != 0 else [])))
    missing = _refused(["export", str(tmp_path / "none.safetensors"), "-o",
                        str(tmp_path / "x.onnx")], capsys)
    assert "does not exist" in missing


@pytest.mark.parametrize("exported", ["resnet18-crop"], indirect=True)
def test_input_that_follows_the_photo_is_refused(exported):
    model = PatchCore.load(exported[0], device="cpu")
    model.config = dataclasses.replace(model.config, resize="shorter", crop=0)
    with pytest.raises(PatchCoreError, match="no one input size"):
        export_onnx(model, Path(exported[1]).with_name("never.onnx"))
    assert not Path(exported[1]).with_name("never.onnx").exists()


@pytest.mark.parametrize("exported", ["lite0-longer"], indirect=True)
def test_readme_commands_run_as_written(exported, demo, tmp_path):
    """The README's export block, line by line, on the Quick start's layout (a demo folder
    with widget.safetensors); only the .venv paths and the repository path of the example
    are this checkout's."""
    model_file, _ = exported
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    section = readme[readme.index("## Export to ONNX"):]
    block = section[section.index("```bash") + 7:]
    lines = [l for l in block[:block.index("```")].splitlines() if l.strip()]
    assert len(lines) == 2 and "export" in lines[0] and "onnx_example.py" in lines[1]
    shutil.copytree(demo, tmp_path / "demo")
    shutil.copy(model_file, tmp_path / "demo" / "widget.safetensors")
    here = {".venv/bin/patchcore-fast": [sys.executable, "-m", "patchcore_fast.cli"],
            ".venv/bin/python": [sys.executable],
            "patchcore_fast/onnx_example.py": [str(EXAMPLE)]}
    for line in lines:
        argv = [a for word in shlex.split(line) for a in here.get(word, [word])]
        run = subprocess.run(argv, cwd=tmp_path, env=child_env(), capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr
    printed = run.stdout.splitlines()
    assert [r.split(",")[0] for r in printed] == ["demo/widget/test/scratch/000.png",
                                                  "demo/widget/test/good/000.png"]
    assert float(printed[0].split(",")[1]) > float(printed[1].split(",")[1])  # defect higher
    maps = tmp_path / "demo" / "onnx-maps"
    assert sorted(p.name for p in maps.iterdir()) == ["000-2.npy", "000.npy"]  # same names
    assert np.load(maps / "000.npy").max() > np.load(maps / "000-2.npy").max()


@pytest.mark.parametrize("resize", ["longer", "shorter", "stretch"])
def test_example_geometry_is_the_package_s(resize):
    """The example's own placement, preparation and way back (it may not import the
    package) against geometry.place, Preprocess.image and Placement.to_original, on photo
    shapes that round halves, pad on one side and crop odd margins."""
    from PIL import Image

    from patchcore_fast import onnx_example as ex
    from patchcore_fast.geometry import Preprocess
    from patchcore_fast.geometry import place

    rng = np.random.default_rng(0)
    for size, crop in [((900, 900), 0), ((160, 480), 0), ((333, 101), 64), ((97, 250), 80),
                       ((1, 7), 0), ((641, 479), 96)]:
        if resize == "shorter" and crop == 0:
            crop = 64  # the export's only shorter geometry: with a crop
        meta = {"resize": resize, "image_size": "96", "crop": str(crop),
                "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]",
                "pad_fill": "[124, 116, 104]"}
        p = place(size, resize, 96, crop)
        assert ex.placement(*size, meta) == (p.resized, p.canvas, p.offset, p.box)
        photo = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
        pre = Preprocess(96, crop, resize=resize)
        np.testing.assert_array_equal(ex.prepare(photo, meta), pre.image(photo).numpy())
        amap = rng.random(p.input_size).astype(np.float32)
        want = p.to_original(torch.from_numpy(amap)).numpy()
        # torch computes the source coordinates in float32, the example in float64: on
        # this random map (values in [0, 1], neighbours apart by up to 1) they differ by a
        # few 1e-6 at 900 pixels.
        np.testing.assert_allclose(ex.map_to_photo(amap, *size, meta), want, rtol=0,
                                   atol=2e-5)


def _triangle_pass(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """One pass of the README's resize recipe (step 3) along ``axis``, 8-bit in and out."""
    a = np.moveaxis(a, axis, 0).astype(np.int64)
    scale = a.shape[0] / n_out
    wide = max(scale, 1.0)  # the triangle's half-width, in source pixels
    out = np.empty((n_out, *a.shape[1:]), np.int64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - wide + 0.5), 0), min(int(centre + wide + 0.5), a.shape[0])
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - centre + 0.5) / wide))
        fixed = np.trunc(0.5 + w / w.sum() * 2 ** 22).astype(np.int64)  # 22-bit weights
        out[i] = np.clip((2 ** 21 + np.tensordot(fixed, a[lo:hi], axes=(0, 0))) >> 22, 0, 255)
    return np.moveaxis(out, 0, axis)


def test_readme_resize_recipe_is_pillow_s_within_one_level():
    """README step 3 for other languages: two separable triangle-filter passes with 22-bit
    fixed-point weights give Pillow's BILINEAR resize within one 8-bit level (exactly when
    both sides shrink by the same factor, as bottle's 900 -> 224)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for (w, h), (rw, rh) in [((900, 900), (224, 224)), ((160, 480), (75, 224)),
                             ((97, 250), (64, 165)), ((31, 17), (224, 123))]:
        a = rng.integers(0, 256, (h, w, 3), np.uint8)
        want = np.asarray(Image.fromarray(a).resize((rw, rh), Image.BILINEAR)).astype(int)
        got = _triangle_pass(_triangle_pass(a, rw, 1), rh, 0)
        assert np.abs(got - want).max() <= 1
        if w == h:
            np.testing.assert_array_equal(got, want)


def test_uncalibrated_model_exports_score_and_map_only(exported, tmp_path):
    """A model file written before calibration existed: no verdict outputs."""
    model_file, _ = exported
    if "lite0" not in model_file.parent.name:
        pytest.skip("one geometry is enough for the outputs' names")
    model = PatchCore.load(model_file, device="cpu")
    model.calibration = None
    report = export_onnx(model, tmp_path / "old.onnx", model_file)
    assert report.outputs == ("score", "map")
    proto = onnx.load(str(tmp_path / "old.onnx"))
    assert [o.name for o in proto.graph.output] == ["score", "map"]
    assert "image_threshold" not in {p.key for p in proto.metadata_props}
