"""Export a fitted model as one ONNX graph that runs without this package (issue #23).

The graph takes a batch of preprocessed images and returns what :meth:`PatchCore.predict`
computes from them, with standard ONNX operators only (no custom operator), so ONNX
Runtime (C, C++, C#, Java, Python, JavaScript), OpenVINO or TensorRT can run it:

* input ``images``: float32 ``[N, 3, H, W]``, the model's input (``H x W`` is the crop,
  or ``image_size`` squared; metadata ``input_height`` / ``input_width``), normalised with
  the ImageNet mean and standard deviation; ``N`` is a dynamic axis;
* output ``score``: float32 ``[N]``, the image score (paper Eq. 7, or s* without the
  reweighting), as ``score.csv`` of ``patchcore-fast score``;
* output ``map``: float32 ``[N, H, W]``, the anomaly map of the model's input (before the
  geometry is undone: :mod:`patchcore_fast.onnx_example` shows the way back to the photo);
* when the model is calibrated (README, "A verdict from good images"), also output
  ``normalised``: float32 ``[N]``, :func:`~patchcore_fast.calibration.normalise` of the
  score (0.5 at the threshold), and ``label``: bool ``[N]``, true (defective) when the
  score is above the model's image threshold; the thresholds are in the metadata
  (``image_threshold``, ``pixel_threshold``, ``scale``).

Inside, the steps of the package in order, from its own modules: the backbone as the
package runs it (torchvision ResNets with their batch norms folded into the convolutions;
timm networks in eval mode, whose batch norms the exporter folds), the local aggregation
and the alignment of :func:`~patchcore_fast.features.aggregate`, the embedding matrix (one
``Gemm``), the nearest bank row of each patch, the reweighting of
:func:`~patchcore_fast.scoring.image_scores` (a ``Gather`` of the precomputed
neighbors, a constant) and :func:`~patchcore_fast.scoring.anomaly_maps` (bilinear
``Resize``, reflect ``Pad`` and two 1-D ``Conv`` of the Gaussian).

The nearest-neighbour search is the faiss expansion as plain linear algebra (DESIGN.md,
"Serving and export"): with the bank centred on its mean (distances do not change under a
shift, and centring removes most of the cancellation of the expansion), the ranking key of
bank row b for query q is ``||b||^2 - 2 q.b`` (``||q||^2`` is the same for every row and
drops out): one ``Gemm`` against the bank constant plus a constant row vector. ``TopK``
keeps the ``candidates`` best rows of each query, and their distances are computed again
as direct differences ``||q - b||`` (a ``Gather`` of the rows): the winner's distance is the
float32 distance the package reports, not the expansion's, whose rounding grows with the
norms. Memory at run time: the ``[N x patches, M]`` key matrix, 4 bytes each (bottle,
WideResNet-50, 10 % bank: 784 x 16,386 x 4 = 51 MB per image), so the caller bounds it with
the batch size.

Where the weights go: ONNX is a protobuf message, and protobuf refuses to write or read a
message of 2 GiB or more. The constants are the backbone's weights plus the bank (``M x D x
4`` bytes: 4 KiB a row at the default width 1,024), its squared norms and the
neighbors (``M x b x 8`` bytes). Up to :data:`EXTERNAL_DATA_ABOVE` bytes of constants
they live inside ``FILE.onnx``; above it, in ONNX external data, one file ``FILE.onnx.data``
next to it (the graph names it by its file name, so the two move together). With
WideResNet-50 (its layers up to ``layer3``, batch norms folded: 95 MiB) the limit is reached
at about 470,000 bank rows of width 1,024 (4,172 bytes a row with its squared norm and 9
neighbours); the whole bottle training set, 163,856 rows, stays inside.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._version import __version__
from .calibration import label, normalise
from .errors import PatchCoreError
from .features import aggregate
from .files import check_outputs
from .scoring import anomaly_maps, image_scores

#: Protobuf's limit on one message: 2 GiB - 1 byte (``INT_MAX``).
PROTOBUF_LIMIT = 2 ** 31 - 1
#: Constants above this many bytes go to ONNX external data: the limit less 64 MiB for the
#: graph's structure (nodes, names, metadata: a few hundred KB for WideResNet-50).
EXTERNAL_DATA_ABOVE = PROTOBUF_LIMIT - 64 * 2 ** 20
#: ONNX operator set of the graph (ONNX Runtime >= 1.14, OpenVINO >= 2023.0).
OPSET = 18
#: Input and output names (the last two only for a calibrated model).
INPUT = "images"
OUTPUTS = ("score", "map")
VERDICT_OUTPUTS = ("normalised", "label")


def output_names(model) -> tuple[str, ...]:
    """The graph's outputs for ``model``: the verdict's too when it is calibrated."""
    return OUTPUTS + (VERDICT_OUTPUTS if model.calibration is not None else ())


class ExportGraph(nn.Module):
    """The package's scoring path for one fixed input size, in ONNX-exportable operators.

    Args:
        model: a fitted :class:`~patchcore_fast.model.PatchCore` on the CPU.
        input_size: (H, W) of the model's input.
        candidates: bank rows kept per patch by ``TopK`` on the expansion's key and
            refined with direct differences (1: ``ArgMin`` alone).
    """

    def __init__(self, model, input_size: tuple[int, int], candidates: int = 4):
        super().__init__()
        embedder = model.embedder
        self.backbone = embedder.backbone
        self.patch_size = embedder.patch_size
        self.input_size = tuple(int(v) for v in input_size)
        self.blur_sigma = float(model.config.blur_sigma)
        bank = model.bank.detach().float().cpu()
        # The mean in float64: the centred bank is then as exact as float32 allows.
        centre = bank.double().mean(dim=0)
        centred = (bank.double() - centre).float().contiguous()
        self.candidates = max(1, min(int(candidates), bank.shape[0]))
        self.register_buffer("projection", embedder.projection.detach().float().cpu())
        # Gemm's bias: the embedding is x P^T - centre, in the centred coordinates.
        self.register_buffer("shift", (-centre).float())
        self.register_buffer("bank", centred)
        self.register_buffer("bank_sq", centred.double().pow(2).sum(dim=1).float())
        hood = model.neighbors
        self.register_buffer("neighbors", None if hood is None else hood.detach().cpu().long())
        self.calibration = model.calibration  # Python floats: constants of the graph

    def nearest(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Each query's nearest bank row (step 8), as plain linear algebra.

        Args:
            q (Tensor[Q, D]): centred embeddings.

        Returns:
            (Tensor[Q], Tensor[Q] int64): direct-difference distances and bank rows.
        """
        # ||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b): rank by the bracket, one Gemm
        # (alpha -2, the bank transposed inside the op, so stored once) and a row vector.
        key = torch.addmm(self.bank_sq, q, self.bank.t(), beta=1.0, alpha=-2.0)
        if self.candidates == 1:
            idx = key.argmin(dim=1, keepdim=True)                        # [Q, 1]
        else:
            idx = key.topk(self.candidates, dim=1, largest=False).indices  # [Q, k]
        rows = self.bank[idx]                                            # [Q, k, D]
        d = torch.linalg.vector_norm(rows - q[:, None, :], dim=-1)       # [Q, k]
        dist, j = d.min(dim=1)
        return dist, idx.gather(1, j[:, None])[:, 0]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Scores and maps of a batch, and the verdict when the model is calibrated.

        Args:
            images (Tensor[N, 3, H, W]): normalised images of the model's input size.

        Returns:
            (Tensor[N], Tensor[N, H, W]): image scores and anomaly maps; with a calibration
            also (Tensor[N], Tensor[N] bool): normalised scores and labels (True:
            defective), the package's own elementwise functions on the float32 score.
        """
        x = aggregate(self.backbone(images), self.patch_size)            # [N, C, h, w]
        n, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(-1, c)
        q = F.linear(x, self.projection, self.shift)                     # [N h w, D]
        dist, idx = self.nearest(q)
        patches = q.reshape(n, h * w, q.shape[1])
        dist, idx = dist.reshape(n, h * w), idx.reshape(n, h * w)
        scores = image_scores(patches, dist, idx, self.bank, self.neighbors)
        maps = anomaly_maps(dist, (h, w), self.input_size, self.blur_sigma)
        if self.calibration is None:
            return scores, maps
        return scores, maps, normalise(scores, self.calibration), label(scores, self.calibration)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        data_path: the external-data file, or None when everything is inside ``path``.
        constant_bytes: bytes of the graph's constants (weights, bank, neighbors).
        file_bytes: bytes written (both files).
        seconds: wall time of the export.
        input_size: (H, W) of the input.
        outputs: output names.
    """

    path: Path
    data_path: Path | None
    constant_bytes: int
    file_bytes: int
    seconds: float
    input_size: tuple[int, int]
    outputs: tuple[str, ...]


