"""int4 weight quantization (AWQ and round-to-nearest) and the layer that runs it."""

DEFAULT_DENSE_ROWS = 8  # H200: tinygemm beats dequantize+GEMM up to ~8-16 rows (int4_kernels_*.csv)
DEFAULT_CACHE_DIR = "~/.cache/vlm-bench/int4"  # --int4-cache-dir: quantized models, and the kernel measurements
KERNELS_FILE = "kernels.json"  # the measured kernel choices, in the cache directory (bench.quant.w4a16.measurements)
