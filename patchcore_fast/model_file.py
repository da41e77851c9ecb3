"""The model file: one safetensors file, its format, writing it and checking it on load.

Tensors: ``bank`` [M, D] float32, ``neighbourhoods`` [M, b] int64 (the b nearest bank
rows of each row, for the reweighting, when it is on: the name this format gives the
model's ``neighbors``), ``projection`` [D, C] float32 (the embedding matrix). Metadata:
``format``, ``format_version``, ``config`` (JSON of :class:`~patchcore_fast.config.
PatchCoreConfig`), ``backbone`` (JSON of :class:`~patchcore_fast.backbone.BackboneInfo`),
``grid``, ``fit_stats``, ``calibration`` (JSON of :class:`~patchcore_fast.calibration.
Calibration`; absent in files fitted before it existed, which load without one) and the
writing version. Reading never unpickles anything, and
every field is checked before any of it is used (:func:`read`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from ._version import __version__
from .backbone import BackboneInfo
from .calibration import Calibration
from .config import PatchCoreConfig, check_types
from .errors import PatchCoreError, first_line
from .files import atomic_path, file_problem, file_sha256

FORMAT = "patchcore-fast"
FORMAT_VERSION = 1
#: The file's name of the neighbors tensor (format version 1).
NEIGHBORS_TENSOR = "neighbourhoods"


@dataclass
class ModelFile:
    """What a model file holds.

    Attributes:
        config: the settings.
        backbone: the backbone the model was fitted with.
        bank (Tensor[M, D] float32): the memory bank.
        projection (Tensor[D, C] float32): the embedding matrix.
        neighbors (Tensor[M, b] int64 | None): each bank row's b nearest rows (None: the
            reweighting is off).
        grid: the feature grid (h, w), or None.
        fit_stats: the fit's counts and times.
        calibration: thresholds and colour scale from the good images, or None (files
            written before calibration existed).
    """

    config: PatchCoreConfig
    backbone: BackboneInfo
    bank: Tensor
    projection: Tensor
    neighbors: Tensor | None
    grid: tuple[int, int] | None
    fit_stats: dict
    calibration: Calibration | None = None


def write(path: str | os.PathLike, model: ModelFile) -> None:
    """Write ``model`` as one safetensors file (atomically)."""
    tensors = {"bank": model.bank.detach().float().cpu().contiguous(),
               "projection": model.projection.detach().cpu().contiguous()}
    if model.neighbors is not None:
        tensors[NEIGHBORS_TENSOR] = model.neighbors.cpu().contiguous()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "config": model.config.to_json(),
            "backbone": json.dumps(dataclasses.asdict(model.backbone)),
            "grid": json.dumps(list(model.grid) if model.grid else None),
            "fit_stats": json.dumps(model.fit_stats), "writer": f"patchcore-fast {__version__}"}
    if model.calibration is not None:
        meta["calibration"] = json.dumps(model.calibration.to_dict(), allow_nan=False)
    with atomic_path(path) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
        except Exception as exc:  # SafetensorError wraps the OS error (disk full, ...)
            raise OSError(_os_error_text(exc)) from None


def read(path: str | os.PathLike, weights: str | None = None) -> ModelFile:
    """Read and check a model file written by :func:`write`.

    Args:
        path: the ``.safetensors`` model file.
        weights: the local backbone weights file, when the model was fitted with one and
            it moved (checked against the SHA-256 stored at fit time); it replaces the
            setting.

    Raises:
        PatchCoreError: one line naming the file and the first problem.
    """
    path = Path(path)
    why = file_problem(path)  # a pipe is not opened: reading it would wait for a writer
    if why == "is a folder":
        raise PatchCoreError(f"model file {path} is a folder; give the .safetensors file "
                             f"that fit wrote")
    if why:
        raise PatchCoreError(f"model file {path} {why}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PatchCoreError(f"{path} is not a patchcore-fast model file")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except PatchCoreError:
        raise
    except Exception as exc:
        raise PatchCoreError(f"{path} is not a patchcore-fast model file, or it is "
                             f"truncated ({first_line(exc)})"
                             ) from None
    config, info, grid, fit_stats, calibration = _validate_loaded(path, meta, tensors)
    if weights is not None:
        config.weights = str(weights)
    if info.weights.startswith("file:"):
        if not config.weights or not Path(config.weights).is_file():
            raise PatchCoreError(f"{path} was fitted with the backbone weights file "
                                 f"{config.weights}, which is not there; pass --weights FILE")
        if f"file:{file_sha256(config.weights)}" != info.weights:
            raise PatchCoreError(f"backbone weights {config.weights} differ from the ones "
                                 f"{path} was fitted with (SHA-256 mismatch)")
    return ModelFile(config, info, tensors["bank"], tensors["projection"],
                     tensors.get(NEIGHBORS_TENSOR), tuple(grid) if grid else None, fit_stats,
                     calibration)


def _os_error_text(exc: BaseException) -> str:
    """The OS's words inside a safetensors error, e.g. ``No space left on device``."""
    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text)
    if found:
        return found.group(1)
    return first_line(exc)[:200]


# ----- checking a loaded model file --------------------------------------------------------

