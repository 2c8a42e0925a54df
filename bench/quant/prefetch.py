"""Full-prompt prefill over int4 weights with the dequantization off the critical path.

The dense prefill path (bench.quant.int4) turns each int4 weight back into a dense one and runs
a dense GEMM. Dequantizing in line puts memory-bound work (read 0.5 B, write 2 B per weight)
between compute-bound GEMMs: on the H200 it made llava-1.5-7b's awq4 prefill 1.40x fp16's
(f67f436:results/h200/llava-1.5-7b-graph-s14). Here a side stream dequantizes layer i+1's weights
while layer i runs, into the other of two dense slots (double buffering), and the layers' dense
paths read their slot (`Int4Linear.prefill_weight`, while `DensePrefetch.reading()`).

Memory: two layers' dense weights (0.8 GB for a 7B in fp16) next to the int4 model, instead of
the dense model's 13 GB; the benchmark's peak-memory columns include it.
Written here: neither torchao nor transformers overlaps weight dequantization with compute.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.quant.int4 import Int4Linear
from bench.measure.compile_events import note_capture
from bench.measure.capture import capturing


def drop_slots(layers) -> None:
    """`layers` (Int4Linear) read no prefetched slot from now on: an engine without a prefetch
    frees the slots an earlier engine over the model gave them (their memory goes with it)."""
    for m in layers:
        m.prefill_weight = None
        m.read_prefill_weight = False


class DensePrefetch:
    """Dense slots for the int4 linears each decoder layer runs in a prefill, and the side
    stream that fills them ahead. On the CPU the fill is synchronous (same results, no overlap)."""

    def __init__(self, per_layer: list[list[Int4Linear]], dtype: torch.dtype):
        shapes = [(m.out_features, m.in_features) for m in per_layer[0]]
        if any([(m.out_features, m.in_features) for m in ms] != shapes for ms in per_layer):
            raise ValueError("decoder layers with int4 linears of different shapes")
        device = per_layer[0][0].packed.device
        self.layers = per_layer
        self.slots = [[torch.empty(s, dtype=dtype, device=device) for s in shapes] for _ in range(2)]
        for i, linears in enumerate(per_layer):
            for m, slot in zip(linears, self.slots[i % 2]):
                m.prefill_weight = slot
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # layer -> its dequantize launches, captured
        self.ready: list = [None] * len(per_layer)  # event: layer i's slot is filled
        self.freed: list = [None] * len(per_layer)  # event: layer i has finished reading its slot
        self.capturing = False  # the prefill is being captured (GraphEngine): launch, don't replay

    @contextmanager
    def reading(self):
        """Around a prefill that tells this prefetch its layers (`begin`, `before_layer`,
        `after_layer`): its linears' dense paths read their slots (`Int4Linear.read_prefill_weight`)
        instead of dequantizing, and not after (decode steps and suffixes dequantize their own)."""
        linears = [m for ms in self.layers for m in ms]
        for m in linears:
            m.read_prefill_weight = True
        try:
            yield
        finally:
            for m in linears:
                m.read_prefill_weight = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot)

    def _dequantize(self, i: int) -> None:
        for m, slot in zip(self.layers[i], self.slots[i % 2]):
            m.dequantize_into(slot)

    def _fill(self, i: int) -> None:
        """Queue layer i's dequantization behind the last reader of its slot (layer i - 2)."""
        if not self.cuda:
            self._dequantize(i)
            return
        with torch.cuda.stream(self.stream):
            if i >= 2:
                self.stream.wait_event(self.freed[i - 2])
            graph = self.graphs.get(i)
            if self.capturing:  # the side stream joined the prefill's capture: its kernels go in it
                self._dequantize(i)
            else:
                if graph is None:  # first prefill: the kernels run (and compile) once, then are captured
                    self._dequantize(i)
                    self.stream.synchronize()
                    graph = self.graphs[i] = torch.cuda.CUDAGraph()
                    note_capture()
                    with capturing(graph, stream=self.stream):
                        self._dequantize(i)
                graph.replay()
            self.ready[i] = self.stream.record_event()

    def begin(self) -> None:
        """Before layer 0: the slots' last readers (an earlier prefill) come first, then fill 0 and 1."""
        if self.cuda:
            # A captured prefill (GraphEngine) takes the side stream's work into its graph: the
            # wait below forks the side stream from the capturing one, `before_layer` joins it.
            self.capturing = torch.cuda.is_current_stream_capturing()
            self.stream.wait_stream(torch.cuda.current_stream())
            self.freed = [None] * len(self.layers)
        for i in range(min(2, len(self.layers))):
            self._fill(i)

    def before_layer(self, i: int) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.ready[i])

    def after_layer(self, i: int) -> None:
        if self.cuda:
            self.freed[i] = torch.cuda.current_stream().record_event()
        if i + 2 < len(self.layers):
            self._fill(i + 2)
