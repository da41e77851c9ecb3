"""Turn pytest-benchmark JSON files into the markdown tables of bench/RESULTS.md.

    python bench/report.py /tmp/bench_coreset.json /tmp/bench_knn.json >> bench/RESULTS.md
    python bench/report.py run.json:bottle-10pct   # only the groups whose name contains it

Each group becomes a table: every entry's median, and its ratio to the kernel's median in
the same group (so ratios always compare figures measured side by side in one run). The
machine and versions recorded by bench/conftest.py head each file's tables.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _label(name: str) -> str:
    base = name.split("[")[0].removeprefix("test_")
    params = name.split("[")[1].rstrip("]") if "[" in name else ""
    return f"{base} [{params}]" if params else base


def report(arg: str) -> str:
    path, _, only = arg.partition(":")
    data = json.load(open(path))
    mi = data.get("machine_info", {}).get("patchcore_fast", {})
    build = mi.get("build", {})
    lines = [f"Run of {data.get('datetime', '?')[:19]} ({path.rsplit('/', 1)[-1]}): "
             f"{mi.get('cpu', '?')}, {mi.get('cores', '?')} cores"
             + (f", GPU {mi['gpu']} (CUDA {mi.get('cuda')})" if mi.get("gpu") else ", no GPU")
             + f"; torch {mi.get('torch', '?')}, patchcore-fast {mi.get('patchcore_fast', '?')} "
             f"(kernels cpu={build.get('cpu')}, cuda={build.get('cuda')}), faiss-cpu "
             f"{mi.get('faiss-cpu')}, anomalib {mi.get('anomalib')}.", ""]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        if only in b["group"]:
            groups[b["group"]].append(b)
    for group in sorted(groups):
        entries = groups[group]
        # The reference of a group: our kernel, else our package (bench_export's groups).
        kernel = next((b for b in entries if "kernel" in b["name"]), None) or next(
            (b for b in entries if "package" in b["name"]), None)
        lines += [f"**{group}**", "", "| entry | median | rounds | vs kernel |", "|---|---|---|---|"]
        for b in sorted(entries, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            ratio = (f"{med / kernel['stats']['median']:.2f}x" if kernel else "")
            extra = b.get("extra_info", {})
            note = ", ".join(f"{k}={v}" for k, v in extra.items()
                             if k in ("max_rel_diff_vs_faiss", "images_per_s", "second_pass",
                                      "exact_scans", "max_rel_err_vs_f64", "load",
                                      "tensors_images_per_s",
                                      "files_overlays_images_per_s", "ratio_median"))
            lines.append(f"| {_label(b['name'])}{' (' + note + ')' if note else ''} | "
                         f"{_fmt(med)} | {b['stats']['rounds']} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(report(p) for p in sys.argv[1:]))