def input_size(model) -> tuple[int, int]:
    """(H, W) of the model's input; refuses a model whose input follows each photo's shape.

    Raises:
        PatchCoreError: ``--resize shorter`` without a crop (the input keeps each photo's
            aspect, so there is no one input size to export).
    """
    c = model.config
    if not model.preprocess.fixed_input:
        raise PatchCoreError("this model's input follows each photo's aspect (--resize "
                             "shorter without --crop), so it has no one input size to "
                             "export; fit it with --resize longer (the default) or a --crop")
    side = c.crop or c.image_size
    return side, side


def metadata(model, size: tuple[int, int]) -> dict[str, str]:
    """What a program outside this package needs to prepare an image and read the outputs,
    as ONNX metadata (``session.get_modelmeta().custom_metadata_map`` in ONNX Runtime)."""
    c = model.config
    return {"producer": f"patchcore-fast {__version__}",
            "input_height": str(size[0]), "input_width": str(size[1]),
            "resize": c.resize, "image_size": str(c.image_size), "crop": str(c.crop),
            "mean": json.dumps(list(c.mean)), "std": json.dumps(list(c.std)),
            "pad_fill": json.dumps([int(round(255 * m)) for m in c.mean]),
            "backbone": c.backbone, "bank_rows": str(int(model.bank.shape[0])),
            "embed_dim": str(int(model.bank.shape[1])),
            "num_neighbors": str(c.num_neighbors), "blur_sigma": str(c.blur_sigma),
            "outputs": ",".join(output_names(model)),
            **({} if model.calibration is None else {
                k: repr(float(getattr(model.calibration, k)))
                for k in ("image_threshold", "pixel_threshold", "scale")})}


