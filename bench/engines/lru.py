"""A byte-bounded LRU map (what functools.lru_cache cannot do: bound by bytes, not count)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class ByteLRU:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.rejected = 0

    def get(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: object, nbytes: int) -> bool:
        """Store, evicting least-recently-used entries; an entry larger than the capacity is refused."""
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        if nbytes > self.capacity:
            self.rejected += 1
            return False
        while self.bytes + nbytes > self.capacity:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items