def _tensor_problem(tensors: dict[str, Tensor], config: PatchCoreConfig,
                    info: BackboneInfo) -> str | None:
    """What is wrong with the tensors of a model file, or None.

    Expected: ``bank`` float32 [M, D] (M >= 1, finite), ``projection`` float32 [D, C] with
    C = sum(info.channels) and D <= target_embed_dim (== when not compact; finite), and
    ``neighbourhoods`` int64 [M, min(b, M)] with values in [0, M) exactly when b > 0.
    """
    unknown = sorted(set(tensors) - {"bank", "projection", NEIGHBORS_TENSOR})
    if unknown:
        return f"unknown tensor {unknown[0]!r}"
    for name in ("bank", "projection"):
        if name not in tensors:
            return f"no {name} tensor"
        t = tensors[name]
        if t.dtype != torch.float32:
            return f"{name} is {str(t.dtype).removeprefix('torch.')}, should be float32"
        if t.dim() != 2:
            return f"{name} has shape {tuple(t.shape)}, should be 2-D"
    bank, projection = tensors["bank"], tensors["projection"]
    m, d = bank.shape
    if m == 0 or d == 0:
        return f"the bank is empty (shape {tuple(bank.shape)})"
    c = sum(info.channels)
    if projection.shape[1] != c:
        return (f"projection has shape {tuple(projection.shape)}, should have {c} columns "
                f"(the channels of {info.name} layers {', '.join(info.layers)})")
    if projection.shape[0] != d:
        return f"bank {tuple(bank.shape)} and projection {tuple(projection.shape)} disagree"
    if d > config.target_embed_dim or (not config.compact and d != config.target_embed_dim):
        return (f"embedding width {d} does not fit the setting target_embed_dim "
                f"{config.target_embed_dim}")
    for name in ("bank", "projection"):
        bad = int((~torch.isfinite(tensors[name])).sum())
        if bad:
            return f"{name} holds {bad:,} NaN or infinite values"
    hood = tensors.get(NEIGHBORS_TENSOR)
    b = min(config.num_neighbors, m)
    if hood is None:
        return "no neighbourhoods tensor, but num_neighbors is {}".format(b) if b else None
    if not b:
        return "a neighbourhoods tensor, but num_neighbors is 0"
    if hood.dtype != torch.int64:
        return f"neighbourhoods is {str(hood.dtype).removeprefix('torch.')}, should be int64"
    if tuple(hood.shape) != (m, b):
        return f"neighbourhoods has shape {tuple(hood.shape)}, should be ({m}, {b})"
    if int(hood.min()) < 0 or int(hood.max()) >= m:
        return (f"neighbourhoods hold row numbers {int(hood.min())}..{int(hood.max())}, "
                f"outside the bank's 0..{m - 1}")
    return None


def _validate_loaded(path: Path, meta: dict[str, str], tensors: dict[str, Tensor]
                     ) -> tuple[PatchCoreConfig, BackboneInfo, list[int] | None, dict]:
    """Parse and check everything inside a model file before any of it is used.

    A file that loads but holds the wrong thing (a NaN bank, an int32 bank, a config with a
    string where a number goes, an image size that would allocate tens of GB) would fail
    later with a traceback, or worse, score silently wrong: every field is checked here.

    Args:
        path: the model file (for messages).
        meta: its safetensors metadata.
        tensors: its tensors.

    Returns:
        (config, backbone info, grid or None, fit_stats, calibration or None).

    Raises:
        PatchCoreError: one line naming the file and the first problem.
    """
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise PatchCoreError(f"{path} has model format version {version}; this version of "
                             f"patchcore-fast ({__version__}) reads version {FORMAT_VERSION}")

    def damaged(why: str) -> PatchCoreError:
        return PatchCoreError(f"{path} is a damaged patchcore-fast model file ({why})")

    entry = "config"  # the metadata entry being parsed, for the message
    try:
        if "config" not in meta or "backbone" not in meta:
            raise ValueError("no config or backbone entry")
        data = json.loads(meta["config"])
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        check_types(data)
        config = PatchCoreConfig.from_json(meta["config"])
        config.validate()
        entry = "backbone"
        raw = json.loads(meta["backbone"])
        names = [f.name for f in dataclasses.fields(BackboneInfo)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(names):
            raise ValueError(f"should be an object with {', '.join(names)}")
        if not (isinstance(raw["name"], str) and isinstance(raw["weights"], str)
                and all(isinstance(raw[k], list) and raw[k] for k in names[1:4])
                and all(isinstance(v, str) for v in raw["layers"])
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for k in ("channels", "strides") for v in raw[k])
                and len(raw["layers"]) == len(raw["channels"]) == len(raw["strides"])):
            raise ValueError("wrong types or lengths")
        info = BackboneInfo(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in raw.items()})
        entry = "grid"
        grid = json.loads(meta.get("grid", "null"))
        if grid is not None and not (
                isinstance(grid, list) and len(grid) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for v in grid)):
            raise ValueError(f"should be two positive integers, got {meta['grid'][:40]}")
        entry = "fit_stats"
        fit_stats = json.loads(meta.get("fit_stats", "{}"))
        if not isinstance(fit_stats, dict):
            raise ValueError("not a JSON object")
        entry = "calibration"
        calibration = (Calibration.from_dict(json.loads(meta["calibration"]))
                       if "calibration" in meta else None)
    except PatchCoreError as exc:  # a setting out of range, or unknown to this version
        raise PatchCoreError(f"{path}: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        why = first_line(exc)
        raise damaged(f"{entry}: {why[:200]}") from None
    if info.name != config.backbone:
        raise damaged(f"backbone {info.name!r} differs from the setting {config.backbone!r}")
    problem = _tensor_problem(tensors, config, info)
    if problem:
        raise damaged(problem)
    return config, info, grid, fit_stats, calibration

