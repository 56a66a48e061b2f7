"""results.json, BENCHMARKS.md and its charts (PNG files beside it) from a run's results.

The charts are drawn with the run report's matplotlib helpers (flanops.pipelines.report.pyplot/png).
Files are written to temporary names and renamed, results.json last: an interrupted run
leaves no results.json, and never one that looks complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

RESULTS = "results.json"
MARKDOWN = "BENCHMARKS.md"


def write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write(results: dict, out: Path) -> None:
    out = Path(out)
    lines = markdown(results, out)
    write_atomic(out / MARKDOWN, ("\n".join(lines) + "\n").encode("utf-8"))
    write_atomic(out / RESULTS, (json.dumps(results, indent=2) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- formatting
def mb(value: float | int | None) -> str:
    return "–" if value is None else f"{value / 1e6:,.1f} MB"


def stat(figure: dict | None) -> str:
    """Median (min–max) with its unit."""
    if not figure:
        return "–"
    return f"{figure['median']:,.4g} ({figure['min']:,.4g}–{figure['max']:,.4g}) {figure['unit']}"


def times(figure: dict | None) -> str:
    """A ratio in bold, with the range of its per-round ratios."""
    if not figure:
        return "–"
    text = f"**{figure['value']:.2f}x**"
    if figure.get("per_round_min") is not None:
        text += f" ({figure['per_round_min']:.2f}–{figure['per_round_max']:.2f})"
    return text


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows], ""]


def get(figure: dict | None, key: str = "value") -> Any:
    return None if figure is None else figure.get(key)


# ----------------------------------------------------------------------------- charts
def chart(out: Path, name: str, title: str, draw: Callable[[Any], Any]) -> list[str]:
    """Draw a chart into ``out/name`` (``draw(plt)`` returns the figure); the Markdown that shows it."""
    from flanops.pipelines.report import png, pyplot

    write_atomic(out / name, png(draw(pyplot())))
    return [f"![{title}]({name})", ""]


def bars(axes, labels: list[str], figures: list[dict | None], ylabel: str, title: str, scale: float = 1.0) -> None:
    """Bars at each figure's median (or value), whiskers from min to max when there is a spread."""
    heights, low, high = [], [], []
    for figure in figures:
        middle = (get(figure, "median") if figure and "median" in figure else get(figure)) or 0
        heights.append(middle / scale)
        low.append((middle - figure["min"]) / scale if figure and "min" in figure else 0)
        high.append((figure["max"] - middle) / scale if figure and "max" in figure else 0)
    axes.bar(range(len(labels)), heights, yerr=[low, high], capsize=3, color="#5c8ecb")
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)


def grid(plt, rows: int, columns: int):
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    return figure, axes


# ----------------------------------------------------------------------------- the page
def markdown(results: dict, out: Path) -> list[str]:
    machine, versions = results["machine"], results["versions"]
    lines = [f"# flanops benchmarks ({results['mode']})", "",
             f"Run {results['started']} in {results['wall_seconds']:.0f} s: `{results.get('command') or 'flanops bench'}`.",
             f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable of {machine['cores']} cores, "
             f"{machine['torch_threads']} torch threads, {machine.get('memory_gib')} GiB; "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".", "",
             "Models have the real Flan-T5 dimensions and random weights (sizes and speed do not depend on the "
             "weights). Timings: the sides of each comparison run in one process after warm-up, interleaved and "
             "repeated; cells show the median (min–max) and ratios of medians in bold (range of the per-round "
             "ratios). Every figure with its unit is in `results.json`.", ""]
    lines += ["## Targets", ""]
    rows = [[t["description"], "–" if t["measured"] is None else f"{t['measured']:,.4g} {t['unit']}",
             f"{t['comparison']} {t['threshold']:g} {t['unit']}",
             {True: "met", False: "**missed**", None: "not measured"}[t["met"]]] for t in results["targets"]]
    lines += table(["target", "measured", "threshold", "result"], rows) if rows else ["No targets measured.", ""]
    for name, section in results["sections"].items():
        lines += [f"## {section['title']}", ""]
        if section["status"] != "ok":
            lines += [f"**Failed**: {section['error']}", ""]
            continue
        lines += RENDERERS[name](section["figures"], results["settings"], out)
        lines += [f"- {note}" for note in section.get("notes", [])] + ([""] if section.get("notes") else [])
        lines += [f"_{section['seconds']:.0f} s_", ""]
    return lines


