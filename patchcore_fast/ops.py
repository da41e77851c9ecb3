"""The only door to the compiled kernels.

Typed wrappers, fake-tensor registrations so the ops work under ``torch.compile``, and the
fallback to :mod:`patchcore_fast.reference` (with one warning) when the compiled library
is missing. Arguments are validated once: by the kernels (a ``ValueError`` naming the
argument, ``TORCH_CHECK_VALUE``), or, in front of the reference fallback only, by the same
checks written here. The kernels fold the bank's NaN / Inf check into the pass over the
bank they make anyway, so a scoring call never scans the bank a second time for it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import reference

try:  # the shared library registers torch.ops.patchcore_fast.* as a side effect
    from . import _C  # noqa: F401

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    # Python words a missing submodule as a "circular import" of a partially initialised
    # package; say what actually happened.
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _LOAD_ERROR = (f"no compiled library patchcore_fast/_C*.so in {_here}" if "_C" in str(exc)
                   and not any(f.startswith("_C") for f in _os.listdir(_here)) else str(exc))

_warned = False

_OPS = ("greedy_coreset", "coreset_shard_state", "coreset_shard_step", "knn", "knn_stats",
        "knn_bank", "knn_prepared")


def compiled() -> bool:
    """True when the compiled extension is loaded."""
    return _LOAD_ERROR is None


def build_info() -> dict:
    """Which backends of which ops were compiled, and why not when they were not.

    Returns:
        dict with keys ``compiled`` (bool), ``load_error`` (str or None), ``cpu`` and
        ``cuda`` (lists of op names with a kernel for that device), ``cuda_available``
        (a GPU is usable now) and ``torch`` (the torch version in use).
    """
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info = {"compiled": compiled(), "load_error": _LOAD_ERROR, "cpu": [], "cuda": [],
            "cuda_available": torch.cuda.is_available(), "torch": torch.__version__}
    if compiled():
        for op in _OPS:
            for key in ("cpu", "cuda"):
                if has(f"patchcore_fast::{op}", key.upper()):
                    info[key].append(op)
    return info


def _use_kernel(t: Tensor, op: str) -> bool:
    global _warned
    if compiled():
        if t.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"patchcore_fast::{op}", "CUDA"):
            raise RuntimeError(
                f"patchcore_fast was built without CUDA kernels, so {op} cannot run on "
                f"{t.device}; reinstall with CUDA_HOME set (see README), or use the CPU")
        return True
    if not _warned:
        warnings.warn(
            "patchcore_fast: compiled kernels not found (" + str(_LOAD_ERROR) + "); using "
            "the slow pure-torch reference. Reinstall with `pip install --no-build-isolation .`",
            RuntimeWarning, stacklevel=3)
        _warned = True
    return False


def _float32(t: Tensor, name: str) -> Tensor:
    """``t`` as float32 when it is a floating-point tensor; any other tensor unchanged, for
    the kernel (or the reference's checks) to refuse by name."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} should be a torch.Tensor, got {type(t).__name__}")
    return t.float() if t.is_floating_point() else t


def _check_points(t: Tensor, name: str) -> None:
    # The kernels' argument checks (csrc/common.h), for the reference fallback only.
    if t.dim() != 2:
        raise ValueError(f"{name} should be a 2-D tensor [rows, dim], got {t.dim()}-D "
                         f"with shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} should be a floating-point tensor, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has zero columns (shape {tuple(t.shape)})")
    if t.numel() and not _all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values")


def _all_finite(t: Tensor, chunk_rows: int = 4096) -> bool:
    # A finite sum proves every element finite (NaN and Inf propagate through additions)
    # at no extra memory; only a non-finite sum (a bad value, or a rare overflow of finite
    # ones) has the rows inspected, a bounded chunk at a time. torch.isfinite(t).all() on
    # a whole bank would allocate input-sized temporaries.
    if bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(t[r:r + chunk_rows]).all())
               for r in range(0, t.shape[0], chunk_rows))


