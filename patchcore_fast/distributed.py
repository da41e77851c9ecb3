"""The life of a distributed run (issue #14): the launch, the process group, the exchange.

- Launch: :func:`launch_from_environment` reads what ``torchrun`` sets, :func:`init` joins
  the group (NCCL on CUDA, gloo on the CPU, a timeout on every collective). One process is
  the launch of a world of one (:data:`ONE_PROCESS`, torchrun-style): its share of a list
  is the list and its :meth:`Launch.exchange` returns its own answer, so fit, score and
  evaluate each have one loop, whatever the world size.
- Score and evaluate (:mod:`patchcore_fast.evaluation`): each rank scores its contiguous
  share of the images and writes their overlays; each phase ends with one
  :meth:`Launch.exchange` (answers or errors of every rank), after which rank 0 writes the
  merged files.
- The rows themselves across the ranks (the sharded coreset and fit, the sharded bank)
  are :mod:`patchcore_fast.sharded`'s.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .errors import PatchCoreError, first_line, os_error_text


# ----- launch: the torchrun environment ---------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """This process's place in a run (``torchrun`` sets the variables; one process is
    :data:`ONE_PROCESS`, rank 0 of a world of one).

    Attributes:
        rank: global rank, 0 .. world - 1 (rank 0 prints and writes the summary outputs).
        world: number of processes.
        local_rank: rank on this machine (the GPU it uses).
    """

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (rank order = item order).

        Contiguous blocks, sizes differing by at most one, so the concatenation of the
        shares in rank order is ``items`` (one process: all of them): rank r's patches are
        the rows of the bank after those of ranks 0 .. r-1, as
        :func:`~patchcore_fast.sharded.greedy_coreset_sharded` expects.
        """
        n = len(items)
        return list(items[self.rank * n // self.world:(self.rank + 1) * n // self.world])

    def exchange(self, work: Callable[[], object]) -> list:
        """``work()`` on every rank, then every rank's answer on every rank.

        One process: ``[work()]`` (its error raised as it is). Several: one collective
        (:func:`_exchange_across`), so a rank that fails still takes part in it.

        Args:
            work: this rank's part of the phase; its answer must pickle.

        Returns:
            the answers of every rank, by rank.
        """
        return [work()] if self.world == 1 else _exchange_across(work)


#: The launch of a process started on its own: rank 0 of a world of one.
ONE_PROCESS = Launch(0, 1, 0)

#: Variables torchrun (and ``torch.distributed.run``) sets in every process it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_from_environment(environ=os.environ) -> Launch | None:
    """The torchrun environment, or None when this process was started on its own.

    Raises:
        ValueError: some of the variables are set but not all, or they are not integers.
    """
    present = [v for v in LAUNCH_VARIABLES if v in environ]
    if not present:
        return None
    missing = [v for v in LAUNCH_VARIABLES if v not in environ]
    if missing:
        raise ValueError(f"the distributed launch variables are incomplete: {', '.join(present)} "
                         f"set but not {', '.join(missing)} (start the run with torchrun)")
    try:
        rank, world, local = (int(environ[v]) for v in LAUNCH_VARIABLES[:3])
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK should be integers, got "
                         f"{environ['RANK']!r}, {environ['WORLD_SIZE']!r}, "
                         f"{environ['LOCAL_RANK']!r}") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK {rank} should be in [0, WORLD_SIZE {world})")
    return Launch(rank, world, local)


#: The timeout of the process group joined by :func:`init` (seconds).
_timeout_s = 1800.0


def collective_timeout() -> float:
    """Seconds a collective of this process's group waits (``--dist-timeout``): also the
    bound of waits outside torch's collectives (:mod:`~patchcore_fast.local_exchange`)."""
    return _timeout_s


def init(launch: Launch, device: torch.device, timeout_s: float) -> None:
    """Join the process group: NCCL when the model runs on CUDA, gloo on the CPU.

    On CUDA each process takes the GPU of its local rank (``torch.cuda.set_device``), so
    ``cuda`` in the model's settings means that GPU and the saved settings stay the same
    as a one-process run's. Every collective then fails after ``timeout_s`` instead of
    waiting forever for a rank that hangs.
    """
    global _timeout_s
    _timeout_s = float(timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            rank=launch.rank, world_size=launch.world,
                            timeout=datetime.timedelta(seconds=timeout_s))


#: What a failed collective raises: DistError (NCCL, timeouts) or, from gloo, a plain
#: RuntimeError ("Connection closed by peer" when a rank died).
DistError = (dist.DistError, RuntimeError)
_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def describe_failure(exc: BaseException) -> str:
    """One line for an error of a distributed run: which kind, and torch's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[") and "] " in text:  # gloo's "[.../pair.cc:561] " source prefix
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically", 1)[0][:240]
    if isinstance(exc, dist.DistError) or any(w in text.lower() for w in _PEER_WORDS):
        return f"the distributed run failed: another process stopped or a collective timed " \
               f"out ({text})"
    return f"the distributed run failed: {type(exc).__name__}: {text}"


def finish(together: bool = False) -> None:
    """Leave the process group (when in one).

    ``together``: every rank is known to be alive and at this same point (the command's
    end, or a failure that an exchange reported to all): a barrier first, so that no rank
    tears its side of the group down, and exits, while another still uses it. Without
    it, a rank that failed fast could leave while rank 0 (which also serves the group's
    store) was still closing, and rank 0 aborted at exit now and then ("terminate called
    without an active exception", SIGABRT). After a collective failed (a rank died or
    hung) no barrier is tried: it would wait for the dead.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            with contextlib.suppress(*DistError):
                dist.barrier()
        dist.destroy_process_group()


def launch_for(verb: str, environ=os.environ) -> Launch:
    """The launch a command runs under: :data:`ONE_PROCESS` without torchrun, for a world
    of one, and for ``demo-data`` (which every rank would write alike). Raises ValueError
    as :func:`launch_from_environment`."""
    found = launch_from_environment(environ)
    return ONE_PROCESS if found is None or found.world == 1 or verb == "demo-data" else found


def run(launch: Launch, verb: str, device, timeout_s: float, call):
    """``call()`` on its own, or as one rank of ``launch`` inside its process group.

    Args:
        launch: from :func:`launch_for`; a world of one runs ``call`` as it is.
        verb: the command (``fit``, ``score`` and ``evaluate`` run distributed; ``study``
            is refused with one line: its fits at several ratios would need the test
            features of every rank at every ratio).
        device: a callable giving the model's device, which picks NCCL or gloo.
        timeout_s: seconds a collective waits before the run fails (positive: the command
            line checks ``--dist-timeout``).
        call: the command itself.
    """
    if launch.world == 1:
        return call()
    if verb not in ("fit", "score", "evaluate"):
        raise PatchCoreError(f"{verb} does not run under torchrun yet; run it as one process")
    init(launch, device(), timeout_s)
    together = False  # every rank is at the same point: the end, or a reported failure
    try:
        result = call()
        together = True
        return result
    except BaseException as exc:
        together = getattr(exc, _EVERY_RANK_KNOWS, False)
        raise
    finally:
        finish(together)


def current() -> Launch:
    """The running process group as a :class:`Launch`; :data:`ONE_PROCESS` outside one."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ONE_PROCESS
    return Launch(dist.get_rank(), dist.get_world_size(),
                  int(os.environ.get("LOCAL_RANK", dist.get_rank())))


# ----- score and evaluate: one exchange per phase ------------------------------------------

def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return os_error_text(exc)
    text = first_line(exc)
    # --on-error fail raises the skip warning itself ("skipping FILE: why").
    return "cannot use " + text.removeprefix("skipping ") if isinstance(exc, Warning) else text


#: Set on an exception that every rank raises at the same point (a failure reported by an
#: exchange): :func:`finish` may then synchronise the ranks before leaving.
_EVERY_RANK_KNOWS = "_patchcore_fast_every_rank_knows"


def _known(exc: BaseException) -> BaseException:
    with contextlib.suppress(AttributeError, TypeError):  # an exception without a __dict__
        setattr(exc, _EVERY_RANK_KNOWS, True)
    return exc


def _exchange_across(work) -> list:
    """:meth:`Launch.exchange` of a process group (one collective).

    The phases of a distributed score or evaluate end here, so a rank that fails still
    takes part in the collective: it sends its error instead of its answer, raises its own
    exception, and every other rank raises one line naming it. No rank waits for a
    collective that a failed rank will never join, and no merged file is written after a
    failure (the merged files are written after the last exchange). A rank that dies
    instead (killed) makes the collective fail on the others (:data:`DistError`).
    """
    try:
        mine, error = work(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the exchange
        mine, error = None, exc
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (mine, None if error is None else _one_line(error)))
    if error is not None:
        raise _known(error)
    failed = [(r, why) for r, (_, why) in enumerate(every) if why is not None]
    if failed:
        r, why = failed[0]
        raise _known(PatchCoreError(f"rank {r} of {len(every)} failed ({why}); nothing was "
                                    f"merged"))
    return [answer for answer, _ in every]
