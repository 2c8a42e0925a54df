"""Where a served request's TTFT goes, from an endpoint run against `vlm-bench serve` (whose
responses report the server's TTFT and the engine's phases): medians over the measured rows of
each point of the client's TTFT, the server's, the engine's phases before the first token, the
server's own part (server TTFT - phases) with the pieces the server reports (intake: parsing and
images; queue: waiting for and waking the engine thread; handoff: the first token's hop to the
event loop) and the rest, and HTTP + client (client TTFT - server TTFT).
Usage: python lab/served_overhead.py ENDPOINT_RESULTS_DIR"""
import sys
from pathlib import Path

import pandas as pd

from bench.measure.metrics import TTFT_PHASES

PHASES = [f"{phase}_ms" for phase in TTFT_PHASES]  # the engine's phases before the first token
# the server's own part's pieces it reports (the rest, server_other_ms: the engine thread from
# closing the batch to its first phase (the prompts' checks), and from the batch's last phase
# before the first token to having that token on the host)
PARTS = ["server_intake_ms", "server_queue_ms", "server_handoff_ms"]


def main(directory: str) -> None:
    runs = pd.read_csv(Path(directory) / "runs.csv")
    runs = runs[(runs["kind"] == "measured") & (runs["status"] == "ok")]
    if runs["server_ttft_ms"].isna().all() or runs[PHASES].isna().all().all():
        sys.exit(f"{directory}: the server reported no timings (not vlm-bench serve, or an older one)")
    rows = runs.assign(engine_ms=runs[PHASES].sum(axis=1))
    rows = rows.assign(server_own_ms=rows["server_ttft_ms"] - rows["engine_ms"],
                       http_client_ms=rows["ttft_ms"] - rows["server_ttft_ms"])
    cols = ["ttft_ms", "server_ttft_ms", "engine_ms", *PHASES, "server_own_ms", "http_client_ms"]
    if PARTS[0] in rows and rows[PARTS].notna().all(axis=None):  # servers since the parts were reported
        rows = rows.assign(server_other_ms=rows["server_own_ms"] - rows[PARTS].sum(axis=1))
        cols[cols.index("server_own_ms") + 1:cols.index("server_own_ms") + 1] = [*PARTS, "server_other_ms"]
    print(rows.groupby("variant")[cols].median().round(3).T.to_string())


if __name__ == "__main__":
    main(sys.argv[1])