def greedy_coreset(features: Tensor, k: int, start: int = 0) -> Tensor:
    """Exact greedy k-center (farthest-point) coreset selection.

    Same selection as :func:`patchcore_fast.reference.greedy_coreset` (squared Euclidean
    distance, ties to the lowest index), up to floating-point near-ties.

    Args:
        features (Tensor[N, D]): points; converted to float32.
        k (int): number of centres, 1 <= k <= N.
        start (int): index of the first centre, 0 <= start < N.

    Returns:
        Tensor[k] int64 on the device of ``features``: selected rows in selection order.
    """
    features, k, start = _float32(features, "features"), int(k), int(start)
    if _use_kernel(features, "greedy_coreset"):
        return torch.ops.patchcore_fast.greedy_coreset.default(features, k, start)
    _check_points(features, "features")
    n = features.shape[0]
    if n == 0:
        raise ValueError("features is empty (0 rows): nothing to select from")
    if not 1 <= k <= n:
        raise ValueError(f"k should be between 1 and the number of rows {n}, got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start should be a row index in [0, {n}), got {start}")
    return reference.greedy_coreset(features, k, start)


def _check_shard(shard: Tensor) -> None:
    if not isinstance(shard, Tensor) or shard.dtype != torch.float32:
        raise ValueError(f"shard should be a float32 tensor, got "
                         f"{getattr(shard, 'dtype', type(shard).__name__)}")
    if shard.dim() != 2 or shard.shape[1] == 0:
        raise ValueError(f"shard should be a 2-D tensor [rows, dim] with dim >= 1, got shape "
                         f"{tuple(shard.shape)}")


def coreset_shard_state(shard: Tensor, k: int, lazy: bool = True,
                        start: Tensor | None = None) -> list[Tensor]:
    """The state of this rank's shard for :func:`coreset_shard_step` (one per run).

    Its layout is the kernel's own (csrc/coreset_shard_step.h): with ``lazy`` on the CPU,
    the lazy evaluation's upper bounds, heap, bound coordinates and centre tables (the
    single-process kernel's method, per rank); otherwise (and always on CUDA) each row's
    distance to its nearest centre, for the plain pass. Callers only pass it to every step
    of the run. Both kinds give the same selection.

    Args:
        shard (Tensor[N_r, D]): float32 rows of this rank (may have 0 rows).
        k (int): the number of centres the run selects, >= 1.
        lazy (bool): the lazy evaluation (CPU); False: one plain pass per step (the
            tests' oracle; the only kind on CUDA, which ignores this).
        start (Tensor[N_r] | None): float32, each row's squared distance to centres chosen
            before this run (>= 0 or +inf; not NaN, unchecked: no value is read), so the
            run continues that selection (:func:`patchcore_fast.coreset.continue_coreset`);
            None: from scratch.

    Returns:
        list[Tensor]: the state, on the shard's device.
    """
    _check_shard(shard)
    k = int(k)
    if k < 1:
        raise ValueError(f"k should be >= 1, got {k}")
    if start is not None and (not isinstance(start, Tensor) or start.dtype != torch.float32
                              or tuple(start.shape) != (shard.shape[0],)
                              or start.device != shard.device):
        raise ValueError(f"start should be a float32 Tensor[{shard.shape[0]}] on "
                         f"{shard.device} (one squared distance per row of the shard), got "
                         f"{getattr(start, 'dtype', type(start).__name__)} with shape "
                         f"{tuple(getattr(start, 'shape', ()))}")
    if _use_kernel(shard, "coreset_shard_state"):
        return torch.ops.patchcore_fast.coreset_shard_state.default(shard, k, bool(lazy), start)
    return reference.coreset_shard_state(shard, k, lazy, start)


