"""Write notebooks/*.ipynb (committed without outputs). Run after editing the cells below."""
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.analysis.compare import DEFAULT_METRICS  # noqa: E402
SETUP = """import os, sys
from pathlib import Path
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(ROOT))
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
pd.set_option("display.width", 200)


def repo_path(p: str) -> str:  # a relative path is taken from the repository root (the kernel runs in notebooks/)
    return str(Path(p) if Path(p).is_absolute() else ROOT / p)"""

SHOW = """
def show(fig, absent: str) -> None:
    \"\"\"Draw a figure, or say why there is none.\"\"\"
    plt.show() if fig is not None else print(absent)"""

compare = new_notebook(cells=[
    new_markdown_cell("# Compare variants\n\nPoint `RESULTS_DIRS` at one or more results directories "
                      "(each with `runs.csv` and `summary.csv`). Figures come from `bench.analysis.figures`, the same "
                      "code as `python -m bench report`. Each result is labelled (variant, cache state, and its source "
                      "directory or run where several hold the model), never averaged with another. Skipped/failed "
                      "variants and invalid summaries are shown, never dropped."),
    new_code_cell("# Parameters (or set BENCH_RESULTS_DIRS, os.pathsep-separated); relative paths are from the "
                  "repository root\n"
                  "RESULTS_DIRS = ['results/reference/h200/llava-1.5-7b-fp16-prefix-engines', 'results/reference/h200/vila1.5-3b-fp16-prefix-engines']",
                  metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP + SHOW + "\nfrom bench.analysis import figures, report, sources\n"
                  "dirs = os.environ.get('BENCH_RESULTS_DIRS', '').split(os.pathsep) if os.environ.get('BENCH_RESULTS_DIRS') else RESULTS_DIRS\n"
                  "dirs = [repo_path(d) for d in dirs]\n"
                  "runs, summary = sources.load(dirs)\n"
                  "if (runs['weights'] == 'random').any():\n"
                  "    display(Markdown('**weights=random**: timings are real; text, token agreement and KL are numeric only.'))\n"
                  "print(len(runs), 'runs from', dirs)"),
    new_markdown_cell("## Time per phase (median per result; each directory's first workload point)"),
    new_code_cell("show(figures.fig_phases(summary), 'no phase columns in these results')"),
    new_markdown_cell("## TTFT and TPOT with 95% CI (hatched: summary not valid)"),
    new_code_cell("show(figures.fig_latency_ci(summary), 'no TTFT/TPOT in these results')"),
    new_markdown_cell("## Speed-up over the fp16 baseline (hf engine)"),
    new_code_cell("report.speedup_table(summary)"),
    new_markdown_cell("## Memory"),
    new_code_cell("show(figures.fig_memory(summary), 'no memory columns in these results')"),
    new_markdown_cell("## Fidelity and decode speed"),
    new_code_cell("show(figures.fig_fidelity(summary), 'no fidelity columns (run without --no-fidelity)')"),
    new_markdown_cell("## Prefix / embedding cache: cold vs warm TTFT"),
    new_code_cell("show(figures.fig_cold_warm(summary), 'no cache variants in these results')"),
    new_markdown_cell("## Sweeps: latency and throughput vs batch size (x: summary not valid)"),
    new_code_cell("show(figures.fig_batch(summary), 'no --batch-size sweep in these results')"),
    new_markdown_cell("## Sweeps: TTFT vs prompt length"),
    new_code_cell("show(figures.fig_prompt_length(summary), 'no --prompt-lengths sweep in these results')"),
    new_markdown_cell("## Video frames: serial vs prefetching loader"),
    new_code_cell("show(figures.fig_loader(summary), 'no --loader serial,prefetch comparison in these results')"),
    new_markdown_cell("## Skipped, failed and invalid"),
    new_code_cell("display(sources.status_rows(summary))\n"
                  "invalid = summary[(summary['status'] == 'ok') & (summary['valid'] == False)]\n"
                  "invalid[['model', 'label', 'metric', 'n', 'cv', 'measured_s']]"),
])

regression = new_notebook(cells=[
    new_markdown_cell("# Baseline vs candidate\n\nThe verdicts are those of `python -m bench compare` "
                      "(one-sided Mann-Whitney U and a Hodges-Lehmann ratio larger than the factor)."),
    new_code_cell("# Parameters (or set BENCH_BASELINE / BENCH_CANDIDATE); relative paths are from the repository root\n"
                  "BASELINE = 'results/ci-baseline'\nCANDIDATE = 'results/ci-baseline'\n"
                  f"METRICS = {DEFAULT_METRICS!r}  # compare's defaults\n"
                  "ALPHA, FACTOR = 0.01, 1.10",
                  metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP + SHOW + "\nfrom bench.analysis import compare_figures\n"
                  "from bench.analysis.compare import compare_runs, load_rows, load_runs\n"
                  "base = load_runs(repo_path(os.environ.get('BENCH_BASELINE', BASELINE)))\n"
                  "cand_rows = load_rows(repo_path(os.environ.get('BENCH_CANDIDATE', CANDIDATE)))  # skipped, failed too\n"
                  "cand = load_runs(repo_path(os.environ.get('BENCH_CANDIDATE', CANDIDATE)))\n"
                  "if (base['weights'] == 'random').any() or (cand['weights'] == 'random').any():\n"
                  "    display(Markdown('**weights=random**: timings are real (shapes decide time); text is meaningless.'))\n"
                  "metrics = [m for m in METRICS if m in base.columns and m in cand.columns]\n"
                  "verdicts = pd.DataFrame(compare_runs(base, cand, metrics, ALPHA, FACTOR, cand_rows=cand_rows))\n"
                  "verdicts[['model', 'variant', 'engine', 'cache_state', 'metric', 'baseline_median', "
                  "'candidate_median', 'ratio', 'p_value', 'status', 'reason']] if len(verdicts) else verdicts"),
    new_markdown_cell("## Ratios (candidate / baseline), coloured by verdict"),
    new_code_cell("show(compare_figures.fig_ratios(verdicts, FACTOR), 'no result in both directories')\n"
                  "status = verdicts['status'] if len(verdicts) else pd.Series(dtype=str)\n"
                  "print('verdict:', 'regression' if (status == 'regression').any() else "
                  "'missing' if (status == 'missing').any() else "
                  "'inconclusive' if (status == 'inconclusive').any() or status.empty else 'pass')"),
    new_markdown_cell("## Per-run samples side by side"),
    new_code_cell("for metric in metrics[:2]:\n"
                  "    show(compare_figures.fig_samples(base, cand, metric), f'{metric}: no result in both directories')"),
])

for nb in (compare, regression):
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
(ROOT / "notebooks").mkdir(exist_ok=True)
nbformat.write(compare, ROOT / "notebooks" / "compare_variants.ipynb")
nbformat.write(regression, ROOT / "notebooks" / "regression.ipynb")
print("wrote notebooks/compare_variants.ipynb, notebooks/regression.ipynb")
