"""Reproduce the paper's Table IV and Figures 7-8 from the planner, roofline model and simulator.

Writes the experiment problems to peers/problems/, the plots to docs/img/planner-fig7-latency.png
and docs/img/planner-fig8-throughput.png, and the tables into docs/planner.md between the
`<!-- reproduce:begin -->` and `<!-- reproduce:end -->` markers.

    python benchmarks/reproduce_paper.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarm.planner import InfeasibleError, plan
from swarm.planner.batching import plan_batched
from swarm.planner.roofline import load_testbed, testbed, testbed_problem

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
# (row label, strategy, objective for the throughput column); latency column uses objective latency
METHODS = (
    ("Edge-Solo", "edge-solo", "latency"),
    ("Cloud-Edge-Even", "cloud-edge-even", "latency"),
    ("Cloud-Edge-Opt", "cloud-edge-opt", "cycle"),
    ("EdgeShard-Even", "even", "cycle"),
    ("EdgeShard, paper Alg. 1 (latency)", "paper-latency", None),
    ("EdgeShard objectives, exact: latency / min P", None, "throughput"),
    ("ours: cycle objective max(R/m, P)", None, "cycle"),
)
PAPER_KEY = {"Edge-Solo": "edge-solo", "Cloud-Edge-Even": "cloud-edge-even", "Cloud-Edge-Opt": "cloud-edge-opt",
             "EdgeShard, paper Alg. 1 (latency)": "edgeshard", "EdgeShard objectives, exact: latency / min P": "edgeshard"}
BANDWIDTHS = (1, 5, 10, 20, 50)
PAPER_CURVE = {"edge-solo": "Edge-Solo", "cloud-edge-even": "Cloud-Edge-Even", "cloud-edge-opt": "Cloud-Edge-Opt",
               "edgeshard": "ours (latency / cycle)"}
PAPER_SEQUENCES = 8  # the paper's throughput runs: at most 8 sequences in flight (its "batch size 8")


def options(model: str, strategy: str | None) -> dict:
    """The paper's EdgeShard-Even for 70B: the source, 10 more AGX Orin and the RTX 3090 (index 14)."""
    return {"devices": list(range(11)) + [14]} if strategy == "even" and model == "llama2-70b" else {}


def latency_ms(model: str, strategy: str | None, mbps: float) -> float | None:
    try:
        return plan(testbed(model, source_cloud_Mbps=mbps), "latency", strategy=strategy,
                    **options(model, strategy)).latency_s * 1e3
    except InfeasibleError:
        return None


def throughput(model: str, strategy: str | None, objective: str, mbps: float, grid,
               max_sequences: int | None = PAPER_SEQUENCES) -> tuple[float, int, int] | None:
    batches, inflights = grid
    try:
        best = plan_batched(lambda b, m: testbed(model, source_cloud_Mbps=mbps, b=b, m=m), batches, inflights,
                            strategy=strategy, objective=objective, max_sequences=max_sequences,
                            **options(model, strategy))
    except InfeasibleError:
        return None
    return best.tokens_per_s, best.batch, best.inflight


def table_iv(grid) -> list[dict]:
    rows = []
    paper = load_testbed().raw["paper_table_iv"]
    for label, strategy, objective in METHODS:
        row = {"method": label, "models": {}}
        for model in MODELS:
            lat = latency_ms(model, strategy, 1) if objective != "cycle" or strategy else None
            thr = throughput(model, strategy, objective, 1, grid) if objective else None
            theirs = paper[model].get(PAPER_KEY.get(label, ""), [None, None])
            row["models"][model] = {"latency_ms": lat, "throughput": thr, "paper": theirs}
        rows.append(row)
    return rows


def sweeps(grid, bandwidths) -> dict:
    out: dict = {}
    for model in MODELS:
        curves: dict = {}
        for label, strategy, objective in (("Edge-Solo", "edge-solo", "latency"),
                                           ("Cloud-Edge-Even", "cloud-edge-even", "latency"),
                                           ("Cloud-Edge-Opt", "cloud-edge-opt", "cycle"),
                                           ("EdgeShard-Even", "even", "cycle"),
                                           ("ours (latency / cycle)", None, "cycle")):
            lat = [latency_ms(model, strategy, bw) for bw in bandwidths]
            thr = [throughput(model, strategy, objective, bw, grid) for bw in bandwidths]
            curves[label] = {"latency_ms": lat, "throughput": [t[0] if t else None for t in thr]}
        out[model] = curves
    return out


