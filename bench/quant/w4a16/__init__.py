"""W4A16 kernels for Int4Linear's calls of few rows (decode, short suffixes) and, named by
`--int4-prefill-kernel`, of more (prefill), and the measured choice of one per row count.

A kernel is one module here plus a line in `registry`; `choice` times the available ones per
device and weight shape once, and gives every layer of that shape the fastest correct kernel
per row count (`--int4-kernels measured`).
"""
