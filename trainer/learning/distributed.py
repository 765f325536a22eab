"""The learner data-parallel over ranks (torchrun): one process per device, one LoRA replica each.

Rank 0 runs the whole trainer (gateway, scheduler, run directory, checkpoints, weight sync to the
generation backend). Ranks > 0 only learn: `follow` waits for rank 0's messages (`broadcast_object_list`)
and runs the same `Learner.train_step` on the same samples. Inside `train_step` each rank keeps its
share of the samples (`Ranks.shard`), with sequence weights computed over the *whole* step, so the
per-rank losses add up to the single-process loss; `Ranks.reduce` sums the LoRA gradients (one
coalesced `all_reduce`, SUM: the weights already hold the global normalisation, where DDP would take
a mean) and the step's loss statistics. Every rank then clips the same gradient and takes the same
AdamW step: LoRA weights and optimizer state stay identical everywhere, so rank 0's checkpoint is the
whole state and `--resume` works with any world size (`join` broadcasts it to the other ranks).

A rank that dies makes the others' next collective fail (gloo: the peer's socket closes) or time out
after `learner.timeout_s`; torchrun then stops the rest with SIGTERM, which `launched` turns into a
`RankLost` error on every rank so rank 0 stops its env servers and exits with a clear message. The
newest checkpoint is untouched (they are written atomically).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError, TrainConfig
from trainer.types import Sample

if TYPE_CHECKING:
    from trainer.learning.learner import Learner
    from trainer.learning.prefix import MicroBatch

STAT_KEYS = ("tokens", "clipped", "truncated", "ratio", "abs_logprob_diff", "kl")
_active: Ranks | None = None


class RankLost(RuntimeError):
    """A rank of a data-parallel run died, hung past `learner.timeout_s`, or the launcher stopped this
    one; the message says which and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM from the launcher (another rank failed). A KeyboardInterrupt so that asyncio unwinds the
    run the same way (servers stopped, no step half-written) wherever the main thread is."""


class Ranks:
    """This process's place among the learner ranks, and the collectives the learner needs."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, fsdp: bool = False) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.fsdp = fsdp  # the model sharded over the ranks (learning/fsdp.py), once they hold rank 0's state
        self.lost = False
        self.sharded = False

    # --- rank 0 -> the others ---------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        box = [message]
        self._collective(dist.broadcast_object_list, box, src=0)

    def _receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def share(self, samples: list[Sample], lr: float) -> None:
        """Rank 0: hand the step's samples and learning rate to the other ranks (they are in `follow`)."""
        if self.rank == 0:
            self._send(("step", samples, lr))

    def join(self, learner: Learner) -> None:
        """Rank 0 (after building its learner and loading any checkpoint): make every rank's LoRA weights
        and optimizer state rank 0's. The other ranks run the matching half in `follow`."""
        learner.ranks = self
        self._send(("sync",))
        self._sync(learner)

    def _sync(self, learner: Learner) -> None:
        for p in learner.model.parameters():
            if p.requires_grad:
                self._collective(dist.broadcast, p.data, src=0)
        box = [learner.optimizer.state_dict() if self.rank == 0 else None]
        self._collective(dist.broadcast_object_list, box, src=0)
        if self.rank:
            learner.optimizer.load_state_dict(box[0])
        if self.fsdp:
            if self.sharded:
                raise RuntimeError("learner.fsdp: the ranks' model is already sharded; they sync once, at the start")
            from trainer.learning import fsdp

            fsdp.shard(learner, self.world_size)
            self.sharded = True

    def full_state(self, learner: Learner, what: str) -> dict[str, Any] | None:
        """Rank 0, sharded: the whole LoRA weights (`what` = "lora") or optimizer state ("optimizer"),
        gathered from every rank (they are in `follow`). None when each rank holds it all already."""
        if not self.sharded:
            return None
        if self.rank == 0:
            self._send(("gather", what))
        return self._gather(learner, what)

    def _gather(self, learner: Learner, what: str) -> dict[str, Any]:
        from trainer.learning import fsdp

        box: list[dict[str, Any]] = []
        self._collective(lambda: box.append(fsdp.lora_state(learner) if what == "lora" else fsdp.optimizer_state(learner)))
        return box[0]

    def follow(self, learner: Learner) -> None:
        """Ranks > 0: do what rank 0 says until it says stop."""
        learner.ranks = self
        while True:
            message = self._receive()
            if message[0] == "stop":
                return
            if message[0] == "sync":
                self._sync(learner)
            elif message[0] == "step":
                learner.train_step(message[1], lr=message[2])
            elif message[0] == "gather":
                self._gather(learner, message[1])

    def stop(self) -> None:
        """Rank 0, when the run ends (however it ends): release the other ranks."""
        if self.rank == 0 and not self.lost:
            with contextlib.suppress(RankLost):
                self._send(("stop",))

    # --- inside a step ------------------------------------------------------------------------

    def shard(self, samples: list[Sample], weights: list[float]) -> tuple[list[Sample], list[float]]:
        """This rank's samples and their (whole-step) weights. The rollouts of a group stay together
        (their shared prompt is computed once), groups go to the rank with the fewest tokens so far
        (largest first); with fewer groups than ranks, samples are dealt one by one. The same on
        every rank: each computes the whole plan from the same list."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(samples):
            prompt = tuple(s.input_ids[: s.loss_mask.index(1)] if 1 in s.loss_mask else s.input_ids)
            groups.setdefault(prompt, []).append(i)
        units = list(groups.values())
        if len(units) < self.world_size:
            units = [[i] for i in range(len(samples))]
        units.sort(key=lambda u: (-sum(len(samples[i].input_ids) for i in u), u[0]))
        load = [0] * self.world_size
        mine: list[int] = []
        for unit in units:
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            load[rank] += sum(len(samples[i].input_ids) for i in unit)
            if rank == self.rank:
                mine += unit
        mine.sort()
        return [samples[i] for i in mine], [weights[i] for i in mine]

    def balance(self, batches: list[MicroBatch], learner: Learner) -> list[MicroBatch]:
        """Sharded: as many micro-batches on every rank (empty ones added); else `batches` as they are."""
        if not self.sharded:
            return batches
        from trainer.learning import fsdp

        box: list[list[MicroBatch]] = []
        self._collective(lambda: box.append(fsdp.balance(batches, learner)))
        return box[0]

    def reduce(self, params: list[torch.Tensor], loss: float, totals: dict[str, float]) -> tuple[float, dict[str, float]]:
        """Sum the gradients of `params` (unless FSDP's reduce-scatter did) and the step's loss and
        statistics over the ranks."""
        device = params[0].device
        if not self.sharded:
            self._sum_grads(params)
        sums = torch.tensor([loss, *(totals.get(k, 0.0) for k in STAT_KEYS)], dtype=torch.float64, device=device)
        self._collective(dist.all_reduce, sums)
        values = sums.tolist()
        return values[0], dict(zip(STAT_KEYS, values[1:]))

    def _sum_grads(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is None:  # a rank with no samples this step still takes part
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        self._collective(dist.all_reduce, flat)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def _collective(self, op: Any, *args: Any, **kwargs: Any) -> None:
        try:
            op(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            self.lost = True
            why = re.sub(r"^\[[^\]]*\] ", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise RankLost(f"rank {self.rank}/{self.world_size}: a learner rank is gone or hung "
                           f"(learner.timeout_s={self.timeout_s:g}): {why}") from None


STOP_GRACE_S = 10.0  # torchrun sends SIGKILL 30 s after SIGTERM


def _exit_later(rank: int, world: int, run_dir: str) -> None:
    """After SIGTERM the run unwinds (servers stopped, clear error); should something block that (a thread
    in a collective with a rank that is gone), print where and exit anyway before torchrun's SIGKILL.
    Servers the trainer started die with it (PR_SET_PDEATHSIG)."""
    import faulthandler
    import sys
    import threading
    from pathlib import Path

    from trainer.learning.checkpoints import latest_checkpoint

    def give_up() -> None:
        print(f"rank {rank}/{world}: stopping took over {STOP_GRACE_S:g} s; where each thread was:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr)
        ckpt = latest_checkpoint(Path(run_dir))
        hint = (f"The newest checkpoint is {ckpt}: fix the cause, then relaunch with --resume (any number of ranks)"
                if ckpt else "No checkpoint was written yet")
        print(f"openrft train: error: rank {rank}/{world} stopped by the launcher (SIGTERM): another learner rank "
              f"failed. {hint}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(STOP_GRACE_S, give_up)
    timer.daemon = True  # a run that stops in time exits without waiting for it
    timer.start()


@contextlib.contextmanager
def launched(config: TrainConfig) -> Iterator[Ranks | None]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): gloo on CPU, nccl on CUDA, one device per local rank. Yields None when there is no
    torchrun or only one process. Rank 0 releases the others when the run ends."""
    global _active
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield None
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"learner rank {rank} (local rank {local_rank}) has no GPU: torch sees "
                              f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                              "start at most one rank per visible GPU")
        torch.cuda.set_device(local_rank)
    elif config.threads is None:  # CPU ranks of one node share its cores (torch_threads took one less than all)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, ((os.cpu_count() or 1) - 1) // local))
    timeout = datetime.timedelta(seconds=config.learner.timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    ranks = _active = Ranks(rank, world, config.learner.timeout_s, config.learner.fsdp)

    def terminated(signum: int, frame: Any) -> None:
        _exit_later(rank, world, config.run_dir)
        if ranks.lost:  # already stopping with RankLost: let that finish
            return
        ranks.lost = True
        raise Terminated(f"rank {rank}/{world} stopped by the launcher (SIGTERM): another learner rank failed")

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield ranks
    except Terminated as exc:
        raise RankLost(str(exc)) from None
    finally:
        _active = None
        signal.signal(signal.SIGTERM, before)
        ranks.stop()
        if not ranks.lost:
            dist.destroy_process_group()


def join(learner: Learner) -> None:
    """Rank 0: bring the other ranks' learners to this one's state (no-op when running alone)."""
    if _active is not None:
        _active.join(learner)


def follow(config: TrainConfig, ranks: Ranks) -> None:
    """A rank > 0: build the same learner, then learn what rank 0 sends until the run ends."""
    import random

    from trainer.learning.learner import Learner

    random.seed(config.seed + ranks.rank)
    torch.manual_seed(config.seed + ranks.rank)  # LoRA init is overwritten by rank 0's; dropout differs per rank
    ranks.follow(Learner.from_config(config))


def relaunch(nproc: int, argv: list[str]) -> int:
    """`openrft train --nproc N ...`: the same command under torchrun with N processes on this node."""
    import subprocess
    import sys

    rest, skip = [], False
    for arg in argv:  # the ranks run the same command less --nproc (torchrun would take it for its own option)
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "trainer.cli", "train", *rest]
    code = subprocess.call(cmd)
    if code:
        print(f"openrft train: error: the run's {nproc} ranks stopped (torchrun exit code {code}; rank 0's error "
              "and torchrun's summary are above)", file=sys.stderr)
    return code