def fmt(x, digits=2) -> str:
    return "OOM" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = "| method | " + " | ".join(f"{m} latency ms/token (paper) | {m} tok/s (paper) [b x m]" for m in MODELS) + " |"
    lines = [head, "|---" * (1 + 2 * len(MODELS)) + "|"]
    for row in rows:
        cells = [row["method"]]
        for model in MODELS:
            d = row["models"][model]
            p_lat, p_thr = d["paper"]
            lat = "-" if d["latency_ms"] is None and row["method"].startswith("ours") else fmt(d["latency_ms"])
            if row["method"].startswith("EdgeShard, paper Alg. 1"):
                lat = "no plan" if d["latency_ms"] is None else lat
            thr = d["throughput"]
            thr_s = "-" if thr is None and row["method"].startswith("EdgeShard, paper Alg. 1") else (
                "OOM" if thr is None else f"{thr[0]:.2f} [{thr[1]} x {thr[2]}]")
            if row["method"] not in PAPER_KEY:  # the paper has no such row
                cells += [f"{lat} (-)", f"{thr_s} (-)"]
            else:
                cells += [f"{lat} ({fmt(p_lat)})", f"{thr_s} ({fmt(p_thr)})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict, bandwidths, key: str, ylabel: str, path: Path, paper_points: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, model in zip(axes, MODELS):
        colors = {}
        for label, c in curves[model].items():
            ys = c[key]
            if all(y is None for y in ys):
                continue
            (line,) = ax.plot(bandwidths, [float("nan") if y is None else y for y in ys], marker="o", label=label)
            colors[label] = line.get_color()
        for label, value in paper_points[model].items():
            if value is not None:  # the paper's measured point, in the colour of the matching curve
                ax.scatter([1], [value], marker="x", s=80, zorder=5, color=colors.get(PAPER_CURVE[label], "black"),
                           label=f"paper: {label} @1 Mb/s")
        ax.set_title(model)
        ax.set_xlabel("source-cloud bandwidth (Mb/s)")
        ax.set_ylabel(ylabel)
        if key == "latency_ms":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_problems() -> None:
    out = ROOT / "peers" / "problems"
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        for mbps in (1, 10):
            (out / f"{model}-{mbps}mbps.json").write_text(json.dumps(testbed_problem(model, source_cloud_Mbps=mbps)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="coarser grids (for a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    grid = ((1, 8), (1, 8)) if args.quick else ((1, 2, 4, 8), (1, 2, 4, 8))
    bandwidths = (1, 10, 50) if args.quick else BANDWIDTHS
    write_problems()
    rows = table_iv(grid)
    curves = sweeps(grid, bandwidths)
    free = {m: throughput(m, None, "cycle", 1, ((1, 2, 4, 8, 16), (1, 2, 4, 8, 16)), None) for m in MODELS}
    paper = load_testbed().raw["paper_table_iv"]
    img = ROOT / "docs" / "img"
    plot(curves, bandwidths, "latency_ms", "ms/token", img / "planner-fig7-latency.png",
         {m: {k: v[0] for k, v in paper[m].items()} for m in MODELS})
    plot(curves, bandwidths, "throughput", "tokens/s (best b x m)", img / "planner-fig8-throughput.png",
         {m: {k: v[1] for k, v in paper[m].items()} for m in MODELS})
    md = markdown(rows)
    sweep_md = ["| model | method | " + " | ".join(f"{b} Mb/s" for b in bandwidths) + " |",
                "|---|---|" + "---|" * len(bandwidths)]
    for model in MODELS:
        for label, c in curves[model].items():
            sweep_md.append(f"| {model} | {label} | " + " | ".join(
                f"{fmt(l, 1)} ms / {fmt(t, 1)} tok/s" for l, t in zip(c["latency_ms"], c["throughput"])) + " |")
    free_md = ["| model | tokens/s | b (sequences per micro-batch) | m (micro-batches in flight) |", "|---|---|---|---|"]
    free_md += [f"| {m} | {fmt(t[0])} | {t[1]} | {t[2]} |" if t else f"| {m} | OOM | | |" for m, t in free.items()]
    doc = ROOT / "docs" / "planner.md"
    text = doc.read_text() if doc.exists() else "<!-- reproduce:begin -->\n<!-- reproduce:end -->\n"
    begin, end = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    block = ("\n\n_Generated by `python benchmarks/reproduce_paper.py`. Each cell: ours (paper's measured). "
             f"Throughput is the best steady decode rate (No-Bubbles) over micro-batch size b and count m "
             f"with b x m <= {PAPER_SEQUENCES} sequences in flight, as in the paper's batch size 8._\n\n"
             + md + "\n\nBandwidth sweep (Figures 7-8), latency / throughput per source-cloud bandwidth:\n\n"
             + "\n".join(sweep_md) + "\n\nBatch-size-aware planning (ours, cycle objective, b and m up to 16, "
             "no cap on sequences), 1 Mb/s:\n\n" + "\n".join(free_md) + "\n\n")
    doc.write_text(text[:a] + block + text[b:])
    if args.json:
        print(json.dumps({"table_iv": rows, "sweeps": curves, "bandwidths": list(bandwidths)}, indent=1))
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
