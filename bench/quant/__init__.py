"""int4 weight quantization (AWQ and round-to-nearest) and the layer that runs it."""

DEFAULT_DENSE_ROWS = 8  # H200: tinygemm beats dequantize+GEMM up to ~8-16 rows (int4_kernels_*.csv)