def check_export_target(out: str | os.PathLike, model_path: str | os.PathLike | None,
                        option: str = "-o") -> tuple[Path, Path]:
    """Refuse an export target that is the model, a folder or an unwritable place.

    Returns:
        (the ``.onnx`` path, the external-data path next to it).
    """
    out = Path(out)
    if str(out).endswith(("/", os.sep)) or out.is_dir():
        raise PatchCoreError(f"{option} {out}: is a folder; give the .onnx file to write, "
                             f"e.g. {out / 'model.onnx'}")
    data = out.with_name(out.name + ".data")
    check_outputs(f"{option} {out}", out.parent, [out, data],
                  read_files=[model_path] if model_path else [])
    return out, data


def export_onnx(model, path: str | os.PathLike, model_path: str | os.PathLike | None = None,
                candidates: int = 4, external_data_above: int = EXTERNAL_DATA_ABOVE,
                opset: int = OPSET) -> ExportReport:
    """Write a fitted model as one ONNX graph (module docstring), atomically.

    torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9;
    it needs the ``onnxscript`` package) traces the graph; the TorchScript exporter
    (``dynamo=False``) still works in torch 2.14 and needs only ``onnx``, but it is
    deprecated and announced for removal, so it is not used (README, "Export to ONNX").

    Args:
        model: a fitted :class:`~patchcore_fast.model.PatchCore` on the CPU, backbone in
            fp32 (the graph is fp32 whatever the model's ``precision``).
        path: the ``.onnx`` file.
        model_path: the model file it came from, which ``path`` must not overwrite.
        candidates: see :class:`ExportGraph`.
        external_data_above: constants above this many bytes go to ``path + ".data"``
            (ONNX external data); the default keeps every file protobuf can read inside.
        opset: ONNX operator set.

    Returns:
        :class:`ExportReport`.
    """
    import onnx
    import onnx_ir as ir

    out, data = check_export_target(path, model_path)
    model._check_fitted()
    size = input_size(model)
    t0 = time.perf_counter()
    graph = ExportGraph(model, size, candidates).eval()
    batch = torch.export.Dim("N")
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own passes
        program = torch.onnx.export(
            graph, (torch.zeros(2, 3, *size),), input_names=[INPUT],
            output_names=list(output_names(model)), opset_version=opset, dynamo=True,
            dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    onnx_model = program.model
    onnx_model.metadata_props.update(metadata(model, size))
    onnx_model.doc_string = (f"PatchCore anomaly detector exported by patchcore-fast "
                             f"{__version__}: images [N, 3, {size[0]}, {size[1]}] float32 "
                             f"normalised -> score [N], map [N, {size[0]}, {size[1]}]")
    constants = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values()
                    if v.const_value is not None)
    external = constants > external_data_above
    folder = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        staged = folder / out.name
        ir.save(onnx_model, staged, external_data=data.name if external else None)
        onnx.checker.check_model(str(staged))
        # The data file first: the graph that names it appears only once it is in place.
        if external:
            os.replace(folder / data.name, data)
        os.replace(staged, out)
    except OSError as exc:
        raise PatchCoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    written = out.stat().st_size + (data.stat().st_size if external else 0)
    return ExportReport(out, data if external else None, constants, written,
                        time.perf_counter() - t0, size, output_names(model))


__all__ = ["ExportGraph", "ExportReport", "export_onnx", "check_export_target", "input_size",
           "metadata", "EXTERNAL_DATA_ABOVE", "PROTOBUF_LIMIT", "OPSET", "INPUT", "OUTPUTS"]