def runs_on(side: dict) -> str:
    """What generates, on how many threads: "ctranslate2, 1 thread"."""
    return f"{side['runtime']}, {side['threads']} thread{'s' if side['threads'] != 1 else ''}"


def rss(side: dict) -> str:
    """Peak RSS with the RSS before loading (the interpreter and libraries) beside it."""
    figure = side.get("peak_rss")
    return "–" if figure is None else f"{mb(figure['value'])} ({mb(figure['rss_before_load_bytes'])} before load)"


def side_charts(plt, runs: list[dict], sides_of: Callable[[dict], dict], settings: dict):
    """Weights, latency, throughput and peak RSS of every side, one row of panels per model."""
    figure, axes = grid(plt, len(runs), 4)
    for row, run in enumerate(runs):
        sides = sides_of(run)
        names = list(sides)
        bars(axes[row][0], names, [sides[n]["weights_bytes"] for n in names], "MB", f"{run['model']['name']}: weights", 1e6)
        bars(axes[row][1], names, [sides[n]["latency_batch1"] for n in names], "ms", "latency, batch 1")
        bars(axes[row][2], names, [sides[n]["throughput"] for n in names], "tokens/s",
             f"throughput, batch {settings['throughput_batch']}")
        bars(axes[row][3], names, [sides[n].get("peak_rss") for n in names], "MB", "peak RSS", 1e6)
    figure.tight_layout()
    return figure


def quantization(figures: dict, settings: dict, out: Path) -> list[str]:
    lines = [f"Prompt {settings['input_tokens']} tokens, {settings['new_tokens']} generated tokens (greedy, fixed); "
             f"throughput at batch {settings['throughput_batch']}; peak RSS of a fresh process that loads the "
             "variant and generates one batch.", ""]
    for run in figures["runs"]:
        rows = []
        for variant, v in run["variants"].items():
            r = run["ratios"].get(variant, {})
            rows.append([variant, runs_on(v), mb(get(v["weights_bytes"])), times(r.get("size_smaller")),
                         stat(v["latency_batch1"]), times(r.get("latency_faster")), stat(v["throughput"]),
                         times(r.get("throughput_gain")), rss(v)])
        lines += [f"### {run['model']['name']} ({run['model']['parameters']:,} parameters)", ""]
        lines += table(["variant", "runs on", "weights", "smaller", "latency, batch 1", "faster",
                        f"throughput, batch {settings['throughput_batch']}", "gain", "peak RSS"], rows)
        threads = run["threads"]
        counts = figures["thread_counts"]
        rows = [[variant, t["runtime"], *[stat(t["latency_batch1"][str(c)]) for c in counts],
                 *[times(t["more_threads_slower"][str(c)]) for c in counts[1:]], t["fastest"]]
                for variant, t in threads["runtimes"].items()]
        lines += [f"Threads, batch 1 (why stepkit.threads runs this size on {threads['stepkit_threads']}: one thread "
                  f"below {threads['multi_thread_parameters']:,} parameters, all {threads['usable_cpus']} usable "
                  "cores above):", ""]
        lines += table(["variant", "runtime", *[f"{c} thread{'s' if c != 1 else ''}" for c in counts],
                        *[f"{c} vs {counts[0]}" for c in counts[1:]], "fastest on"], rows)

    def draw(plt):
        return side_charts(plt, figures["runs"], lambda run: run["variants"], settings)

    def draw_threads(plt):
        runs = figures["runs"]
        figure, axes = grid(plt, 1, len(runs))
        for column, run in enumerate(runs):
            labels, values = [], []
            for variant, t in run["threads"]["runtimes"].items():
                for count, timing in t["latency_batch1"].items():
                    labels.append(f"{variant}, {count}t")
                    values.append(timing)
            bars(axes[0][column], labels, values, "ms", f"{run['model']['name']}: latency by threads")
        figure.tight_layout()
        return figure

    return (lines + chart(out, "quantization.png", "Quantization", draw)
            + chart(out, "threads.png", "Latency by intra-op threads", draw_threads))


