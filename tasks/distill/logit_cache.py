"""Teacher-logit cache: run the frozen teacher once over the training blocks, keep its top-k.

Why: the teacher's forward is ~30% of a KD step on CPU and gives the same answer every epoch,
every recipe and every ordering that distils from the same teacher on the same blocks. The cache
stores, per position, the top-k logits and their ids, the log-sum-exp of logits/T over the
whole vocabulary (to renormalise them) and the log of the tail mass outside the top k (summed
exactly at build time; see `tasks.distill.sparse`), in shards under
`<pkdq cache>/logits/<key>/`. The key hashes everything the numbers depend on: teacher folder
fingerprint, the token blocks themselves (data + seed + seq_len), the tokenizer's vocabulary,
seq_len, k, temperature and compute precision. A finished cache has `manifest.json`; shards are
written atomically, so an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.core.common import Progress, cache_dir, read_json, unique_tmp, write_json_atomic
from tasks.distill.sparse import SparseTeacher
from tasks.distill.step import compute_context

FORMAT_VERSION = 2


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the training blocks: data, seed, seq_len)."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map: two tokenizers with equal maps give the same logits' meaning."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    teacher: str
    data: str
    tokenizer: str
    seq_len: int
    k: int
    temperature: float
    precision: str

    def digest(self) -> str:
        text = json.dumps({**self.__dict__, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


class LogitCache:
    """Top-k teacher logits for a fixed set of blocks, addressed by block index."""

    def __init__(self, folder: Path, key: CacheKey, n_blocks: int, shard_blocks: int = 64) -> None:
        self.folder, self.key, self.n_blocks = Path(folder), key, n_blocks
        self.shard_blocks = shard_blocks
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_blocks(cls, teacher_fp: str, tokenizer, blocks: torch.Tensor, k: int,
                   temperature: float, precision: str, root: Path | None = None) -> LogitCache:
        key = CacheKey(teacher_fp, tensor_fingerprint(blocks), tokenizer_fingerprint(tokenizer),
                       int(blocks.shape[1]), k, float(temperature), precision)
        folder = Path(root or cache_dir() / "logits") / key.digest()
        return cls(folder, key, len(blocks))

    # ------------------------------------------------------------------ building

    @property
    def complete(self) -> bool:
        return (self.folder / "manifest.json").is_file()

    def _shard_path(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.pt"

    def n_shards(self) -> int:
        return -(-self.n_blocks // self.shard_blocks)

    @torch.no_grad()
    def build(self, teacher, blocks: torch.Tensor, batch_size: int = 4,
              stage: str = "logit-cache") -> dict[str, float]:
        """Run the teacher over every block not yet cached; returns build stats."""
        if self.complete:
            return {"built": 0, "reused": 1}
        self.folder.mkdir(parents=True, exist_ok=True)
        progress = Progress(stage, self.n_shards(), unit="shard")
        built = 0
        for shard in range(self.n_shards()):
            path = self._shard_path(shard)
            if not path.is_file():
                lo = shard * self.shard_blocks
                part = blocks[lo : lo + self.shard_blocks]
                ids, values, lse, rest = [], [], [], []
                for start in range(0, len(part), batch_size):
                    batch = part[start : start + batch_size]
                    with compute_context(self.key.precision, batch.device.type):
                        logits = teacher(input_ids=batch, use_cache=False).logits
                    sparse = SparseTeacher.from_logits(logits, self.key.k, self.key.temperature)
                    del logits
                    ids.append(sparse.ids.to(torch.int32))
                    values.append(sparse.logits.float())
                    lse.append(sparse.lse.float())
                    rest.append(sparse.log_rest.float())
                tmp = unique_tmp(path)  # another run may build the same shared entry
                torch.save({"ids": torch.cat(ids), "logits": torch.cat(values),
                            "lse": torch.cat(lse), "log_rest": torch.cat(rest)}, tmp)
                os.replace(tmp, path)
                built += 1
            progress.update(shard + 1, tokens=0, force=shard + 1 == self.n_shards())
        write_json_atomic(self.folder / "manifest.json",
                          {**self.key.__dict__, "blocks": self.n_blocks,
                           "shard_blocks": self.shard_blocks, "format": FORMAT_VERSION})
        return {"built": built, "reused": 0}

    # ------------------------------------------------------------------ reading

    def manifest(self) -> dict:
        return read_json(self.folder / "manifest.json")

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._shards:
            self._shards[index] = torch.load(self._shard_path(index), weights_only=True)
        return self._shards[index]

    def get(self, block_indices: torch.Tensor) -> SparseTeacher:
        """The cached teacher for these training blocks, [n, seq_len, k] (+ lse [n, seq_len])."""
        if not self.complete:
            raise RuntimeError(f"logit cache {self.folder} is not built")
        rows = [self._row(int(i)) for i in block_indices.reshape(-1)]
        ids = torch.stack([r[0] for r in rows]).long()
        values = torch.stack([r[1] for r in rows])
        lse = torch.stack([r[2] for r in rows])
        rest = torch.stack([r[3] for r in rows])
        return SparseTeacher(ids, values, lse, rest, self.key.temperature)

    def _row(self, block: int) -> tuple[torch.Tensor, ...]:
        block %= self.n_blocks
        shard = self._shard(block // self.shard_blocks)
        j = block % self.shard_blocks
        return tuple(shard[key][j] for key in ("ids", "logits", "lse", "log_rest"))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("shard_*.pt"))