def coreset_shard_step(shard: Tensor, candidates: Tensor, offset: int, state: list[Tensor],
                       indices: Tensor, step: int) -> Tensor:
    """One step of the exact distributed coreset on this rank's shard of the rows.

    ``candidates`` holds every rank's record of the previous step (all-gathered): the
    largest packed key names the new centre and carries its row. This sets
    ``indices[step]``, updates ``state`` with the new centre (distances computed with the
    arithmetic of :func:`greedy_coreset`, so the ranks' offers are a single process's
    values bit for bit) and returns this rank's record for the next step: its farthest
    unselected row. See :mod:`patchcore_fast.distributed` for the loop around it.

    Only shapes, dtypes and devices are checked (no value is read, so on a GPU the step
    never waits for the device).

    Args:
        shard (Tensor[N_r, D]): float32 rows of global indices ``offset .. offset + N_r-1``.
        candidates (Tensor[R, D + 2]): int32 records, one per rank: words 0-1 a packed
            (squared distance, global index) key (``reference.pack_keys``; 0 = none), then
            the float32 bits of the row (integer words: the key would be a NaN as floats).
            At step 0 only the owner of the first centre offers it.
        offset (int): global index of the shard's first row.
        state (list[Tensor]): from :func:`coreset_shard_state` for this shard and
            ``k = len(indices)``; updated in place.
        indices (Tensor[k]): int64 selection being built; ``indices[step]`` is written.
        step (int): the step, 0 <= step < k, called in order 0, 1, ...

    Returns:
        Tensor[D + 2] int32: this shard's record (key 0 and a zero row when none is left;
        not used after the last step).
    """
    _check_shard(shard)
    if not isinstance(candidates, Tensor) or candidates.dtype != torch.int32:
        raise ValueError(f"candidates should be a int32 tensor, got "
                         f"{getattr(candidates, 'dtype', type(candidates).__name__)}")
    if candidates.dim() != 2 or candidates.shape[0] == 0 or \
            candidates.shape[1] != shard.shape[1] + 2:
        raise ValueError(f"candidates should be [ranks, D + 2] = [ranks, {shard.shape[1] + 2}]"
                         f", got shape {tuple(candidates.shape)}")
    if not isinstance(state, (list, tuple)) or not all(isinstance(t, Tensor) for t in state):
        raise ValueError("state should be the list of tensors coreset_shard_state returned")
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(f"indices should be a 1-D int64 tensor, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    offset, step = int(offset), int(step)
    if not 0 <= step < indices.shape[0]:
        raise ValueError(f"step should be in [0, {indices.shape[0]}), got {step}")
    if offset < 0 or offset + shard.shape[0] > 2**31 - 1:
        raise ValueError(f"offset should be >= 0 with offset + rows <= 2^31 - 1, got {offset}")
    # (the kernel checks every state tensor's device, dtype and shape)
    devices = {t.device for t in (shard, candidates, indices, *state[:1])}
    if len(devices) != 1:
        raise ValueError(f"shard, candidates, state and indices should be on one device, got "
                         f"{sorted(map(str, devices))}")
    if _use_kernel(shard, "coreset_shard_step"):
        return torch.ops.patchcore_fast.coreset_shard_step.default(
            shard, candidates, offset, list(state), indices, step)
    return reference.coreset_shard_step(shard, candidates, offset, state, indices, step)


def knn_bank(bank: Tensor) -> list[Tensor] | None:
    """The bank's side of the k-NN kernel, for a bank that answers many queries.

    :func:`knn` computes, on every call, what depends on the bank alone: its mean (the
    centre of the expansion) and centred norms; on the CPU a basis of the bank's leading
    axes and the bank projected on it, for the projected pre-pass; on CUDA the centred bank
    split into bf16 parts for the tensor cores and the error bound's scalar (a host
    synchronisation). Made once here and given back (``knn(..., prepared=)``), they cost
    nothing per call; the answer and the statistics are the same (the same values, the
    same rule deciding per call).

    The operands belong to this bank's values: keep them with the bank and make them
    again when the bank changes (the model does: :meth:`PatchCore.score_embeddings`).

    Args:
        bank (Tensor[M, D]): bank rows; converted to float32.

    Returns:
        the operands (a list of tensors on the bank's device, the CUDA kernel's scalars on
        the CPU; see csrc/ops.cpp), or None where there is nothing to keep: a bank on
        another device than the CPU or CUDA, or no compiled library.
    """
    bank = _float32(bank, "bank")
    if bank.device.type not in ("cpu", "cuda") or not compiled():
        return None
    _use_kernel(bank, "knn_bank")  # a build without CUDA kernels says so
    return torch.ops.patchcore_fast.knn_bank.default(bank.contiguous())


def knn(query: Tensor, bank: Tensor, k: int = 1, prepared: list[Tensor] | None = None
        ) -> tuple[Tensor, Tensor]:
    """Exact k nearest bank rows of every query row, in bounded memory.

    What the result promises (CPU and CUDA kernels): the true k nearest neighbours, with
    distances equal to the float32 direct-difference distances ``||q - b||`` (the exact
    values up to float32 rounding, as ``torch.cdist(..., compute_mode=
    "donot_use_mm_for_euclid_dist")`` gives them), ascending, equal distances ordered by the
    lower bank index. The kernels rank candidates with a GEMM on query and bank centred on
    the bank's mean, keep every row within the expansion's error bound of the k-th place,
    and refine those with direct differences; a certificate proves the answer exact (see
    csrc/knn_bound.h). On wide low-rank features the CPU kernel first ranks the bank on 32
    principal coordinates and refines the best rows until a rigorous lower bound certifies
    the answer (csrc/cpu/knn_project.cpp); the result is the same. There is no per-row
    full-bank scan on real features: :func:`knn_stats` counts the rows that needed more
    than the first pass. On CUDA the ranking GEMM runs on tensor cores, each row split into
    two bf16 parts (three bf16 products, fp32 accumulation), with a wider bound that keeps
    the answer exact (:func:`knn_stats` with ``gemm="fp32"`` runs an fp32 GEMM instead).

    Args:
        query (Tensor[Q, D]): query rows; converted to float32. Q may be 0.
        bank (Tensor[M, D]): bank rows, same device; converted to float32.
        k (int): neighbours per query, 1 <= k <= M.
        prepared: :func:`knn_bank` of this bank: the same answer without the bank's
            per-call cost; None computes it in the call.

    Returns:
        (Tensor[Q, k] float32, Tensor[Q, k] int64): Euclidean (not squared) distances in
        ascending order, and the bank row of each.
    """
    query, bank, k = _float32(query, "query"), _float32(bank, "bank"), int(k)
    if prepared is not None and _use_kernel(query, "knn_prepared"):
        _check_prepared(prepared, query)
        return torch.ops.patchcore_fast.knn_prepared.default(query, bank, k, prepared)[:2]
    if _use_kernel(query, "knn"):
        return torch.ops.patchcore_fast.knn.default(query, bank, k)
    _check_knn(query, bank, k)
    return reference.knn(query, bank, k, exact=False)


def knn_stats(query: Tensor, bank: Tensor, k: int = 1, *, gemm: str = "auto",
              project: str = "auto", project_bound_scale: float = 1.0,
              prepared: list[Tensor] | None = None) -> tuple[Tensor, Tensor, dict]:
    """:func:`knn` plus how the kernel got there, with its variant chosen explicitly (a
    debugging, test and benchmark aid; :func:`knn` is ``knn_stats`` with the defaults).

    Args:
        query (Tensor[Q, D]): query rows; converted to float32.
        bank (Tensor[M, D]): bank rows, same device; converted to float32.
        k (int): neighbours per query, 1 <= k <= M.
        gemm (str): the CUDA kernel's ranking GEMM: ``"auto"`` (tensor cores, each row
            split into two bf16 parts, where this torch allows it), ``"fp32"`` or
            ``"bf16x3"``; no effect on the CPU.
        project (str): the CPU kernel's projected pre-pass: ``"auto"`` (taken where its
            rule says it pays), ``"off"`` or ``"force"`` (whenever it is valid, no rule and
            no pilot); no effect on CUDA.
        project_bound_scale (float): multiplies the pre-pass's lower bound: 1 in use; a
            value > 1 makes the bound invalid (tests show that exactness then breaks).
        prepared: :func:`knn_bank` of this bank (with ``gemm`` "auto" and a bound scale
            of 1).

    Returns:
        (Tensor[Q, k] float32, Tensor[Q, k] int64, dict): the result of :func:`knn`, and
        ``rows`` (Q), ``second_pass`` (rows whose error band overflowed the first pass's
        candidate pool and were rescored by a second tiled pass with growable pools),
        ``exact_scans`` (rows that fell back to a direct-difference scan of the whole bank:
        the last resort, expected 0) and ``refined`` (candidates recomputed with direct
        differences, all passes), ``projected`` (rows sent through the CPU kernel's
        projected lower-bound pre-pass, csrc/cpu/knn_project.cpp: 0 when the pre-pass was
        not taken) and ``projected_certified`` (rows it settled; the others went through
        the first pass, and those the first pass cannot settle count in
        ``second_pass``). Without the compiled library: the reference's result and every
        count -1.
    """
    query, bank, k = _float32(query, "query"), _float32(bank, "bank"), int(k)
    if prepared is not None and (gemm != "auto" or project_bound_scale != 1.0):
        raise ValueError("prepared operands are the kernel's with gemm 'auto' and a bound "
                         f"scale of 1; got gemm {gemm!r}, scale {project_bound_scale}")
    if prepared is not None and _use_kernel(query, "knn_prepared"):
        _check_prepared(prepared, query)
        d, i, s = torch.ops.patchcore_fast.knn_prepared.default(query, bank, k, prepared,
                                                                 project)
        s = s.tolist()
    elif _use_kernel(query, "knn_stats"):
        d, i, s = torch.ops.patchcore_fast.knn_stats.default(
            query, bank, k, gemm, project, float(project_bound_scale))
        s = s.tolist()
    else:
        _check_knn(query, bank, k)
        d, i = reference.knn(query, bank, k, exact=False)
        s = [-1] * 6
    keys = ("rows", "second_pass", "exact_scans", "refined", "projected",
            "projected_certified")
    return d, i, dict(zip(keys, s))


def _check_prepared(prepared: list[Tensor], query: Tensor) -> None:
    # Operands made on another device than the query's would reach the other device's
    # kernel (the dispatcher picks CUDA if any tensor is there): say what is wrong instead.
    if prepared and isinstance(prepared[0], Tensor) and prepared[0].device != query.device:
        raise ValueError(f"prepared operands were made for a bank on {prepared[0].device}, "
                         f"the query is on {query.device}: make them with knn_bank(bank) "
                         f"for the bank on the query's device")


def _check_knn(query: Tensor, bank: Tensor, k: int) -> None:
    # The kernels' checks of knn (csrc/common.h), for the reference fallback only.
    _check_points(query, "query")
    _check_points(bank, "bank")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (0 rows): fit a model first")
    if query.shape[1] != bank.shape[1]:
        raise ValueError(f"query and bank should have the same width, got query "
                         f"{tuple(query.shape)} and bank {tuple(bank.shape)}")
    if query.device != bank.device:
        raise ValueError(f"query and bank should be on the same device, got {query.device} "
                         f"and {bank.device}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k should be between 1 and the bank size {bank.shape[0]}, got {k}")


# Fake (meta) implementations: output shapes from input shapes, so the ops trace under
# torch.compile and pass opcheck. Only when the library (and so the schemas) exists.
if compiled():

    @torch.library.register_fake("patchcore_fast::greedy_coreset")
    def _greedy_coreset_fake(features, k, start=0):
        torch._check(features.dim() == 2)
        return features.new_empty((k,), dtype=torch.int64)

    @torch.library.register_fake("patchcore_fast::coreset_shard_state")
    def _coreset_shard_state_fake(shard, k, lazy=True):
        torch._check(shard.dim() == 2)
        n, d = shard.shape
        if shard.device.type == "cuda" or not lazy:  # the layouts of csrc/coreset_shard_step.h
            return [shard.new_empty((n,))]
        bounded = d >= 64
        return [shard.new_empty((n,)), shard.new_empty((n,), dtype=torch.int32),
                shard.new_empty((n + 1,), dtype=torch.int64),
                shard.new_empty((n if bounded else 0, 32)),
                shard.new_empty((d + 1, 32), dtype=torch.float64), shard.new_empty((k, d)),
                shard.new_empty(((k + 7) // 8 * 64 + 24 * k if bounded else 0,))]

    @torch.library.register_fake("patchcore_fast::coreset_shard_step")
    def _coreset_shard_step_fake(shard, candidates, offset, state, indices, step):
        torch._check(shard.dim() == 2 and candidates.dim() == 2)
        torch._check(candidates.shape[1] == shard.shape[1] + 2)
        return candidates.new_empty((shard.shape[1] + 2,))

    @torch.library.register_fake("patchcore_fast::knn")
    def _knn_fake(query, bank, k):
        torch._check(query.dim() == 2 and bank.dim() == 2)
        torch._check(query.shape[1] == bank.shape[1])
        return (query.new_empty((query.shape[0], k)),
                query.new_empty((query.shape[0], k), dtype=torch.int64))

    @torch.library.register_fake("patchcore_fast::knn_stats")
    def _knn_stats_fake(query, bank, k, gemm="auto", project="auto", project_bound_scale=1.0):
        d, i = _knn_fake(query, bank, k)
        return d, i, query.new_empty((6,), dtype=torch.int64)

    @torch.library.register_fake("patchcore_fast::knn_prepared")
    def _knn_prepared_fake(query, bank, k, prepared, project="auto"):
        return _knn_stats_fake(query, bank, k)
