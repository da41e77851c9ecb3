"""Issue #15: image geometry (resize / pad / crop), maps at the photo's own size, old files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from patchcore_fast import PatchCore, PatchCoreConfig
from patchcore_fast.datasets import iterate_images
from patchcore_fast.files import MapSpool
from patchcore_fast.geometry import Preprocess, place


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (257, 256), (64, 64)])
@pytest.mark.parametrize("resize", ["shorter", "longer", "stretch"])
@pytest.mark.parametrize("crop", [0, 56])
def test_placement_shapes(size, resize, crop):
    p = place(size, resize, 64, crop)
    h_in, w_in = p.input_size
    if crop:
        assert (h_in, w_in) == (crop, crop)
    elif resize == "shorter":
        assert min(h_in, w_in) == 64 and abs(w_in / h_in - size[0] / size[1]) < 0.05
    else:
        assert (h_in, w_in) == (64, 64)
    x0, y0, x1, y1 = p.visible()
    assert 0 <= x0 < x1 <= w_in and 0 <= y0 < y1 <= h_in
    if resize == "longer" and size[0] != size[1] and not crop:
        assert (x1 - x0, y1 - y0) == p.resized  # the padding is left out
    amap = torch.rand(h_in, w_in)
    assert tuple(p.to_original(amap).shape) == (size[1], size[0])
    assert tuple(p.to_crop(amap).shape) == (y1 - y0, x1 - x0)


def _blob_mask(size, box):
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).ellipse(box, fill=255)
    return m


@pytest.mark.parametrize("resize,crop", [("shorter", 0), ("longer", 0), ("stretch", 0),
                                         ("shorter", 56), ("longer", 48)])
def test_map_back_aligns_with_the_mask(resize, crop):
    # A mask put through the geometry (as the model sees the photo) and taken back to the
    # photo's size lands where it was: the way back inverts the way in.
    size = (330, 110)
    mask = _blob_mask(size, (140, 30, 190, 80))  # in the middle: inside every crop
    pre = Preprocess(64, crop, resize=resize)
    p = pre.placement(size)
    seen = torch.from_numpy(np.asarray(pre._geometry(mask, Image.NEAREST, 0)) > 0).float()
    back = p.to_original(seen).numpy() > 0.5
    truth = np.asarray(mask) > 0
    iou = (back & truth).sum() / (back | truth).sum()
    assert iou > 0.85, iou
    # to_crop and Preprocess.mask describe the same pixels.
    assert tuple(p.to_crop(seen).shape) == tuple(pre.mask(mask).shape)
    assert torch.equal(p.to_crop(seen) > 0.5, pre.mask(mask))


def test_cropped_away_border_gets_the_minimum():
    p = place((300, 100), "shorter", 64, 56)
    amap = torch.full((56, 56), 2.0)
    amap[0, 0] = 1.0
    back = p.to_original(amap)
    assert back.shape == (100, 300)
    # The ends of the 1:3 photo were never seen: they hold the map's minimum.
    assert float(back[:, :80].max()) == pytest.approx(1.0)
    assert float(back[:, 220:].max()) == pytest.approx(1.0)
    assert float(back[20:80, 120:180].min()) == pytest.approx(2.0)


def test_longer_pads_with_the_mean_and_batches_by_shape(tmp_path):
    pre = Preprocess(64, 0, resize="longer")
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    x = pre.image(img)
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 0, :], torch.zeros(3, 64), atol=0.02)  # padding: mean -> 0
    assert torch.allclose(x[:, 32, :], x[:, 32, :1].expand(3, 64))   # the photo row
    # shorter without a crop keeps the aspect: photos of two shapes come in two batches.
    for name, wh in (("a", (300, 100)), ("b", (100, 100)), ("c", (300, 100))):
        Image.new("RGB", wh, (9, 99, 199)).save(tmp_path / f"{name}.png")
    batches = list(iterate_images(sorted(tmp_path.glob("*.png")), Preprocess(64, 0, resize="shorter"), 3))
    shapes = sorted(tuple(b.shape) for _, b, _ in batches)
    assert shapes == [(1, 3, 64, 64), (2, 3, 64, 192)]


def test_map_spool_keeps_shapes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.random(s).astype(np.float32) for s in ((3, 5), (7, 2), (1, 1), (4, 4))]
    with MapSpool(np.float32, tmp_path) as spool:
        spool.append(arrays[:2])
        spool.append(arrays[2:])
        assert spool.count == 4
        for i, a in enumerate(arrays):
            np.testing.assert_array_equal(spool.read(i)[0], a)
        assert [x.shape for x in spool.read(1, 4)] == [a.shape for a in arrays[1:]]


def test_config_without_geometry_loads_as_the_paper():
    # Files before issue #15 always held image_size and crop (256 and 224 by default then).
    data = json.loads(PatchCoreConfig(image_size=256, crop=224).to_json())
    del data["resize"]
    config = PatchCoreConfig.from_json(json.dumps(data))
    assert (config.resize, config.image_size, config.crop) == ("shorter", 256, 224)


def test_old_model_file_scores_as_before(fit_demo, tmp_path):
    # A file written before the geometry settings existed (no "resize" in its config)
    # loads as the paper's geometry and gives the same scores and maps.
    from safetensors import safe_open
    from safetensors.torch import save_file

    root, model_file = fit_demo("geometry-old", seed=4, n_train=6, n_test_good=2,
                                n_test_defect=1)
    with safe_open(str(model_file), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["config"])
    del config["resize"]  # (the demo photos are square: every resize mode places them alike)
    meta["config"] = json.dumps(config)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    images = sorted((root / "widget" / "test").rglob("*.png"))
    a = PatchCore.load(model_file, device="cpu").predict(images)
    b = PatchCore.load(old, device="cpu")
    assert b.config.resize == "shorter"
    b = b.predict(images)
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps):
        np.testing.assert_array_equal(x, y)
    assert a.maps[0].shape == (256, 256)  # the demo photos' own size


# ----- the elongated demo category, end to end ----------------------------------------------

@pytest.fixture(scope="module")
def rod(tmp_path_factory):
    """demo-data's elongated category, and a model fitted on it through the CLI with the
    default geometry (efficientnet_lite0, 10 %)."""
    from patchcore_fast.cli import main
    from patchcore_fast.demo import write_demo_data

    root = tmp_path_factory.mktemp("rod")
    write_demo_data(root, seed=5, n_train=16, n_test_good=6, n_test_defect=5,
                    categories=("rod",))
    model = root / "rod.safetensors"
    assert main(["fit", str(root), "--category", "rod", "-o", str(model), "--backbone",
                 "efficientnet_lite0", "--device", "cpu", "--quiet"]) == 0
    return root, model


def test_rod_maps_at_the_photo_size_align_with_the_masks(rod, tmp_path):
    from patchcore_fast.cli import main
    from patchcore_fast.datasets import mvtec_test
    from patchcore_fast.images import image_size

    root, model = rod
    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(root), "--category", "rod", "-o", str(out),
                 "--device", "cpu", "--quiet", "--save-maps"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    print(f"rod, default geometry: image AUROC {m['image_auroc']:.4f}, pixel AUROC "
          f"{m['pixel_auroc']:.4f}, PRO {m['pro']:.4f} (maps at {m['maps_at']})")
    assert m["maps_at"] == "original"
    assert m["pixel_auroc"] > 0.95
    items = mvtec_test(root / "rod")
    widths = set()
    for i in items:
        w, h = image_size(i.path)
        widths.add(w)
        amap = np.load(out / "maps" / i.defect / f"{i.path.name}.npy")
        assert amap.shape == (h, w), i.path
    assert len(widths) > 3  # photos of many shapes, each map at its own


def _end_defect_photos(tmp_path, n=4):
    """Rods 3 times as long as high with a spot near one end (demo-data's drawing)."""
    from patchcore_fast import demo

    rng = np.random.default_rng(99)
    paths = []
    for k in range(n):
        width = 3 * demo.ROD_HEIGHT
        img, bar = demo._rod(rng, width)
        at = 0.02 if k % 2 else 0.98  # the left or the right end of the bar
        mask, colour = demo._rod_defect(rng, "spot", width, bar, at)
        path = tmp_path / f"end{k}.png"
        Image.fromarray((demo._blend(img, mask, colour) * 255).round().astype(np.uint8)
                        ).save(path)
        paths.append(path)
    return paths


def test_defect_near_the_end_found_with_the_default_missed_by_the_centre_crop(rod, tmp_path):
    root, model_file = rod
    default = PatchCore.load(model_file, device="cpu")
    paper = PatchCore(default.config, resize="shorter", image_size=256, crop=224)
    paper.fit(root / "rod" / "train" / "good")
    assert (default.config.resize, default.config.crop) == (PatchCoreConfig.resize,
                                                            PatchCoreConfig.crop)
    good = sorted((root / "rod" / "test" / "good").glob("*.png"))
    ends = _end_defect_photos(tmp_path)
    margins = {}
    for name, model in (("default", default), ("paper", paper)):
        scores = model.predict(good + ends).scores
        top_good = scores[:len(good)].max()
        margins[name] = scores[len(good):] / top_good  # > 1: above every good photo
        print(f"{name} geometry ({model.config.resize} {model.config.image_size}, crop "
              f"{model.config.crop or 'none'}): end-defect score / highest good score "
              f"{np.round(margins[name], 3).tolist()}")
    assert (margins["default"] > 1.0).all()
    # The centre crop of the shorter side never sees the ends: missed or weaker.
    assert (margins["paper"] < margins["default"]).all()
    assert (margins["paper"] <= 1.0).any()


def test_no_crop_input_above_the_budget_is_skipped_naming_the_way_out(tmp_path):
    thin = tmp_path / "thin.png"
    Image.new("L", (40_000, 20), 77).save(thin)  # 128,000 x 64 at the shorter side 64
    with pytest.warns(UserWarning, match="without a crop.*--resize longer"):
        assert list(iterate_images([thin], Preprocess(64, 0, resize="shorter"))) == []
    # The same photo with the default geometry: one padded square input.
    batches = list(iterate_images([thin], Preprocess(64, 0, resize="longer")))
    assert batches[0][1].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("resize,crop,fixed", [("shorter", 0, False), ("shorter", 32, True),
                                               ("longer", 0, True), ("stretch", 0, True)])
def test_bank_preallocated_only_for_a_fixed_input_shape(resize, crop, fixed, tmp_path,
                                                        monkeypatch):
    """An elongated first photo must not size the projected bank for every photo."""
    from patchcore_fast import fitting

    seen = []

    class Recording(fitting.StreamingCoreset):
        def select(self, *args, **kwargs):
            seen.append((self.expected_rows, self.n))
            return super().select(*args, **kwargs)

    monkeypatch.setattr(fitting, "StreamingCoreset", Recording)
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(192, 64), (64, 64), (64, 64)]):  # 3:1 first, then squares
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    assert Preprocess(64, crop, resize=resize).fixed_input == fixed
    m = PatchCore(PatchCoreConfig(backbone="resnet18", pretrained=False, image_size=64,
                                  crop=crop, resize=resize, batch_size=1, device="cpu",
                                  coreset_ratio=0.5, pretrain_embed_dim=64,
                                  target_embed_dim=64))
    m.fit(folder)
    (expected, n), = seen
    if fixed:
        assert expected == n  # every image has the same grid
    else:
        assert expected is None  # the 3:1 photo's grid would have over-allocated 3x
