"""The run report: ``report.html`` (self-contained, charts inline: opens offline) and ``report.md``
(charts beside it in ``report_files/``) in the run folder.

Everything comes from the execution record and the steps' outputs in S3 (embedded or real), so a
report can be made again at any time (``flanops report RUN_OR_EXECUTION``), cached steps included:
their outputs are the earlier execution's, where the record's properties point.
Charts are drawn with matplotlib; the pages are Jinja2 templates (HTML autoescaped).
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from stepkit.metrics import mention_spans, stated_facts, unexplained_runs

from .errors import FlanopsError
from .files import write_text_atomic
from .stepgraph import StepGraph
from .runfacts import FINETUNED, RunFacts, Variant, collect, run_definition
from .tables import GATE

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_FILES = "report_files"
DIALOGUE_PREVIEW_CHARS = 600
ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
VARIANT_COLUMNS = ("variant", "method", *ROUGE_COLUMNS, "all facts right", "repeating", "parameters", "size MB",
                   "compression", "p50 ms", "p95 ms", "vs base", "MFLOP/token")
STATUS_COLORS = {"Succeeded": "#4caf50", "Failed": "#e53935", "Stopped": "#fb8c00", "Executing": "#1e88e5",
                 "Starting": "#1e88e5", "cached": "#a5d6a7", "skipped": "#b0bec5", "not run": "#e0e0e0"}


# ----------------------------------------------------------------------------- charts
def pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on servers, CI or Studio's kernel
    import matplotlib.pyplot as plt

    return plt


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def graph_chart(graph: StepGraph, steps: list[dict]) -> bytes:
    """The pipeline graph, each step colored by its status with its duration (``steps``: RunFacts.steps)."""
    plt = pyplot()
    from matplotlib.patches import FancyBboxPatch

    depth: dict[str, int] = {}
    for name in graph.order():
        depth[name] = 1 + max((depth[d] for d in graph.dependencies(name) if d in depth), default=-1)
    columns: dict[int, list[str]] = {}
    for name, level in depth.items():
        columns.setdefault(level, []).append(name)
    position = {name: (level, -row + (len(names) - 1) / 2) for level, names in columns.items()
                for row, name in enumerate(names)}
    by_name = {s["name"]: s for s in steps}
    height = max(len(names) for names in columns.values())
    figure, axes = plt.subplots(figsize=(2.3 * len(columns), 1.1 * height + 0.8))
    for name in position:
        for dependency in graph.dependencies(name):
            if dependency in position:
                (x0, y0), (x1, y1) = position[dependency], position[name]
                axes.annotate("", xy=(x1 - 0.42, y1), xytext=(x0 + 0.42, y0),
                              arrowprops={"arrowstyle": "->", "color": "#757575", "lw": 1})
    for name, (x, y) in position.items():
        step = by_name[name]
        look = "skipped" if step.get("skipped") else "cached" if step["cached"] else step["status"]
        color = STATUS_COLORS.get(look, "#e0e0e0")
        axes.add_patch(FancyBboxPatch((x - 0.42, y - 0.3), 0.84, 0.6, boxstyle="round,pad=0.02",
                                      facecolor=color, edgecolor="#424242"))
        detail = step["status"] if step["seconds"] is None else f"{step['seconds']:.1f} s"
        if step.get("skipped"):
            detail = "skipped, " + detail
        if step["cached"]:
            detail += " (cached)"
        axes.text(x, y + 0.08, name, ha="center", va="center", fontsize=8, weight="bold")
        axes.text(x, y - 0.14, detail, ha="center", va="center", fontsize=7)
    axes.set_xlim(-0.6, len(columns) - 0.4)
    axes.set_ylim(-height / 2 - 0.1, height / 2 + 0.1)
    axes.axis("off")
    kinds = ("Succeeded", "cached", "skipped", "Failed", "not run")
    handles = [plt.Rectangle((0, 0), 1, 1, color=STATUS_COLORS[k]) for k in kinds]
    axes.legend(handles, [k.lower() for k in kinds], loc="upper center", ncol=len(kinds), fontsize=7,
                frameon=False, bbox_to_anchor=(0.5, 1.08))
    return png(figure)


def curves_chart(curves: dict[str, dict]) -> bytes:
    """Training loss per step (and validation loss where evaluated), one panel per training."""
    plt = pyplot()
    figure, panels = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.4), squeeze=False)
    for axes, (label, document) in zip(panels[0], curves.items()):
        points = document.get("curve", [])
        train = [(p["step"], p["loss"]) for p in points if "loss" in p and "step" in p]
        evaluation = [(p["step"], p["eval_loss"]) for p in points if "eval_loss" in p and "step" in p]
        if train:
            axes.plot(*zip(*train), label="train loss", color="#1e88e5")
        if evaluation:
            axes.plot(*zip(*evaluation), "o-", label="validation loss", color="#e53935")
        axes.set_title(f"{label}: {document.get('loss', 'cross-entropy')} loss")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)


def variants_chart(variants: list[Variant]) -> bytes:
    """ROUGE-L, weights size and p95 latency of every variant, side by side."""
    plt = pyplot()
    names = [v.name for v in variants]
    colors = ["#ff9800" if v.selected else "#90a4ae" for v in variants]
    panels = [("ROUGE-L (F1)", "rougeL", 1), ("weights (MB)", "weights_bytes", 1e-6), ("p95 latency (ms)", "latency_p95_ms", 1)]
    figure, axes_row = plt.subplots(1, 3, figsize=(12, 3.2))
    for axes, (title, key, scale) in zip(axes_row, panels):
        values = [v.metrics.get(key, 0) * scale for v in variants]
        bars = axes.bar(names, values, color=colors)
        axes.bar_label(bars, fmt="%.3g", fontsize=7)
        axes.set_title(title)
        axes.tick_params(axis="x", rotation=30, labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle("orange: the variant the gate judged and the pipeline registers", fontsize=9)
    figure.tight_layout()
    return png(figure)


def tradeoff_chart(facts: RunFacts) -> bytes:
    return png(tradeoff_figure(facts)[0])


def tradeoff_figure(facts: RunFacts):
    """Quality vs latency: every variant, the gate's thresholds, the chosen variant marked.

    Returns (figure, point labels); the labels are placed so that none overlaps another or a point.
    """
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    thresholds = (facts.gate or {}).get("thresholds") or {}
    latencies = [v.metrics["latency_p95_ms"] for v in facts.variants if "latency_p95_ms" in v.metrics]
    points, labels = [], []
    for variant in facts.variants:
        if "latency_p95_ms" not in variant.metrics:
            continue
        x, y = variant.metrics["latency_p95_ms"], variant.metrics["rougeL"]
        size = 220 if variant.selected else 60
        axes.scatter([x], [y], s=size, marker="*" if variant.selected else "o",
                     color="#ff9800" if variant.selected else "#546e7a", zorder=3,
                     label="registered" if variant.selected else None)
        points.append((x, y, size))
        labels.append(axes.annotate(variant.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8,
                                    arrowprops={"arrowstyle": "-", "color": "#9e9e9e", "lw": 0.6, "shrinkA": 0,
                                                "shrinkB": 4}))
    finetuned = next((v for v in facts.variants if v.name == FINETUNED), None)
    # The gate's conditions on the two axes' metrics (or on the y metric's drop vs the fine-tuned model) as lines.
    x_limits = []
    for condition in GATE:
        threshold = thresholds.get(condition.parameter)
        if threshold is None:
            continue
        if condition.metric == "rougeL":
            axes.axhline(float(threshold), color="#e53935", ls="--", lw=1,
                         label=f"{condition.parameter} {float(threshold):.2f}")
        elif condition.metric == "rougeL_drop" and finetuned:
            axes.axhline(finetuned.metrics["rougeL"] - float(threshold), color="#8e24aa", ls=":", lw=1,
                         label=f"fine-tuned − {condition.parameter} {float(threshold):.2f}")
        elif condition.metric == "latency_p95_ms":
            x_limits.append(float(threshold))
            axes.axvline(float(threshold), color="#e53935", ls="-.", lw=1, label=f"{condition.parameter} {float(threshold):g}")
    if latencies:
        axes.set_xscale("log")   # the latency limit is often far from the measured figures
        right = max([*latencies, *x_limits]) * 1.6
        axes.set_xlim(min(latencies) / 1.6, right)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))   # 1000, not 10³
        axes.xaxis.set_minor_formatter(NullFormatter())
    top = max((v.metrics.get("rougeL", 0) for v in facts.variants), default=1)
    axes.set_ylim(top=top + 0.08)   # room for the labels above the highest point
    axes.set_xlabel("p95 latency at batch 1 (ms, log scale)")
    axes.set_ylabel("ROUGE-L (F1)")
    axes.set_title("quality vs latency; pass: above the red dashed line, left of the red dash-dot line")
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))   # outside: it never hides a label
    place_labels(figure, axes, labels, points)
    return figure, labels


def label_box(label, renderer):
    """Where a point's label is drawn, in pixels: its text only (an Annotation's own extent includes its line)."""
    from matplotlib.text import Text

    return Text.get_window_extent(label, renderer)


LABEL_STEP_POINTS = 11   # how far a label moves per try when the spots beside its point are taken


def place_labels(figure, axes, labels: list, points: list[tuple[float, float, float]]) -> None:
    """Put each point's label (an annotation in offset points) on the first free spot: beside the point
    (upper right, lower right, upper left, lower left), else further above or below, with a line to it.

    Free: its box overlaps no label placed before it and no point's marker. Labels go in order of
    height, so neighbours take spots on their own side first.
    """
    from matplotlib.transforms import Bbox

    figure.canvas.draw()   # extents need a renderer and the final axis limits
    renderer = figure.canvas.get_renderer()
    pixels_per_point = figure.dpi / 72
    taken = []
    for x, y, size in points:   # a marker of area ``size`` (points²) is about sqrt(size) points across
        cx, cy = axes.transData.transform((x, y))
        radius = (size ** 0.5) / 2 * pixels_per_point
        taken.append(Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius))
    beside = [(6, 6), (6, -14), (-6, 6), (-6, -14)]
    further = [(6, sign * (6 + step * LABEL_STEP_POINTS)) for step in range(1, 30) for sign in (1, -1)]
    for label in sorted(labels, key=lambda label: label.xy[1]):
        for dx, dy in beside + further:
            label.xyann = (dx, dy)
            label.set_horizontalalignment("left" if dx > 0 else "right")
            box = label_box(label, renderer)
            if not any(box.overlaps(other) for other in taken):
                break
        taken.append(box)


def draw_charts(facts: RunFacts) -> dict[str, bytes]:
    charts = {"pipeline": graph_chart(facts.graph, facts.steps)}
    if facts.curves:
        charts["training_curves"] = curves_chart(facts.curves)
    if facts.variants:
        charts["variants"] = variants_chart(facts.variants)
        charts["quality_vs_latency"] = tradeoff_chart(facts)
    return charts


# ----------------------------------------------------------------------------- pages
def variant_rows(facts: RunFacts) -> list[dict[str, str]]:
    """The variants table's cells, formatted once for both pages."""
    def number(value, fmt):
        return "" if value is None else format(value, fmt)

    rows = []
    for v in facts.variants:
        m = v.metrics
        flops = m.get("flops_per_generated_token")
        recorded = m.get("facts_recorded", 1) and "facts_all_right" in m   # older evaluations lack the flag
        rows.append({
            "variant": v.name + (" ★" if v.selected else ""), "method": v.method,
            **{column: number(m.get(column) and 100 * m[column], ".1f") for column in ROUGE_COLUMNS},
            "all facts right": percent(m["facts_all_right"]) if recorded else "–",
            "repeating": percent(m.get("repetition_rate")),
            "parameters": number(m.get("parameters") and m["parameters"] / 1e6, ".2f") + "M",
            "size MB": number(m.get("weights_bytes") and m["weights_bytes"] / 1e6, ".2f"),
            "compression": number(m.get("compression_ratio"), ".2f") + "×",
            "p50 ms": number(m.get("latency_p50_ms"), ".1f"), "p95 ms": number(m.get("latency_p95_ms"), ".1f"),
            "vs base": number(m.get("latency_ratio"), ".2f") + ("×" if m.get("latency_ratio") is not None else ""),
            "MFLOP/token": number(flops and flops / 1e6, ".2f") or "n/a",
        })
    return rows


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def readable(value: Any) -> str:
    """A data card value as a person reads it: ``{"train": 3, "test": 1}`` → ``train 3, test 1``."""
    if isinstance(value, dict):
        return ", ".join(f"{key.replace('_', ' ')} {readable(item)}" if not isinstance(item, dict)
                         else f"{key.replace('_', ' ')} ({readable(item)})" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(readable(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def data_card_rows(card: dict | None) -> list[tuple[str, str]]:
    """prepare_data.py's data card as (field, value) rows: one per split where a field holds a figure per split."""
    if not card:
        return []
    source = dict(card.get("source") or {})
    rows = [("source", f"{source.pop('kind', '')} {source.pop('input', '')}".strip())]
    rows += [(f"source: {key.replace('_', ' ')}", readable(value)) for key, value in source.items()]
    rows += [("examples", readable(card.get("counts", {}))), ("seed", readable(card.get("seed", ""))),
             ("prompt template", card.get("prompt_template", "").replace("\n", " ⏎ ")),
             ("max source / target tokens", f"{card.get('max_source_length')} / {card.get('max_target_length')}")]
    tokenizer = card.get("tokenizer")
    if isinstance(tokenizer, dict):
        rows.append(("token counts", f"{tokenizer.get('name')}: {tokenizer.get('unit')}"))
    for split, sides in (card.get("token_lengths") or {}).items():
        for side, stats in sides.items():
            rows.append((f"{split} {side} tokens", readable(stats)))
    truncated = card.get("truncated") or {}
    if truncated:
        rows.append(("truncated (source / target)", ", ".join(
            f"{split} {cut.get('source', 0)} / {cut.get('target', 0)}" for split, cut in truncated.items())))
    shown = {"source", "counts", "seed", "prompt_template", "max_source_length", "max_target_length", "tokenizer",
             "token_lengths", "truncated"}
    rows += [(key.replace("_", " "), readable(value)) for key, value in card.items() if key not in shown]
    return [(key, value) for key, value in rows if value not in ("None", "None / None", "")]


def fact_marks(prediction: str, facts: dict | None) -> list[dict]:
    """Each recorded fact value and whether ``prediction`` states it (a name of ``speakers`` each on its own)."""
    return [{"slot": slot, "value": value, "stated": stated}
            for slot, values in stated_facts(prediction, facts or {}).items() for value, stated in values]


def dialogue_segments(dialogue: str, marks: list[dict]) -> list[tuple[str, str | None]]:
    """``dialogue`` cut into (text, mark): mark is "stated" or "missing" where the text is a fact value that the
    summary states or leaves out (or states wrongly), None elsewhere."""
    state = {mark["value"].lower(): "stated" if mark["stated"] else "missing" for mark in marks}
    segments, at = [], 0
    for start, end in mention_spans(dialogue, [mark["value"] for mark in marks]):
        segments += [(dialogue[at:start], None), (dialogue[start:end], state.get(dialogue[start:end].lower()))]
        at = end
    segments.append((dialogue[at:], None))
    return [(text, mark) for text, mark in segments if text]


def sample_rows(facts: RunFacts) -> list[dict]:
    """Sample predictions; the registered model's with its facts marked (in the dialogue too) and its repetitions."""
    chosen = (facts.gate or {}).get("variant") or FINETUNED
    column = "prediction" if chosen == FINETUNED else f"{chosen}_prediction"
    rows = []
    for row in facts.predictions:
        dialogue = row["dialogue"]
        if len(dialogue) > DIALOGUE_PREVIEW_CHARS:
            dialogue = dialogue[:DIALOGUE_PREVIEW_CHARS] + " …"
        prediction = row.get(column, row.get("prediction", ""))
        marks = fact_marks(prediction, row.get("facts"))
        rows.append({"id": row.get("id", ""), "dialogue": dialogue, "segments": dialogue_segments(dialogue, marks),
                     "reference": (row.get("references") or [""])[0],
                     "base": row.get("baseline_prediction", ""), "finetuned": row.get("prediction", ""),
                     "chosen_name": chosen, "chosen": prediction, "facts": marks,
                     "wrong": [mark for mark in marks if not mark["stated"]],
                     "repeats": unexplained_runs(prediction, row.get("references") or [])})
    return rows


def page_context(facts: RunFacts, images: dict[str, str]) -> dict:
    gate = facts.gate or {}
    return {"facts": facts, "images": images, "variant_rows": variant_rows(facts),
            "variant_columns": list(VARIANT_COLUMNS),
            "data_card": data_card_rows(facts.data_card), "samples": sample_rows(facts),
            "verdict": {True: "PASSED", False: "FAILED", None: "not reached"}[gate.get("passed")] if gate else None,
            "total_seconds": sum(s["seconds"] or 0 for s in facts.steps)}


def templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("flanops.pipelines", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(["html", "html.j2"]), trim_blocks=True, lstrip_blocks=True)


def write_report(facts: RunFacts, run_dir: Path) -> Path:
    """Write report.html, report.md and report_files/ into ``run_dir``; returns the HTML's path.

    Each file appears complete or not at all (temporary sibling, then rename).
    """
    import shutil
    import tempfile

    charts = draw_charts(facts)
    environment = templates()
    inline = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in charts.items()}
    html = environment.get_template("report.html.j2").render(**page_context(facts, inline))
    markdown = environment.get_template("report.md.j2").render(
        **page_context(facts, {name: f"{REPORT_FILES}/{name}.png" for name in charts}))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
        try:
            staging.chmod(0o755)   # mkdtemp's 0700 would hide the charts from whoever may read the report
            for name, data in charts.items():
                (staging / f"{name}.png").write_bytes(data)
            old = run_dir / REPORT_FILES
            if old.exists():
                shutil.rmtree(old)
            os.replace(staging, old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for name, text in ((REPORT_MD, markdown), (REPORT_HTML, html)):
            write_text_atomic(run_dir / name, text)
    except OSError as err:
        raise FlanopsError(f"cannot write the report into {run_dir}: {err.strerror or err} "
                           "(a full disk or a read-only folder?)") from None
    return run_dir / REPORT_HTML


def report_run(session, record: dict, definition: dict | None = None) -> Path:
    """Collect and write the report of one execution into its run folder (``record["RunDir"]``)."""
    facts = collect(session, record, definition if definition is not None else run_definition(record))
    return write_report(facts, Path(record["RunDir"]))

