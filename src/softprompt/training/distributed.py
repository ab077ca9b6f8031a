"""Data-parallel training over several processes (``accelerate launch``, ``torchrun``).

Why not DDP: the only trainable numbers are a few small tensors (soft tokens, prefix
key/values, a P-tuning encoder, an encoder-family head), and the frozen model has no
gradient to synchronise.  Wrapping the model in ``DistributedDataParallel`` would buy
nothing and needs a module that owns the trainable tensors.  Instead every process keeps
the same copy of those tensors and, each step,

* takes its shard of the global batch (``plan[step][rank::world]``; the plan itself is a
  function of the seed only, identical on every rank and for any process count),
* scales its mean loss by its share of the global loss weight, so the sum over processes
  is the mean over the global batch,
* sums gradients (and the logged loss and token count) over processes with one
  ``all_reduce`` of one flat buffer,

then clips and steps identically everywhere.  Validation is sharded and gathered (or run
whole on every rank when the frozen model is sharded, see below) and the metrics are taken
from the main process, so best-prompt keeping and early stopping agree on every rank.

Frozen models larger than one device: :func:`shard_frozen_model` shards the decoder layers
with FSDP2 (``torch.distributed.fsdp.fully_shard``).  Each layer's weights are all-gathered
when it runs, so every forward is a collective and every rank must run the same sequence of
forwards: in that mode (``lockstep``) validation is not sharded and a rank whose shard of a
batch is empty still runs one example with weight 0.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by a distributed launcher (``accelerate launch``,
    ``torchrun``) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_device(default: str) -> str:
    """The device this process should put the model on: under a multi-GPU launch, its own GPU
    (``cuda:LOCAL_RANK``) instead of everyone's ``cuda``."""
    if launched() and default == "cuda" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return default


class DataParallel:
    """This process's place in a data-parallel run, and the few collectives training needs.

    ``DataParallel.current()`` joins the launcher's process group (through accelerate's
    ``PartialState``, gloo on CPUs, NCCL on GPUs) or, in a plain process, is a group of one
    whose operations are no-ops, so single-process training runs exactly the old code.
    """

    def __init__(self, rank: int = 0, world: int = 1, *, lockstep: bool = False):
        self.rank, self.world, self.lockstep = rank, world, lockstep

    @classmethod
    def current(cls, model=None) -> "DataParallel":
        if not launched():
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, lockstep=is_sharded(model))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def shards_evaluation(self) -> bool:
        """Whether evaluation is split over processes: not when the model itself is sharded
        (every rank must then run every forward)."""
        return self.active and not self.lockstep

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``world``-th, from ``rank``)."""
        return list(items[self.rank :: self.world])

    def gather(self, mine: Sequence[T], n: int) -> list[T]:
        """The inverse of :meth:`shard` over all ranks: ``n`` items back in their original order."""
        if not self.active:
            return list(mine)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, list(mine))
        out: list[Any] = [None] * n
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out

    def sum_gradients(self, params: Iterable[torch.Tensor], extras: Sequence[float] = ()) -> list[float]:
        """Sum the gradients of ``params`` (a missing one counts as zero) and the numbers
        ``extras`` over all ranks, in one all-reduce; returns the summed ``extras``."""
        params = list(params)
        if not self.active:
            return list(extras)
        import torch.distributed as dist

        device = params[0].device
        # one buffer, in float64: a sum of float32 gradients rounds once, as on one process, and
        # token counts stay exact beyond float32's integer range
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
                         + [torch.tensor([float(x) for x in extras], dtype=torch.float64, device=device)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].tolist()

    def from_main(self, obj: T) -> T:
        """The main process's ``obj`` on every rank (so decisions taken from it agree)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with the main process's values (a guard at the start of a run)."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


# ----------------------------------------------------------------------------- sharding the frozen model
def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a decoder-only model (what FSDP shards)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_frozen_model(model, device: str | torch.device | None = None, *, reshard_after_forward: bool = True):
    """Shard the frozen model's decoder layers over the processes of the launch (FSDP2,
    ``fully_shard``): each rank then holds 1/world of every layer, and a layer's weights are
    all-gathered only while it runs.  Embeddings, final norm and LM head stay whole on every
    rank (the soft prompt is built from the embedding table outside any forward).

    For a model larger than one device, load it on the CPU and pass ``device`` (this process's
    GPU, :func:`process_device`): each layer's shard, and the unsharded rest, move there.
    Needs a launched process group; one process per GPU, or gloo on CPUs (tested on CPUs only)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if not launched():
        raise ValueError("sharding the frozen model needs several processes: run under `accelerate launch` or torchrun")
    dp = DataParallel.current()  # joins the process group
    if not dist.is_initialized():
        raise ValueError("no process group: run under `accelerate launch` or torchrun")
    device = torch.device(device) if device is not None else None
    mesh = init_device_mesh(device.type, (dp.world,)) if device is not None else None
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if device is not None:  # the rest (embeddings, norm, head, rotary buffers) whole on this device
        inside = {id(m) for layer in layers for m in layer.modules()}
        with torch.no_grad():
            for m in model.modules():
                if id(m) in inside:
                    continue
                for p in m._parameters.values():  # in place: tied weights stay tied
                    if p is not None and not isinstance(p, DTensor):
                        p.data = p.data.to(device)
                for k, b in m._buffers.items():
                    if b is not None:
                        m._buffers[k] = b.to(device)
    model.softprompt_sharded = True
    return model


def is_sharded(model) -> bool:
    return bool(getattr(model, "softprompt_sharded", False))


__all__ = ["DataParallel", "decoder_layers", "is_sharded", "launched", "process_device", "shard_frozen_model"]
