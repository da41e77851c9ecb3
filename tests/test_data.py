"""Reading odd image files, skipping bad ones, masks and layouts."""

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import datasets, geometry, images
from patchcore_fast.errors import PatchCoreError, SkippedFileWarning


def _rgb(h=40, w=60):
    rng = np.random.default_rng(0)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tif"])
def test_formats_are_read_as_rgb(tmp_path, ext):
    p = tmp_path / f"x.{ext}"
    Image.fromarray(_rgb()).save(p)
    img = images.read_image(p)
    assert img.mode == "RGB" and img.size == (60, 40)


def test_grey_rgba_palette_cmyk(tmp_path):
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([_rgb(), np.full((40, 60), 128, np.uint8)])).save(tmp_path / "a.png")
    Image.fromarray(_rgb()).convert("P").save(tmp_path / "p.png")
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("g.png", "a.png", "p.png", "c.jpg"):
        img = images.read_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (60, 40)
    grey = np.asarray(images.read_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(grey[..., 0], _rgb()[..., 0])


def test_16bit_is_scaled_to_8bit(tmp_path):
    a16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "d.png")
    Image.fromarray(a16).save(tmp_path / "d.tif")
    for name in ("d.png", "d.tif"):
        got = np.asarray(images.read_image(tmp_path / name))[..., 0].astype(int)
        np.testing.assert_allclose(got, np.rint(a16 / 257.0), atol=1)


def test_exif_rotation(tmp_path):
    img = Image.fromarray(_rgb(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert images.read_image(tmp_path / "r.jpg").size == (40, 60)


def test_bad_files_skipped_with_warning_and_counted(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    skipped = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        paths = datasets.list_images([tmp_path], skipped=skipped)
        got = list(datasets.iterate_images(paths, geometry.Preprocess(32, 32, resize="shorter"), 2, skipped=skipped))
    assert sum(len(i) for i, _ in got) == 1
    names = sorted(p.rsplit("/", 1)[-1] for p in skipped)
    assert names == ["empty.png", "notes.txt", "text.png", "trunc.png"]
    msgs = [str(x.message) for x in w if issubclass(x.category, SkippedFileWarning)]
    assert len(msgs) == 4 and all("skipping" in m for m in msgs)
    assert any("empty.png" in m and "0 bytes" in m for m in msgs)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(PatchCoreError, match="does not exist"):
        datasets.list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchCoreError, match="holds no images"):
        datasets.list_images([tmp_path / "empty"])


def test_preprocess_geometry_and_mask_nearest(tmp_path):
    pre = geometry.Preprocess(256, 224, resize="shorter")
    img = Image.fromarray(_rgb(300, 400))
    x = pre.image(img)
    assert x.shape == (3, 224, 224)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 150:250] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    m = pre.mask(images.read_mask(tmp_path / "m.png"))
    assert m.shape == (224, 224) and m.dtype == torch.bool
    # Binary after nearest resize; the square keeps its area up to the scale factor.
    scale = 256 / 300
    assert abs(int(m.sum()) - 100 * 100 * scale ** 2) < 0.05 * 100 * 100 * scale ** 2
    assert not pre.mask(None).any()


def test_mvtec_layout(tmp_path):
    cat = tmp_path / "thing"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (cat / sub).mkdir(parents=True)
    for sub in ("train/good", "test/good", "test/crack"):
        Image.fromarray(_rgb()).save(cat / sub / "000.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(cat / "ground_truth/crack/000_mask.png")
    assert datasets.find_categories(tmp_path) == ["thing"]
    items = datasets.mvtec_test(cat)
    assert [(i.defect, i.label, i.mask is not None) for i in items] == [
        ("crack", 1, True), ("good", 0, False)]
    with pytest.raises(PatchCoreError, match="no category"):
        datasets.resolve_categories(tmp_path, ["other"])


def test_mask_of_names_the_image_when_it_has_no_mask(tmp_path):
    from patchcore_fast.evaluation import mask_of

    gone = tmp_path / "000.png"
    gone.write_text("not an image any more")
    with pytest.raises(PatchCoreError, match=re.escape(f"cannot read image {gone} any more")):
        mask_of(datasets.TestImage(gone, 0, "good", None),
                geometry.Preprocess(64, 0, resize="shorter"))


def test_maps_back_of_an_image_changed_during_the_run_is_one_line(tmp_path):
    from patchcore_fast import PatchCore, PatchCoreConfig

    changed = tmp_path / "a.png"
    changed.write_bytes(b"\x89PNG truncated since it was read")
    model = PatchCore(PatchCoreConfig(backbone="resnet18", pretrained=False, device="cpu"))
    with pytest.raises(PatchCoreError, match=re.escape(f"cannot read image {changed} any more")):
        model.maps_back([changed], torch.zeros(1, 224, 224))
