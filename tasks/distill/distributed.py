"""Where a KD process sits in a distributed run, and the few collective operations KD needs.

The KD loop (`tasks.distill.train.train_loop`) stays one loop for one process or many: it asks a
`Runtime` for its rows of each global batch, for the gradient norm, and for the loss averaged
over ranks before it logs. A single process is `Runtime()` (rank 0 of 1) and every method is then
a no-op, so the default path computes exactly what it did before distribution existed.

Under `torchrun` (see `tasks.distill.launch`), `Runtime.start()` joins the process group and `wrap`
prepares the models for one of two strategies:

- **ddp**: every rank holds the full student and teacher; DDP averages student gradients after
  each backward. Fits when one device holds teacher + student + AdamW state + activations.
- **fsdp**: FSDP2 (`fully_shard`) shards the student's parameters, gradients and optimizer state
  over ranks, and the teacher's parameters too; the teacher is frozen before sharding, so it has
  no gradients and no optimizer state. For models that do not fit one device.

Why the numbers match one process: every rank takes `batch_size / world` rows of the same global
batch, the KD loss is a token mean over equally sized rows, so the mean over ranks of per-rank
means is the single-process mean, and DDP/FSDP average gradients the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Runtime:
    """This process's rank, the world size, its device and how models are wrapped."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, strategy: str = "ddp", device: str = "cpu") -> Runtime:
        """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

        Without torchrun's variables, or with a world of one, this is a plain single process.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown distributed strategy '{strategy}'; known: "
                             f"{', '.join(STRATEGIES)}")
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("distill: resources ask for cuda but torch sees no CUDA device")
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        if world == 1:
            return cls(device=device)
        import torch.distributed as dist

        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=_bound_store(rank, world), rank=rank,
                                world_size=world, device_id=torch.device(device)
                                if backend == "nccl" else None)
        return cls(rank, world, local_rank, device, strategy)

    def shutdown(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ data

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly, or ranks would average unequal token counts."""
        if batch_size % self.world:
            raise ValueError(f"distill: batch_size {batch_size} does not split over {self.world} "
                             f"processes; use a multiple of {self.world}")

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch, on this rank's device."""
        if self.world > 1:
            per = len(batch) // self.world
            batch = batch[self.rank * per : (self.rank + 1) * per]
        return batch.to(self.device)

    # ------------------------------------------------------------------ models

    def wrap(self, student, teacher) -> tuple[Any, Any]:
        """Place both models on this rank's device and wrap them for the strategy."""
        if self.strategy == "fsdp":
            return _fsdp(student, self.device, self.world), _fsdp(teacher, self.device, self.world)
        student.to(self.device)
        teacher.to(self.device)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.device.startswith("cuda") else None
            # Buffers (rotary tables) are computed, not trained: no need to broadcast them.
            student = DistributedDataParallel(student, device_ids=ids, broadcast_buffers=False)
        return student, teacher

    def unwrap(self, model):
        """The module to call for evaluation: DDP's inner module (no gradient sync needed)."""
        return getattr(model, "module", model) if self.strategy == "ddp" else model

    @contextlib.contextmanager
    def accumulating(self, model, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
        if self.strategy == "ddp" and not sync:
            with model.no_sync():
                yield
        elif self.strategy == "fsdp":
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """Clip by the global gradient norm; under FSDP the norm is summed over shards first."""
        params = [p for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if hasattr(total, "full_tensor"):  # a DTensor under FSDP2: reduce over shards
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def export(self, model, fresh: Callable[[], Any]):
        """The trained student as a plain module on rank 0 (None elsewhere), ready to save.

        FSDP keeps only shards on each rank, so every rank takes part in gathering the full state
        dict; rank 0 loads it into `fresh()`, an unwrapped copy of the student's architecture.
        """
        if self.strategy != "fsdp":
            return self.unwrap(model).to("cpu") if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        plain = fresh()
        plain.load_state_dict(state, strict=False)  # tied lm_head is absent from the state dict
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()
        return plain

    # ------------------------------------------------------------------ numbers

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over ranks, so the curve is the global batch's loss."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        keys = list(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.world for k, v in zip(keys, tensor.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _bound_store(rank: int, world: int):
    """The process group's TCPStore, listening only on MASTER_ADDR (not on every interface).

    torch's TCPStore binds its server to all interfaces; a socket bound to the advertised address
    and handed over as `master_listen_fd` keeps a single-node run on loopback (127.0.0.1).
    """
    import torch.distributed as dist

    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
        listen_fd = sock.detach()
    timeout = datetime.timedelta(seconds=int(os.environ.get("PKDQ_DIST_TIMEOUT_S", "1800")))
    return dist.TCPStore(addr, port, world, rank == 0, timeout, master_listen_fd=listen_fd)


def _fsdp(model, device: str, world: int):
    """Shard each decoder layer, then the rest (embeddings, final norm, head), with FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    # The root (embeddings, head) must reshard after every forward too: by default it stays
    # gathered until a backward, and after a gradient-free held-out forward the next step then
    # trained on stale gathered weights (measured: losses off by 1e-2 from step 2 on).
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def _decoder_layers(model) -> list[Any]:
    """The repeated blocks to shard one by one (HF decoder-only models keep them in .layers)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"fsdp: cannot find decoder layers in {type(model).__name__}; "
                         "use strategy: ddp")
    return list(layers)
