"""The static engines' KV cache: every layer's keys and values in buffers allocated once."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVLayer:
    keys: torch.Tensor  # [batch, kv_heads, max_len, head_dim]
    values: torch.Tensor
    pair: torch.Tensor  # [2, batch, kv_heads, max_len, head_dim]: keys and values, one tensor


class KVBuffers:
    """Every layer's keys/values in one tensor, allocated once; `length` (device) = tokens written.

    One tensor (not one per layer) so that saving or restoring a prefix is a single copy kernel.
    A batch of several rows also keeps which columns are real (`valid`: rows padded to a common
    length have masked gaps) and each row's next position (`next_pos`), both on the device so
    graph replays update them.

    One row's length may be `deferred`: known on the host, not yet written to the device. A warm
    request resets the buffers and finds its prefix already in place, so neither needs a kernel;
    its suffix graph writes the length it starts from itself (with its token ids), and anything
    else that reads or advances the length on the device settles it first (`settle`). Two
    launches less on the host path to the first token (~0.1 ms cold on the H200 machine)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, device, dtype, batch: int = 1):
        self.data = torch.zeros(layers, 2, batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.layers = [KVLayer(self.data[i, 0], self.data[i, 1], self.data[i]) for i in range(layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.deferred: int | None = None  # the length when the device tensor does not hold it yet
        self.max_len, self.batch = max_len, batch
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device) if batch > 1 else None
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device) if batch > 1 else None

    def reset(self) -> None:
        # Stale keys/values need no zeroing: masks never admit a position before it is written.
        if self.valid is None:
            self.deferred = 0
            return
        self.length.zero_()
        self.valid.zero_()
        self.next_pos.zero_()

    def settle(self) -> None:
        """Write a deferred length to the device (never inside a capture: it would be a constant)."""
        if self.deferred is not None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a deferred KV length reached a CUDA graph capture")
            self.length.fill_(self.deferred)
            self.deferred = None

    def take_deferred(self) -> int | None:
        """The deferred length, now the caller's to write (a suffix graph does, from its inputs)."""
        n, self.deferred = self.deferred, None
        return n

    def positions(self) -> tuple:
        """Where the next tokens go (copies); `set_positions` rewinds to them. Columns written
        past the rewound length are never attended to (the causal mask stops at the query)."""
        self.settle()
        return self.length.clone(), None if self.next_pos is None else self.next_pos.clone()

    def set_positions(self, saved: tuple) -> None:
        self.deferred = None
        self.length.copy_(saved[0])
        if self.next_pos is not None:
            self.next_pos.copy_(saved[1])

    def save_prefix(self, n: int, row: int = 0) -> torch.Tensor:
        """A copy of one row's first n positions of every layer: [layers, 2, 1, kv_heads, n, head_dim]."""
        return self.data[:, :, row:row + 1, :, :n].clone()

    def load_prefixes(self, entries: list[torch.Tensor], in_place: list[bool] | None = None) -> list[int]:
        """Copy saved prefixes to the front of each row (one kernel when every row shows the same
        prefix); rows of unequal length end in a masked gap. Rows whose `in_place` is True
        already hold their prefix and are not copied. Returns the lengths."""
        lengths = [e.shape[-2] for e in entries]
        n = max(lengths)
        in_place = in_place or [False] * len(entries)
        if all(in_place):
            if self.valid is None:  # nothing to write: the row holds its prefix
                self.deferred = n
                return lengths
        elif all(e is entries[0] for e in entries):
            self.data[..., :n, :].copy_(entries[0])  # broadcast over the batch
        else:
            for b, e in enumerate(entries):
                if not in_place[b]:
                    self.data[:, :, b:b + 1, :, :lengths[b]].copy_(e)
        self.deferred = None
        self.length.fill_(n)
        if self.valid is not None:
            dev = self.valid.device
            self.valid.copy_(torch.arange(self.max_len, device=dev)[None, :]
                             < torch.tensor(lengths, device=dev)[:, None])
            self.next_pos.copy_(torch.tensor(lengths, device=dev))
        return lengths

    def get_seq_length(self) -> int:
        return self.deferred if self.deferred is not None else int(self.length)
