"""Issue #15: the paper's geometry reproduces bottle's figures of before the geometry options.

The reference figures and image scores were produced by the code before issue #15 (commit
1c521f0, the same command without --resize / --maps-at) on this data: fit and evaluate
below, efficientnet_lite0, 10 %, CPU.
"""

import csv
import json

import pytest

from patchcore_fast.cli import main

# metrics.json of `evaluate` at commit 1c521f0 (before issue #15).
BEFORE = {"image_auroc": 1.0, "pixel_auroc": 0.9878986142426291, "pro": 0.9439293600360625,
          "f1_max": 1.0, "f1_threshold": 86.19195556640625}


@pytest.mark.slow
def test_bottle_paper_geometry_as_before(mvtec_root, tmp_path):
    model = tmp_path / "bottle.safetensors"
    assert main(["fit", str(mvtec_root), "--category", "bottle", "-o", str(model),
                 "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.1",
                 "--resize", "shorter", "--image-size", "256", "--crop", "224",
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["evaluate", str(model), str(mvtec_root), "--category", "bottle",
                 "-o", str(tmp_path / "eval"), "--device", "cpu", "--quiet",
                 "--no-overlays", "--maps-at", "crop"]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print({k: m[k] for k in BEFORE})
    assert m["maps_at"] == "crop"
    for key, value in BEFORE.items():
        assert m[key] == value, key  # the same arithmetic: bit for bit
    scores = [float(r["score"]) for r in csv.DictReader((tmp_path / "eval" / "scores.csv")
                                                         .open())]
    assert len(scores) == 83 and max(scores) > BEFORE["f1_threshold"] - 1e-3
