"""Hostile and unlucky input (issue #13): tampered model files, wrong backbone weights,
images that would blow up memory, unsupported or dangling inputs, disk full and permission
errors while writing. Each ends in one line (exit code 2 on the command line), no
traceback, and no partial or changed file."""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.cli import main
from patchcore_fast.datasets import iterate_images, list_images
from patchcore_fast.geometry import Preprocess
from patchcore_fast.images import read_image
from patchcore_fast.errors import LargeImageWarning, PatchCoreError, SkippedFileWarning
from patchcore_fast.files import atomic_path, write_text
from child import CHILD_CWD, CLI, child_env
from model_files import read_model

SMALL = ["--image-size", "64", "--crop", "64", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def demo(fit_demo):
    return fit_demo("hostile", seed=11, n_train=4, n_test_good=1, n_test_defect=1)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("patchcore-fast: error: "), lines
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----- 1. model files that load but hold the wrong thing ---------------------------------

def _config(meta: dict, **changes) -> dict:
    config = json.loads(meta["config"])
    config.update(changes)
    return {"config": json.dumps(config)}


# name -> (tampering of (meta, tensors) -> (meta changes, tensor changes), words expected)
TAMPERED = {
    "nan bank": (lambda m, t: ({}, {"bank": t["bank"].index_fill(0, torch.tensor([1]),
                                                                  float("nan"))}),
                 "bank holds"),
    "inf bank": (lambda m, t: ({}, {"bank": t["bank"].index_fill(1, torch.tensor([0]),
                                                                  float("inf"))}),
                 "NaN or infinite"),
    "int32 bank": (lambda m, t: ({}, {"bank": t["bank"].to(torch.int32)}),
                   "bank is int32, should be float32"),
    "float neighbourhoods": (lambda m, t: ({}, {"neighbourhoods":
                                                t["neighbourhoods"].float()}),
                             "neighbourhoods is float32, should be int64"),
    "neighbourhoods out of range": (lambda m, t: ({}, {"neighbourhoods":
                                                       t["neighbourhoods"] + 10 ** 6}),
                                    "outside the bank"),
    "projection columns": (lambda m, t: ({}, {"projection": t["projection"][:, :-3]}),
                           "columns"),
    "empty bank": (lambda m, t: ({}, {"bank": t["bank"][:0],
                                      "neighbourhoods": t["neighbourhoods"][:0]}),
                   "the bank is empty"),
    "missing bank": (lambda m, t: ({}, {"bank": None}), "no bank tensor"),
    "fit_stats not JSON": (lambda m, t: ({"fit_stats": "{images: 4"}, {}), "fit_stats"),
    "config not JSON": (lambda m, t: ({"config": "not json"}, {}), "config"),
    "image size a string": (lambda m, t: (_config(m, image_size="256"), {}),
                            "setting image_size should be int, got \"256\""),
    "blur a bool": (lambda m, t: (_config(m, blur_sigma=True), {}), "blur_sigma"),
    "image size 100,000": (lambda m, t: (_config(m, image_size=100_000, crop=100_000), {}),
                           "image size should be between 16 and 2,048"),
    "negative blur": (lambda m, t: (_config(m, blur_sigma=-1.0), {}), "blur_sigma"),
    "backbone not an object": (lambda m, t: ({"backbone": "[1, 2]"}, {}), "backbone"),
    "backbone channels wrong": (lambda m, t: ({"backbone": json.dumps(
        {**json.loads(m["backbone"]), "channels": ["a"]})}, {}), "backbone"),
    "grid wrong": (lambda m, t: ({"grid": "[0, -1]"}, {}), "grid"),
    "unknown tensor": (lambda m, t: ({}, {"extra": torch.zeros(3)}), "unknown tensor"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_model_one_line(demo, case, tmp_path, capsys):
    from safetensors.torch import save_file

    root, model = demo
    meta, tensors = read_model(model)
    meta_changes, tensor_changes = TAMPERED[case][0](meta, tensors)
    meta.update(meta_changes)
    for k, v in tensor_changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v.contiguous()
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    image = next((root / "widget" / "test" / "good").glob("*.png"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["score", str(bad), str(image), "-o", str(out), "--device", "cpu",
                 "--quiet"]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and TAMPERED[case][1] in line, line
    assert len(line) < 400, line
    assert not out.exists()


def test_untampered_model_loads(demo):
    # The control of the matrix above: the same file, rewritten unchanged, loads.
    model = PatchCore.load(demo[1], device="cpu")
    assert model.bank.shape[0] > 0 and model.fit_stats["images"] == 4


def test_tampered_model_console_script(demo, tmp_path):
    from safetensors.torch import save_file

    root, model = demo
    meta, tensors = read_model(model)
    tensors["bank"] = tensors["bank"].to(torch.int32)
    bad = tmp_path / "int32.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    proc = subprocess.run([*CLI, "score", str(bad),
                           str(root / "widget" / "test" / "good"), "-o", str(tmp_path / "o"),
                           "--device", "cpu", "--quiet"], capture_output=True, text=True,
                          env=child_env(), cwd=CHILD_CWD)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ----- 2. backbone weights loaded strictly -----------------------------------------------

def _torchvision_weights(tmp_path: Path, arch: str, drop_fc: bool = False,
                         prefix: str = "") -> Path:
    import torchvision.models as tvm

    torch.manual_seed(0)
    state = getattr(tvm, arch)(weights=None).state_dict()
    state = {prefix + k: v for k, v in state.items()
             if not (drop_fc and k.startswith("fc."))}
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("arch,words", [
    ("resnet34", "the file's tensor layer1.2.conv1.weight is not in resnet18"),
    ("resnet50", "layer1.0.conv1.weight is (64, 64, 1, 1) in the file but (64, 64, 3, 3) in "
                 "resnet18"),
])
def test_wrong_backbone_weights_one_line(demo, arch, words, tmp_path, capsys):
    root, _ = demo
    weights = _torchvision_weights(tmp_path, arch)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["fit", str(root), "--category", "widget", "-o", str(out / "m.safetensors"),
                 "--backbone", "resnet18", "--weights", str(weights), *SMALL]) == 2
    line = _error_line(capsys)
    assert f"weights file {weights} does not fit resnet18" in line and words in line, line
    assert not _files(out)


def test_right_backbone_weights_accepted(tmp_path):
    from patchcore_fast.backbone import load_backbone

    # A checkpoint saved from DataParallel and without the classifier head still fits.
    weights = _torchvision_weights(tmp_path, "resnet18", drop_fc=True, prefix="module.")
    backbone = load_backbone("resnet18", None, str(weights))
    assert backbone.info.channels == (128, 256)
    assert backbone.info.weights.startswith("file:")
    with pytest.raises(PatchCoreError, match="wide_resnet50_2.*another shape"):
        load_backbone("wide_resnet50_2", None, str(_torchvision_weights(tmp_path, "resnet50")))


def test_weights_taken_into_a_skeleton_give_the_loaded_network(tmp_path):
    """The network is built on the meta device and takes the file's tensors (no random
    initialisation): its maps are those of a network initialised, loaded by copy and
    folded the plain way, for a half-precision file without head or batch-norm counters;
    nothing is left on the meta device."""
    import torchvision.models as tvm
    from patchcore_fast.backbone import _fold_batch_norms, load_backbone

    torch.manual_seed(1)
    net = tvm.resnet18(weights=None)
    with torch.no_grad():  # batch-norm statistics other than the defaults
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()
             if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
    torch.save(state, tmp_path / "half.pth")
    backbone = load_backbone("resnet18", ("layer1", "layer3"), str(tmp_path / "half.pth"))
    tensors = [*backbone.parameters(), *backbone.buffers()]
    assert not any(t.is_meta for t in tensors) and {t.dtype for t in tensors} == {torch.float32}
    plain = tvm.resnet18(weights=None)
    plain.load_state_dict(state, strict=False)  # copied in, converted to float32
    _fold_batch_norms(plain)
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        y = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        want = [plain.layer1(y)]
        want.append(plain.layer3(plain.layer2(want[0])))
        got = backbone(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ----- 3. images -------------------------------------------------------------------------

def test_elongated_image_bounded_and_warned(tmp_path):
    thin = tmp_path / "thin.png"
    Image.new("L", (1, 100_000), 77).save(thin)
    assert thin.stat().st_size < 2_000  # a few hundred bytes that once needed ~20 GB
    pre = Preprocess(256, 224, resize="shorter")
    img = read_image(thin)
    assert pre.oversize(img.size) and "the model sees" in pre.oversize(img.size)
    x = pre.image(img)
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    with pytest.warns(LargeImageWarning, match="thin.png: 1 x 100,000 pixels"):
        batches = list(iterate_images([thin], pre))
    assert batches[0][1].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("size", [(40, 3000), (3001, 17), (2, 20_000), (500, 400)])
def test_bounded_resize_is_the_same_crop(size):
    # The bounded path (resize only the source region behind the crop) gives the pixels of
    # resize-then-crop up to float rounding; a budget of 0 forces it on any image.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for image_size, crop in ((64, 56), (32, 28)):
        plain = Preprocess(image_size, crop, resize="shorter")
        bounded = Preprocess(image_size, crop, resize="shorter", max_pixels=0)
        a, b = plain.display(img).astype(int), bounded.display(img).astype(int)
        assert a.shape == b.shape == (crop, crop, 3)
        assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.5
        mask = Image.fromarray((rng.random((size[1], size[0])) > 0.5).astype(np.uint8) * 255)
        assert (plain.mask(mask) == bounded.mask(mask)).float().mean() > 0.9


def test_unsupported_dangling_and_special_inputs_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "ok.png")
    Image.new("RGB", (32, 32)).save(folder / "anim.gif")
    Image.new("RGB", (32, 32)).save(folder / "photo.webp")
    (folder / "notes.txt").write_text("hi")
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "sub").mkdir()
    skipped: list[str] = []
    with pytest.warns(SkippedFileWarning) as caught:
        paths = list_images([folder], "input", skipped)
    assert paths == [folder / "ok.png"]
    said = {Path(str(w.message).split(": ")[0].removeprefix("skipping ")).name:
            str(w.message) for w in caught}
    assert "unsupported image format GIF" in said["anim.gif"]
    assert "unsupported image format WEBP" in said["photo.webp"]
    assert "not an image file" in said["notes.txt"]
    assert "dangling symbolic link" in said["link.png"] and "gone.png" in said["link.png"]
    assert "not a regular file" in said["pipe.png"]
    assert sorted(Path(s).name for s in skipped) == sorted(said)
    # Given by name: named as unsupported too; a GIF renamed .png is found by its content.
    with pytest.warns(SkippedFileWarning, match="unsupported image format GIF"):
        assert list_images([folder / "anim.gif"], "input", []) == []
    disguised = tmp_path / "disguised.png"
    disguised.write_bytes((folder / "anim.gif").read_bytes())
    with pytest.raises(Exception, match="unsupported image format GIF") as renamed:
        read_image(disguised)
    # One message, whichever way the format was found (it once listed other formats).
    assert str(renamed.value) == said["anim.gif"].split(": ", 1)[1]
    with pytest.raises(PatchCoreError, match="dangling symbolic link"):
        list_images([folder / "link.png"], "input")


def test_fit_counts_every_skipped_input(demo, tmp_path, capsys):
    root, _ = demo
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((root / "widget" / "train" / "good").glob("*.png"))[:3]:
        (good / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (32, 32)).save(good / "anim.gif")
    os.symlink(tmp_path / "gone.png", good / "link.png")
    Image.new("L", (1, 100_000), 77).save(good / "thin.png")  # the paper's crop: a sliver
    capsys.readouterr()
    assert main(["fit", str(good), "-o", str(tmp_path / "m.safetensors"),
                 "--backbone", "efficientnet_lite0", "--resize", "shorter", "--image-size", "64",
                 "--crop", "64", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any("anim.gif" in l and "unsupported image format GIF" in l for l in
               err.splitlines()), err
    assert any("link.png" in l and "dangling" in l for l in err.splitlines()), err
    assert any("thin.png" in l and "the model sees" in l for l in err.splitlines()), err
    assert "skipped 2 " in err
    assert PatchCore.load(tmp_path / "m.safetensors").fit_stats["images"] == 4


# ----- 4. files: umask, disk full, permissions -------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_honour_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def _enospc_after_half(monkeypatch, cls, method):
    """Make ``cls.method`` write half of its output, then fail as a full disk does."""
    real = getattr(cls, method)

    def full(self, *args, **kwargs):
        real(self, *args, **kwargs)
        target = self if isinstance(self, Path) else Path(args[0])  # Image.save(fp, ...)
        if target.is_file():
            os.truncate(target, target.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cls, method, full)


def test_disk_full_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.csv"
    target.write_text("old\n")
    _enospc_after_half(monkeypatch, Path, "write_text")
    with pytest.raises(PatchCoreError) as info:
        write_text(target, "new contents\n" * 1000)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_text() == "old\n" and _files(tmp_path) == [target]


def test_permission_errors_name_the_file(tmp_path, monkeypatch):
    # Tests run as root here (a read-only folder would not stop root): mock the OS's answer.
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PatchCoreError, match=r"cannot write .*out\.json: Permission denied$"):
        write_text(tmp_path / "out.json", "{}")
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    with pytest.raises(PatchCoreError, match="taken: a folder of that name is in the way"):
        write_text(tmp_path / "taken", "x")
    assert _files(tmp_path) == []
    # The folder cannot be made: a file stands where it goes.
    (tmp_path / "file").write_text("x")
    with pytest.raises(PatchCoreError, match="cannot create the folder .*file for a.txt"):
        write_text(tmp_path / "file" / "a.txt", "x")
    with pytest.raises(ValueError):  # other errors of the body pass through unchanged
        with atomic_path(tmp_path / "b.txt"):
            raise ValueError("a bug, not the disk")
    assert _files(tmp_path) == [tmp_path / "file"]


@pytest.mark.parametrize("where", ["overlay", "scores.csv"])
def test_score_disk_full_one_line(demo, where, tmp_path, monkeypatch, capsys):
    root, model = demo
    out = tmp_path / "out"
    if where == "overlay":
        _enospc_after_half(monkeypatch, Path, "write_bytes")  # overlays.png_bytes' file
    else:
        _enospc_after_half(monkeypatch, Path, "write_text")
    capsys.readouterr()
    assert main(["score", str(model), str(root / "widget" / "test" / "good"), "-o",
                 str(out), "--device", "cpu", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "No space left on device" in line and str(out) in line, line
    assert (".png" if where == "overlay" else "scores.csv") in line, line
    assert not [p for p in _files(out) if p.name.endswith(".tmp")]
    if where == "overlay":
        assert not list(out.glob("overlays/*.png"))


# ----- 5. disk full while saving a model --------------------------------------------------

def test_model_save_disk_full_mocked(demo, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    model = PatchCore.load(demo[1], device="cpu")
    target = tmp_path / "m.safetensors"
    target.write_bytes(demo[1].read_bytes())
    before = target.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(PatchCoreError) as info:
        model.save(target)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == before and _files(tmp_path) == [target]


# The child limits the size of any file it writes (RLIMIT_FSIZE: the kernel then fails the
# write with EFBIG, as a full disk fails it with ENOSPC) once torch is imported.
CHILD = """
import resource, signal, sys
from patchcore_fast.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[2:]))
"""


def test_model_save_file_too_large_real(demo, tmp_path):
    root, model = demo
    target = tmp_path / "m.safetensors"
    target.write_bytes(model.read_bytes())
    before = target.read_bytes()
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(len(before) // 2), "fit", str(root), "--category",
         "widget", "-o", str(target), "--backbone", "efficientnet_lite0", "--coreset-ratio",
         "0.25", "--in-memory", *SMALL], capture_output=True, text=True, env=env,
        cwd=CHILD_CWD)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {target}: " in lines[0] and "large" in lines[0], lines
    assert target.read_bytes() == before and _files(tmp_path) == [target]


def test_file_sha256_is_memoised_but_sees_a_changed_file(tmp_path):
    import hashlib

    from patchcore_fast import files

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert files.file_sha256(f) == want
    hits = files._sha256.cache_info().hits
    assert files.file_sha256(str(f)) == want  # hashed once per run, not once per use
    assert files._sha256.cache_info().hits == hits + 1
    # Replaced atomically (a new inode), same size:
    with atomic_path(f) as tmp:
        Path(tmp).write_bytes(b"b" * 1000)
    assert files.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    # Rewritten in place, same size, a later modification time:
    st = f.stat()
    f.write_bytes(b"c" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert files.file_sha256(f) == hashlib.sha256(b"c" * 1000).hexdigest()
    # Another size:
    f.write_bytes(b"c" * 999)
    assert files.file_sha256(f) == hashlib.sha256(b"c" * 999).hexdigest()
