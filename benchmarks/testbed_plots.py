"""Figures and tables of benchmarks/testbed.py results (matplotlib: the `plots` extra).

    python benchmarks/testbed_plots.py RESULTS.json OUT_DIR     # PNGs + tables.md
    python benchmarks/testbed_plots.py --fig9 HOME.json HOMENX.json OUT_DIR   # Figure 9: the source node

Measured values are solid lines with filled markers, predictions dashed with hollow ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LATENCY = ["Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "EdgeShard-Even", "EdgeShard"]
THROUGHPUT = ["Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "EdgeShard-Even", "EdgeShard No-Bubbles",
              "ours (cycle)"]
PROFILES = ["EdgeShard (prefill profile)", "EdgeShard (decode profile)", "EdgeShard (issue-3 model)", "EdgeShard"]


def rows(results: dict, kind: str, strategy: str) -> list[tuple[float, dict]]:
    return [(s["mbit"], r) for s in results["settings"] for r in s["rows"]
            if r["kind"] == kind and r["strategy"] == strategy]


def _lines(ax, results: dict, kind: str, strategies: list[str], key: str) -> None:
    for i, name in enumerate(strategies):
        pts = rows(results, kind, name)
        if not pts:
            continue
        x = [m for m, _ in pts]
        color = f"C{i}"
        ax.plot(x, [r["measured"][key] for _, r in pts], "o-", color=color, label=f"{name} measured")
        ax.plot(x, [r["predicted"][key] for _, r in pts], "o--", color=color, mfc="none", alpha=0.7,
                label=f"{name} predicted")
    ax.set_xscale("log")
    ax.set_xlabel("source-cloud bandwidth (Mbit/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_all(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    _lines(ax, results, "latency", LATENCY, "ms_per_token")
    ax.set_ylabel("decode latency (ms/token)")
    ax.set_title("Fig. 7 analogue: latency against bandwidth")
    save(fig, "fig7_latency.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    _lines(ax, results, "throughput", THROUGHPUT, "tokens_per_s")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(f"Fig. 8 analogue: throughput against bandwidth ({results['workload'].get('sequences', 4)} sequences)")
    save(fig, "fig8_throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    _lines(ax, results, "latency", PROFILES, "ms_per_token")
    ax.set_ylabel("decode latency (ms/token)")
    ax.set_title("Fig. 10 analogue: plans from prefill and decode profiles, the issue-3 model and ours")
    save(fig, "fig10_profiles.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    settings = [s["mbit"] for s in results["settings"]]
    width = 0.2
    for j, (mode, name) in enumerate((("no-bubbles", "EdgeShard No-Bubbles"), ("bubbles", "EdgeShard Bubbles"))):
        pts = dict((m, r) for m, r in rows(results, "throughput", name))
        xs = [i + (j - 0.5) * 2 * width for i in range(len(settings))]
        ax.bar([x - width / 2 for x in xs], [pts[m]["measured"]["tokens_per_s"] if m in pts else 0 for m in settings],
               width, color=f"C{j}", label=f"{name} measured")
        ax.bar([x + width / 2 for x in xs], [pts[m]["predicted"]["tokens_per_s"] if m in pts else 0 for m in settings],
               width, color=f"C{j}", alpha=0.35, hatch="//", label=f"{name} predicted")
    ax.set_xticks(range(len(settings)), [f"{m:g} Mbit/s" for m in settings])
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title("Fig. 11 analogue: No-Bubbles against Bubbles (same plan)")
    ax.legend(fontsize=7)
    save(fig, "fig11_bubbles.png")

    busy = [(s["mbit"], r) for s in results["settings"] for r in s["rows"]
            if r["kind"] == "throughput" and r["strategy"] in ("ours (cycle)", "EdgeShard No-Bubbles")]
    if busy:
        fig, axes = plt.subplots(1, len(busy), figsize=(3.2 * len(busy), 3.4), squeeze=False)
        for ax, (mbit, r) in zip(axes[0], busy):
            k = range(len(r["devices"]))
            ax.bar([i - 0.2 for i in k], r["measured"]["busy_share"], 0.4, label="measured")
            ax.bar([i + 0.2 for i in k], r["predicted"]["busy_share"], 0.4, alpha=0.4, hatch="//", label="predicted")
            ax.set_xticks(list(k), r["devices"])
            ax.set_ylim(0, 1)
            ax.set_title(f"{r['strategy']}\n{mbit:g} Mbit/s", fontsize=8)
        axes[0][0].set_ylabel("busy share")
        axes[0][0].legend(fontsize=7)
        save(fig, "busy_share.png")
    (out / "tables.md").write_text(table_iv(results) + "\n" + tables(results))
    written.append(out / "tables.md")
    return written


def table_iv(results: dict) -> str:
    """Table IV's layout at the first setting: latency and throughput per strategy, predicted / measured."""
    s = results["settings"][0]
    pick = {(r["strategy"], r["kind"]): r for r in s["rows"]}
    lines = [f"source-cloud {s['mbit']:g} Mbit/s; latency = decode ms/token of one sequence, "
             f"throughput = tokens/s with {results['workload'].get('sequences', 4)} sequences in flight", "",
             "| strategy | latency predicted | latency measured | throughput predicted | throughput measured |",
             "|---|---|---|---|---|"]
    for name, tput in (("Edge-Solo", "Edge-Solo"), ("Cloud-Edge-Even", "Cloud-Edge-Even"),
                       ("Cloud-Edge-Opt", "Cloud-Edge-Opt"), ("EdgeShard", "EdgeShard No-Bubbles")):
        lat, thr = pick.get((name, "latency")), pick.get((tput, "throughput"))
        lines.append(f"| {name} | {lat['predicted']['ms_per_token']:.0f} | {lat['measured']['ms_per_token']:.0f} | "
                     f"{thr['predicted']['tokens_per_s']:.2f} | {thr['measured']['tokens_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def tables(results: dict) -> str:
    """Markdown: per setting, every strategy with predicted, measured, the difference, load, throttling."""
    lines = []
    for s in results["settings"]:
        lines += [f"**source-cloud {s['mbit']:g} Mbit/s**", "",
                  "| strategy | plan | predicted | measured | diff | load | throttled (per device) |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            if r["kind"] == "latency":
                p, m, unit = r["predicted"]["ms_per_token"], r["measured"]["ms_per_token"], "ms/token"
                name = r["strategy"] + " (latency)"
            else:
                p, m, unit = r["predicted"]["tokens_per_s"], r["measured"]["tokens_per_s"], "tok/s"
                name = r["strategy"] + " (throughput)"
            fmt = "{:.0f}" if unit == "ms/token" else "{:.2f}"
            throttled = ", ".join(f"{n} {v:.0%}" for n, v in r["throttled_share"].items())
            lines.append(f"| {name} | {r['plan']} | {fmt.format(p)} {unit} | {fmt.format(m)} {unit} | "
                         f"{m / p - 1:+.0%} | {r['load']:.1f} | {throttled} |")
        lines.append("")
    return "\n".join(lines)


FIG9 = ["Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "EdgeShard"]


def plot_fig9(sources: dict[str, dict], out: Path) -> Path:
    """The paper's Figure 9 (impact of the source node): latency and throughput of each strategy
    at the first setting of each run (the same devices, another one as the source); a strategy
    with no plan (the source cannot hold its part: the paper's OOM) is marked so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(sources)
    for ax, (kind, key, label) in zip(axes, (("latency", "ms_per_token", "decode latency (ms/token)"),
                                           ("throughput", "tokens_per_s", "throughput (tokens/s)"))):
        for k, (source, results) in enumerate(sources.items()):
            labelled = False  # the first bar drawn carries the label (a source's first strategy may be OOM)
            setting = results["settings"][0]
            pick = {r["strategy"]: r for r in setting["rows"] if r["kind"] == kind}
            for i, name in enumerate(FIG9):
                row = pick.get(name if kind == "latency" or name != "EdgeShard" else "EdgeShard No-Bubbles")
                x = i + (k - (len(sources) - 1) / 2) * width
                if row is None:
                    ax.text(x, 0, "OOM", ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                ax.bar(x, row["measured"][key], width, color=f"C{k}", label=None if labelled else f"source {source} measured")
                labelled = True
                ax.plot([x - width / 2, x + width / 2], [row["predicted"][key]] * 2, "k--", lw=1,
                        label="predicted" if i == 0 and k == 0 else None)
        ax.set_xticks(range(len(FIG9)), FIG9, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    mbit = next(iter(sources.values()))["settings"][0]["mbit"]
    fig.suptitle(f"Fig. 9 analogue: the source node (source-cloud {mbit:g} Mbit/s)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fig9_source_node.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SOURCE_LIKE = {"home": "AGX-like", "homenx": "NX-like"}  # each scenario's source board


if __name__ == "__main__":
    if sys.argv[1] == "--fig9":
        runs = [json.loads(Path(f).read_text()) for f in sys.argv[2:-1]]
        print(plot_fig9({SOURCE_LIKE.get(r["scenario"], r["scenario"]): r for r in runs}, Path(sys.argv[-1])))
        sys.exit(0)
    for path in plot_all(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])):
        print(path)