def peers(figures: dict, settings: dict, out: Path) -> list[str]:
    int8 = figures["flanops_int8"]
    lines = [f"flanops' variants and the peers on the same model, timed in the same rounds; flanops' {int8} against "
             "each peer in the first table (below 1: flanops is faster or smaller), every side against fp32 in the "
             "second.", ""]
    for run in figures["runs"]:
        lines += [f"### {run['model']['name']}", ""]
        rows = [[peer, times(r["latency"]), times(r["size"]), times(r["throughput"]), times(r.get("peak_rss"))]
                for peer, r in run["against_peers"].items()]
        lines += table([f"flanops {int8} / peer", "latency, batch 1", "weights", "throughput", "peak RSS"], rows)
        rows = []
        for name, side in run["sides"].items():
            r = run["vs_fp32"].get(name, {})
            rows.append([name, runs_on(side), mb(get(side["weights_bytes"])), times(r.get("size_smaller")),
                         stat(side["latency_batch1"]), times(r.get("latency_faster")), stat(side["throughput"]),
                         rss(side)])
        lines += table(["side", "runs on", "weights", "smaller than fp32", "latency, batch 1", "faster than fp32",
                        f"throughput, batch {settings['throughput_batch']}", "peak RSS"], rows)
        described = set()
        for name, side in run["sides"].items():
            details = side.get("details", {})
            if side["runtime"] != "transformers" and details.get("made") not in described:
                described.add(details.get("made"))
                timed = f"; {details['timed']}" if "timed" in details else ""
                lines.append(f"- {name}: {details.get('made')}{timed}")
        lines += [f"- **{peer} failed** ({error}): not measured." for peer, error in run["errors"].items()]
        lines.append("")

    def draw(plt):
        return side_charts(plt, figures["runs"], lambda run: run["sides"], settings)

    return lines + chart(out, "peers.png", "flanops and its peers", draw)


def distillation(figures: dict, settings: dict, out: Path) -> list[str]:
    shares = figures["default_shares"]
    lines = [f"Students are the teacher shrunk, before training: distill.py's default keeps {shares['encoder']:g} of the "
             f"encoder blocks and {shares['decoder']:g} of the decoder blocks (first and last included); the other "
             "rows are the shapes it was chosen against. Timed side by side with the teacher, batch 1.", ""]
    for run in figures["runs"]:
        sides, ratios = run["sides"], run["ratios"]
        teacher = sides["teacher"]
        rows = [["teacher", f"{teacher['layers']['encoder']}+{teacher['layers']['decoder']}",
                 f"{get(teacher['parameters']):,}", mb(get(teacher["weights_bytes"])), "", stat(teacher["latency_batch1"]),
                 ""]]
        for name, side in sides.items():
            if name == "teacher":
                continue
            rows.append([name + (" (distill.py's default)" if name == figures["default"] else ""),
                         f"{side['layers']['encoder']}+{side['layers']['decoder']}", f"{get(side['parameters']):,}",
                         mb(get(side["weights_bytes"])), times(ratios[name]["size_smaller"]),
                         stat(side["latency_batch1"]), times(ratios[name]["latency_faster"])])
        lines += [f"### {run['model']['name']}", ""]
        lines += table(["model", "layers (enc+dec)", "parameters", "weights", "smaller", "latency, batch 1", "faster"],
                       rows)

    def draw(plt):
        runs = figures["runs"]
        figure, axes = grid(plt, 1, len(runs))
        for column, run in enumerate(runs):
            names = list(run["sides"])
            bars(axes[0][column], [n.replace(" (", "\n(") for n in names],
                 [run["sides"][n]["latency_batch1"] for n in names], "ms", f"{run['model']['name']}: latency, batch 1")
        figure.tight_layout()
        return figure

    return lines + chart(out, "distillation.png", "Distillation", draw)


