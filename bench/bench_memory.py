"""Peak resident memory of ``patchcore-fast fit`` (and ``evaluate``) on generated images.

Generates N seeded 224 x 224 PNGs in a temporary folder, runs the CLI in a child process
(``--backbone wide_resnet50_2 --pretrained false --coreset-ratio 0.01 --image-size 224
--crop 224`` by default) and reports the child's peak RSS (``VmHWM``, taken in the child as
it exits: this script's own memory is not counted), next to what the in-memory bank alone
would take (N x 784 x D x 4 bytes). ``--evaluate M`` then evaluates the model on M
generated labelled images (half with a defect mask) and reports that run's peak too.

    python bench/bench_memory.py --images 1000             # the acceptance run (< 2 GB)
    python bench/bench_memory.py --images 200 --in-memory  # the old path, to compare
    python bench/bench_memory.py --images 8 --backbone resnet18 --coreset-ratio 0.1 --evaluate 1000

Not a pytest-benchmark file: one run, one number; tests/test_memory.py is the small
version that CI runs.

Measured (2 shared x86_64 cores, CPU, torch 2.14, batch 8, streaming path):
1,000 images -> 784,000 patches x 1,024, bank 7,840 rows: peak RSS 1,601 MiB, where the
in-memory bank alone is 3,062 MiB (616 s). 56 images: streaming 1,243 MiB, in-memory
1,495 MiB; 8 images: 1,126 and 1,144 MiB (the backbone and torch are about 1.1 GiB).
evaluate (resnet18): 100 test images 1,103 MiB, 1,000 images 1,133 MiB (whole-array
metrics before: 1,239 and 4,698 MiB). See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(folder: Path, n: int, size: int = 224, seed: int = 0) -> None:
    """N seeded noise-and-gradient RGB PNGs of size x size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        noise = rng.normal(0, 20, (size, size, 3)).astype(np.float32)
        img = np.clip(ramp[None, :, None] * 0.5 + 64 + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def write_labelled_set(root: Path, n_good: int, n_defective: int, size: int = 224
                       ) -> list[str]:
    """A test set in the folder layout: good/, defective/ and masks/ (a square defect each).

    Returns:
        the ``evaluate`` options that name it.
    """
    from PIL import Image

    write_images(root / "good", n_good, size, seed=1)
    write_images(root / "defective", n_defective, size, seed=2)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n_defective):
        mask = np.zeros((size, size), np.uint8)
        mask[40 + i % 50:90 + i % 50, 60:100] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")
    return ["--good", str(root / "good"), "--defective", str(root / "defective"),
            "--masks", str(root / "masks")]


def cli_peak(argv: list[str]) -> dict:
    """Run ``patchcore-fast ARGV`` in a fresh child; its peaks, time and stderr.

    The child reports its own peak (``VmHWM`` of /proc/self/status, the high-water mark of
    its address space) as it exits, so the figure is that of this one run. Not
    ``getrusage().ru_maxrss``: Linux carries the parent's peak into a child started by
    vfork + exec (as subprocess does), so a big caller would mask the child's own figure.
    With CUDA it also reports torch's peak of allocated GPU memory.

    Returns:
        {"rss": bytes, "gpu": bytes or None, "seconds": float, "stderr": str}.
    """
    code = ("import sys\n"
            "from patchcore_fast.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak_rss_kib', hwm.split()[1])\n"
            "import torch\n"
            "if torch.cuda.is_initialized():\n"
            "    print('peak_gpu_bytes', torch.cuda.max_memory_allocated())\n"
            "sys.exit(rc)\n")
    t0 = time.perf_counter()
    # The child imports the same patchcore_fast as this process, and runs outside the
    # repository (`python -c` puts the working directory first on the path, where a source
    # tree without its compiled library would shadow the package).
    import patchcore_fast

    env = dict(os.environ)
    env["PYTHONPATH"] = (os.path.dirname(os.path.dirname(os.path.abspath(
        patchcore_fast.__file__))) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    kib = int(proc.stdout.split("peak_rss_kib")[-1].split()[0])  # VmHWM is in kB
    gpu = (int(proc.stdout.split("peak_gpu_bytes")[-1].split()[0])
           if "peak_gpu_bytes" in proc.stdout else None)
    return {"rss": kib * 1024, "gpu": gpu, "seconds": seconds, "stderr": proc.stderr}


def fit_peak_rss(folder: Path, model: Path, args: list[str]) -> tuple[int, float, str]:
    """Run ``patchcore-fast fit FOLDER -o MODEL ARGS`` (see :func:`cli_peak`).

    Returns:
        (peak RSS in bytes, seconds, stderr).
    """
    r = cli_peak(["fit", str(folder), "-o", str(model), *args])
    return r["rss"], r["seconds"], r["stderr"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--coreset-ratio", default="0.01")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--in-memory", action="store_true",
                   help="fit with the in-memory path (fit --in-memory), for comparison")
    p.add_argument("--evaluate", type=int, default=0, metavar="N",
                   help="then evaluate on N generated labelled images (half with a defect "
                        "mask) and report that run's peaks too")
    a = p.parse_args()
    mb = lambda b: None if b is None else round(b / 2**20)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="patchcore-bench-mem-") as tmp:
        folder = Path(tmp) / "good"
        write_images(folder, a.images, a.size)
        model = Path(tmp) / "m.safetensors"
        run = ["--batch-size", a.batch_size, "--device", a.device, "--quiet"]
        fit = cli_peak(["fit", str(folder), "-o", str(model), "--backbone", a.backbone,
                        "--pretrained", "false", "--coreset-ratio", a.coreset_ratio,
                        "--image-size", str(a.size), "--crop", str(a.size), *run,
                        *(["--in-memory"] if a.in_memory else [])])
        from safetensors import safe_open

        with safe_open(str(model), "pt") as fh:
            stats = json.loads(fh.metadata()["fit_stats"])
        ev = None
        if a.evaluate:
            layout = write_labelled_set(Path(tmp) / "test", a.evaluate // 2,
                                        a.evaluate - a.evaluate // 2, a.size)
            ev = cli_peak(["evaluate", str(model), *layout, "-o", str(Path(tmp) / "eval"),
                           *run])
    import torch

    naive = stats["patches"] * stats["embed_dim"] * 4
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "device": (torch.cuda.get_device_name() if a.device == "cuda" else "cpu"),
              "torch": torch.__version__, "images": a.images, "backbone": a.backbone,
              "path": "in-memory" if a.in_memory else "streaming",
              "patches": stats["patches"], "embed_dim": stats["embed_dim"],
              "bank_rows": stats["bank_rows"], "peak_rss_mb": mb(fit["rss"]),
              "peak_gpu_mb": mb(fit["gpu"]), "in_memory_bank_mb": mb(naive),
              "fit_seconds": round(fit["seconds"], 1)}
    if ev is not None:
        report.update(evaluate_images=a.evaluate, evaluate_peak_rss_mb=mb(ev["rss"]),
                      evaluate_peak_gpu_mb=mb(ev["gpu"]),
                      evaluate_maps_mb=mb(a.evaluate * a.size * a.size * 4),
                      evaluate_seconds=round(ev["seconds"], 1))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
