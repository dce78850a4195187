"""`coati report RUN_DIR`: a run's curves as one PNG and an HTML page beside it.

RUN_DIR is a `--save_path` of `coati sft | rm | dpo | ppo` (its `run.json` names the stage) or a demo's
`--out` (`demo_summary.json`, with `sft/`, `rm/` or `dpo/`, and `ppo/` inside; the page adds the gold
score before and after). Curves come from the run's TensorBoard event files (`--report_to` includes
tensorboard by default). The PNG carries its panel titles as text metadata (`coati:panels`), so a
test or a script can check what it shows without looking.

    save_path/report.png   the panels, a grid of 4 columns
    save_path/report.html  the same picture, the run's id, stage, steps and each curve's last value
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from coati_ray.errors import ConfigError

# stage -> panels: (title, [metric keys drawn in it]); a panel none of whose keys was logged is left out
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [("loss", ["train/loss", "eval/loss"]), ("learning rate", ["train/lr"]),
            ("tokens/s", ["perf/tokens_per_s"])],
    "rm": [("loss", ["train/loss", "eval/loss"]), ("accuracy", ["train/acc", "eval/accuracy"]),
           ("margin", ["train/margin", "eval/margin"])],
    "dpo": [("loss", ["train/loss", "eval/loss"]), ("accuracy", ["train/rewards/accuracy", "eval/rewards/accuracy"]),
            ("margin", ["train/rewards/margin", "eval/rewards/margin"])],
    "ppo": [("reward", ["reward/mean"]), ("KL to the reference", ["kl/mean"]), ("policy loss", ["policy/loss"]),
            ("value loss", ["value/loss"]), ("response length (tokens)", ["response/length"]),
            ("clip fraction", ["policy/clipfrac", "value/clipfrac"]), ("samples/s", ["perf/samples_per_s"])],
}
DEMO_PARTS = ("sft", "rm", "dpo", "ppo")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's `tensorboard/` event files: key -> [(step, value)] in step order."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its INFO lines about reading files are not ours
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted({e.step: e.value for e in acc.Scalars(tag)}.items()) for tag in acc.Tags()["scalars"]}


def _run(run_dir: Path) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    if not (run_dir / "tensorboard").is_dir():
        raise ConfigError("report", f"{run_dir} has no tensorboard/ (the run was made with --report_to without "
                          "tensorboard): nothing to plot")
    return {"dir": run_dir, "stage": meta["stage"], "run_id": meta["run_id"], "scalars": read_scalars(run_dir)}


def load_runs(run_dir: str | Path) -> tuple[list[dict], dict | None]:
    """(runs, demo summary or None) of RUN_DIR."""
    path = Path(run_dir)
    if (path / "demo_summary.json").exists():
        summary = json.loads((path / "demo_summary.json").read_text())
        return [_run(path / p) for p in DEMO_PARTS if (path / p / "run.json").exists()], summary
    if (path / "run.json").exists():
        return [_run(path)], None
    raise ConfigError("report", f"{run_dir}: no run.json or demo_summary.json; expected the --save_path of "
                      "a coati sft/rm/dpo/ppo run or a demo's --out")


def panels(runs: list[dict], demo: dict | None) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {key: points}) of every panel to draw, in order."""
    out = []
    for run in runs:
        prefix = f"{run['stage'].upper()}: " if len(runs) > 1 else ""
        for title, keys in PANELS.get(run["stage"], []):
            curves = {k: run["scalars"][k] for k in keys if run["scalars"].get(k)}
            if curves:
                out.append((prefix + title, curves))
    if demo and demo.get("gold"):
        final = "ppo" if "ppo" in demo["gold"] else "dpo"
        out.append((f"gold score: sft -> {final}", {"sft": [(0, demo["gold"]["sft"])],
                                                     final: [(1, demo["gold"][final])]}))
    return out


def _draw(shown: list, title: str, png: Path, dpi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    cols = 4
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, shown):
        ax.set_title(name, fontsize=11)
        if name.startswith("gold score"):
            bars = ax.bar(list(curves), [pts[0][1] for pts in curves.values()], color=["#999999", "#2a7ab9"])
            ax.bar_label(bars, fmt="%.3f")
            ax.set_ylim(0, 1.1)
            continue
        for key, pts in curves.items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 30 else None, markersize=3,
                    label=key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi, metadata={"Title": title, "coati:panels": json.dumps([t for t, _ in shown])})
    plt.close(fig)


def write_report(run_dir: str | Path, dpi: int = 100) -> tuple[Path, Path]:
    """Write RUN_DIR/report.png and report.html; returns their paths."""
    path = Path(run_dir)
    runs, demo = load_runs(path)
    shown = panels(runs, demo)
    if not shown:
        raise ConfigError("report", f"{run_dir}: the run logged none of the curves a report shows (no steps yet?)")
    stages = " -> ".join(r["stage"] for r in runs)
    title = f"{stages}: {path.resolve().name}" + (f" (run {runs[0]['run_id']})" if len(runs) == 1 else "")
    png, page = path / "report.png", path / "report.html"
    _draw(shown, title, png, dpi)
    rows = []
    for name, curves in shown:
        for key, pts in curves.items():
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(key)}</td><td>{len(pts)}</td>"
                        f"<td>{pts[-1][1]:.4g}</td></tr>")
    runs_html = "".join(f"<li>{html.escape(r['stage'])}: <code>{html.escape(str(r['dir']))}</code> "
                        f"(run {html.escape(r['run_id'])})</li>" for r in runs)
    img = base64.b64encode(png.read_bytes()).decode()
    page.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}td,th{{padding:2px 10px;text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1><ul>{runs_html}</ul>
<img alt="curves" src="data:image/png;base64,{img}">
<h2>Last values</h2><table><tr><th>panel</th><th>metric</th><th>points</th><th>last</th></tr>{''.join(rows)}</table>
</body></html>
""", encoding="utf-8")
    return png, page