def pruning(figures: dict, settings: dict, out: Path) -> list[str]:
    lines = [f"Structured: feed-forward neurons removed in every block ({figures['importance']} importance, as "
             "prune.py ranks them without data).", ""]
    for run in figures["runs"]:
        rows = []
        for name, v in run["variants"].items():
            r = run["ratios"].get(name, {})
            rows.append([name, v.get("d_ff", run["model"]["dims"]["d_ff"]), f"{get(v['parameters']):,}",
                         mb(get(v["weights_bytes"])), times(r.get("size_smaller")), stat(v["latency_batch1"]),
                         times(r.get("latency_faster"))])
        lines += [f"### {run['model']['name']}", ""]
        lines += table(["variant", "d_ff", "parameters", "weights", "smaller", "latency, batch 1", "faster"], rows)
        u = run.get("unstructured")
        if u:
            lines += [f"Unstructured ({u['name']}, {u['scope']} magnitude; {100 * get(u['sparsity_pruned_layers']):.1f}% "
                      f"of the block weights zero): dense weights {mb(get(u['dense']['weights_bytes']))} → "
                      f"{mb(get(u['pruned']['weights_bytes']))} ({times(u['ratios']['size_smaller'])}); gzip "
                      f"{mb(get(u['dense']['weights_gzip_bytes']))} → {mb(get(u['pruned']['weights_gzip_bytes']))} "
                      f"({times(u['ratios']['gzip_size_smaller'])}). Latency {u['latency']}.", ""]
    lines += [f"Why unstructured pruning does not speed up dense kernels: {figures['unstructured_note']}", ""]

    def draw(plt):
        runs = figures["runs"]
        figure, axes = grid(plt, len(runs), 2)
        for row, run in enumerate(runs):
            names = list(run["variants"])
            v = run["variants"]
            bars(axes[row][0], names, [v[n]["weights_bytes"] for n in names], "MB", f"{run['model']['name']}: weights", 1e6)
            bars(axes[row][1], names, [v[n]["latency_batch1"] for n in names], "ms", "latency, batch 1")
        figure.tight_layout()
        return figure

    return lines + chart(out, "pruning.png", "Pruning", draw)


def lora(figures: dict, settings: dict, out: Path) -> list[str]:
    sides, r = figures["sides"], figures["ratios"]
    batch, adapter = figures["batch"], figures["lora"]
    lines = [f"{figures['model']['name']}-shaped model ({figures['model']['parameters']:,} parameters); LoRA r "
             f"{adapter['r']}, alpha {adapter['alpha']}, on {adapter['target_modules']}; {figures['optimizer']}; "
             f"batch of {batch['examples']} examples, {batch['source_tokens']} source + {batch['target_tokens']} "
             "target tokens.", ""]
    rows = []
    for kind in ("full", "lora"):
        s = sides[kind]
        rows.append([kind, f"{get(s['trainable_parameters']):,}", mb(get(s["optimizer_state_bytes"])),
                     mb(get(s["gradient_bytes"])), mb(get(s.get("peak_rss"))), stat(s["step_time"])])
    rows.append(["full / LoRA", times(r["trainable_fewer"]), times(r["optimizer_state_smaller"]), "",
                 times(r.get("peak_rss_smaller")), times(r["step_faster"])])
    lines += table(["", "trainable parameters", "optimizer state", "gradients", "peak RSS", "step time"], rows)
    finetune = figures.get("finetune")
    if finetune:
        examples = finetune["examples"]
        lines += [f"`python steps/finetune_lora.py {' '.join(finetune['arguments'])}` with its other defaults, in its own "
                  f"process, on {examples['train']} training and {examples['validation']} validation examples that all "
                  f"reach {examples['source_tokens']} source + {examples['target_tokens']} target tokens: peak RSS "
                  f"**{get(finetune['peak_rss']) / 2**30:.2f} GiB**, {get(finetune['step_time']):.1f} s per step "
                  f"(gradient checkpointing {'on' if finetune['gradient_checkpointing'] else 'off'}, evaluation batch "
                  f"{finetune['eval_batch_size']}, {get(finetune['wall']):.0f} s in all).", ""]

    def draw(plt):
        figure, axes = grid(plt, 1, 3)
        names = ["full", "lora"]
        bars(axes[0][0], names, [sides[n]["optimizer_state_bytes"] for n in names], "MB", "optimizer state", 1e6)
        bars(axes[0][1], names, [sides[n].get("peak_rss") for n in names], "MB", "peak RSS", 1e6)
        bars(axes[0][2], names, [sides[n]["step_time"] for n in names], "ms", "step time")
        figure.tight_layout()
        return figure

    return lines + chart(out, "lora.png", "LoRA vs full fine-tuning", draw)


