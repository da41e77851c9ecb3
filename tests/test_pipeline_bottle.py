"""Acceptance: fit and evaluate MVTec AD bottle through the CLI (efficientnet_lite0, 10 %)."""

import json
import time

import pytest

from patchcore_fast import ops
from patchcore_fast.cli import main


@pytest.mark.slow
def test_bottle_efficientnet_lite0_10pct(mvtec_root, tmp_path):
    model = tmp_path / "bottle.safetensors"
    t0 = time.perf_counter()
    assert main(["fit", str(mvtec_root), "--category", "bottle", "-o", str(model),
                 "--backbone", "efficientnet_lite0", "--coreset-ratio", "0.1",
                 "--device", "cpu", "--quiet"]) == 0
    t1 = time.perf_counter()
    assert main(["evaluate", str(model), str(mvtec_root), "--category", "bottle",
                 "-o", str(tmp_path / "eval"), "--device", "cpu", "--quiet"]) == 0
    t2 = time.perf_counter()
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print(f"bottle: image AUROC {m['image_auroc']:.4f}, pixel AUROC {m['pixel_auroc']:.4f}, "
          f"PRO {m['pro']:.4f}; fit {t1 - t0:.0f} s, evaluate {t2 - t1:.0f} s, "
          f"compiled kernels: {ops.compiled()}")
    assert m["counts"] == {"images": 83, "good": 20, "defective": 63}
    assert m["image_auroc"] >= 0.99
    assert m["pixel_auroc"] >= 0.975
    assert m["pro"] >= 0.90
    # The time (target: under 5 minutes on 2 cores with the compiled kernels) is printed
    # and recorded in bench/RESULTS.md, not asserted: timings are no test of correctness.