def serving(figures: dict, settings: dict, out: Path) -> list[str]:
    latency, overhead, load, served = figures["latency"], figures["overhead"], figures["load"], figures["served"]
    lines = [f"{figures['model']['name']} {figures['variant']} served from its model.tar.gz "
             f"({mb(get(figures['artifact_bytes']))}) through code/inference.py ({served['runtime']}: "
             f"{served['threads']} thread(s) per batch, {served['workers']} batch(es) at once, largest batch formed "
             f"{served['largest_batch']} dialogues); generation parameters {json.dumps(figures['parameters'])}; "
             f"{figures['dialogues']} distinct dialogues. Client: "
             f"{figures['client']}. Bare: {figures['bare']}.", ""]
    lines += table(["batch 1", "p50", "p95", "p99", "median (min–max)"],
                   [[side, *[f"{latency[side][p]:,.4g} ms" for p in ("p50", "p95", "p99")], stat(latency[side])]
                    for side in ("endpoint", "bare")])
    lines += [f"Serving overhead: {times(overhead['ratio'])} = {get(overhead['percent']):+.2f}% over bare generation.", ""]
    rows = [[level["clients"], stat(level["throughput"]), times(load["scaling"].get(name)),
             *[f"{get(level[key]):,.4g} ms" for key in ("latency_p50", "latency_p95", "latency_p99", "latency_max")],
             get(level["requests"]), get(level["requests_per_batch"]), get(level["mismatches"])]
            for name, level in load["levels"].items()]
    lines += [f"Concurrent clients, {load['seconds_per_level']:g} s per level and round; mismatches: answers that "
              "differ from the same dialogue's answer alone:", ""]
    lines += table(["clients", "throughput", "vs first level", "latency p50", "p95", "p99", "max", "requests",
                    "requests per batch", "mismatches"], rows)

    def draw(plt):
        figure, axes = grid(plt, 1, 2)
        sides = ["endpoint", "bare"]
        bars(axes[0][0], sides, [latency[s] for s in sides], "ms", "latency per request, batch 1")
        levels = list(load["levels"].values())
        axes[0][1].errorbar([lv["clients"] for lv in levels], [lv["throughput"]["median"] for lv in levels],
                            yerr=[[lv["throughput"]["median"] - lv["throughput"]["min"] for lv in levels],
                                  [lv["throughput"]["max"] - lv["throughput"]["median"] for lv in levels]],
                            marker="o", capsize=3)
        axes[0][1].set_xscale("log", base=2)
        axes[0][1].set_ylim(bottom=0)
        axes[0][1].set_xlabel("concurrent clients")
        axes[0][1].set_ylabel("requests/s")
        axes[0][1].set_title("throughput", fontsize=9)
        figure.tight_layout()
        return figure

    return lines + chart(out, "serving.png", "Serving", draw)


def executor(figures: dict, settings: dict, out: Path) -> list[str]:
    lines = [f"The {figures['step']} job through the local executor (embedded AWS: code from S3, sandbox, outputs to "
             f"S3, execution record) vs `python steps/prepare_data.py {' '.join(figures['job_arguments'])}` by hand.", ""]
    lines += table(["executor", "by hand", "overhead", "ratio"],
                   [[stat(figures["executor"]), stat(figures["by_hand"]), f"{get(figures['overhead']):,.0f} ms",
                     times(figures["ratio"])]])
    lines += [f"Building the definition (once per run): {get(figures['definition_build']):.1f} s.", ""]

    def draw(plt):
        figure, axes = grid(plt, 1, 1)
        bars(axes[0][0], ["executor", "by hand"], [figures["executor"], figures["by_hand"]], "ms", "PrepareData job")
        figure.tight_layout()
        return figure

    return lines + chart(out, "executor.png", "Local executor overhead", draw)


RENDERERS = {"quantization": quantization, "peers": peers, "distillation": distillation, "pruning": pruning,
             "lora": lora, "serving": serving, "executor": executor}
