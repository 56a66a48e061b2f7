"""``flanops bench``: what quantization, distillation, pruning, LoRA, serving and the local executor cost and save,
and how flanops' int8 compares with CTranslate2's and ONNX Runtime's own (peers).

Each section measures with the steps' own code (stepkit) on random-weight models of the real
Flan-T5 dimensions; :mod:`.harness` holds the timing rules (same process, warm-up, interleaved,
repeated; median and spread; ratios as the headline). A run writes ``results.json`` (every
figure with its unit, the machine, versions, settings, the issue's targets met or missed) and
``BENCHMARKS.md`` with its charts, atomically, into its output folder.
"""
from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from flanops.pipelines.errors import FlanopsError
from .harness import (BenchSettings, ModelSpec, Progress, check_out_dir, machine, start_children, stop_children, target,
                      versions)

SECTIONS = ("quantization", "peers", "distillation", "pruning", "lora", "serving", "executor")
SCHEMA = "flanops-bench/1"
DEFAULT_MODELS = ("flan-t5-small", "flan-t5-base")
RUN_TIME_LIMITS = {"quick": 300.0, "full": 1800.0}   # seconds: the targets for the whole run


def resolve_models(names: list[str]) -> tuple[ModelSpec, ...]:
    """Catalog names or hub ids (flan-t5-small, google/flan-t5-base) → specs; a FlanopsError for anything else."""
    from stepkit.catalog import FAMILY, lookup

    specs = []
    for name in names:
        entry = lookup(name)
        if entry is None or entry.dims is None:
            known = ", ".join(e.name for e in FAMILY)
            raise FlanopsError(f"--models {name!r}: not a Flan-T5 size with fixed dimensions; choose from {known}")
        specs.append(ModelSpec(entry.name, entry.dims))
    if not specs:
        raise FlanopsError("--models is empty; name at least one of " + ", ".join(DEFAULT_MODELS))
    return tuple(dict.fromkeys(specs))


def resolve_sections(text: str | None) -> tuple[str, ...]:
    if not text:
        return SECTIONS
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise FlanopsError(f"--sections {text!r}: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                           f"choose from {', '.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in chosen)


def preset(mode: str, models: tuple[ModelSpec, ...], sections: tuple[str, ...]) -> BenchSettings:
    """The ``--quick`` or full settings (--quick runs the peers on the first model only). The LoRA comparison always
    uses Flan-T5-base's shape."""
    from stepkit.catalog import lookup

    base = lookup("flan-t5-base")
    lora_model = ModelSpec(base.name, base.dims)
    if mode == "quick":
        return BenchSettings(mode="quick", models=models, lora_model=lora_model, sections=sections, warmup=1,
                             repeats=3, input_tokens=64, new_tokens=8, peer_models=1, unstructured_models=1,
                             train_batch=2, train_source_tokens=64, train_target_tokens=16, finetune_steps=1,
                             finetune_validation=8, serving_inputs=4,
                             load_clients=(1, 8), load_seconds=3.0, load_repeats=2, executor_train_size=100)
    return BenchSettings(mode="full", models=models, lora_model=lora_model, sections=sections)


def run(settings: BenchSettings, out: Path, progress: Progress = print, command: str | None = None) -> dict:
    """Run the chosen sections and write results.json, BENCHMARKS.md and charts into ``out``."""
    from stepkit.threads import configure_runtime
    from . import report
    from .subjects import Workspace

    out = check_out_dir(out)
    configure_runtime()
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    progress(f"flanops bench ({settings.mode}): sections {', '.join(settings.sections)}; models "
             f"{', '.join(m.name for m in settings.models)}; writing to {out}")
    sections, targets = {}, []
    workspace = Workspace(Path(tempfile.mkdtemp(prefix="flanops-bench-")))
    if settings.memory:
        start_children()
    try:
        for name in settings.sections:
            module = importlib.import_module(f"{__name__}.{name}")
            configure_runtime()   # every section starts on the same threads, whatever the last one's libraries set
            progress(f"== {name}")
            section_started = time.perf_counter()
            try:
                result = module.run(settings, workspace, progress)
            except Exception as err:   # noqa: BLE001 - recorded, printed with its traceback, and the exit code says so
                traceback.print_exc(file=sys.stderr)
                sections[name] = {"title": module.TITLE, "status": "failed", "error": f"{type(err).__name__}: {err}",
                                  "seconds": round(time.perf_counter() - section_started, 1)}
                progress(f"{name}: FAILED ({type(err).__name__}: {err}); going on with the next section")
                continue
            sections[name] = {"title": module.TITLE, "status": "ok",
                              "seconds": round(time.perf_counter() - section_started, 1),
                              "figures": result.figures, "notes": result.notes}
            targets += result.targets
            progress(f"{name}: done in {sections[name]['seconds']:.0f} s")
    finally:
        stop_children()
        shutil.rmtree(workspace.root, ignore_errors=True)
    wall = time.perf_counter() - started
    if settings.mode in RUN_TIME_LIMITS and set(settings.sections) == set(SECTIONS):
        limit = RUN_TIME_LIMITS[settings.mode]
        targets.append(target(f"run_time.{settings.mode}", f"the {settings.mode} run under {limit / 60:g} minutes",
                              round(wall, 1), "s", limit, at_least=False))
    results = {
        "schema": SCHEMA,
        "command": command,
        "mode": settings.mode,
        "started": started_at.isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1),
        "machine": machine(),
        "versions": versions(),
        "settings": settings.card(),
        "sections": sections,
        "targets": targets,
        "failed_sections": [name for name, s in sections.items() if s["status"] != "ok"],
    }
    report.write(results, out)
    return results


def bench(quick: bool = False, models: str = "flan-t5-small,flan-t5-base", sections: str | None = None,
          out: Path | None = None) -> int:
    """``flanops bench``: run the chosen sections and print which targets were met."""
    models = resolve_models([name for name in models.split(",") if name.strip()])
    sections = resolve_sections(sections)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or Path("benchmarks") / "results" / stamp
    settings = preset("quick" if quick else "full", models, sections)
    results = run(settings, out, progress=lambda line: print(line, flush=True),
                             command=" ".join(["flanops", *sys.argv[1:]]))
    print(f"\nbenchmarks finished in {results['wall_seconds']:.0f} s")
    for item in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[item["met"]]
        measured = "–" if item["measured"] is None else f"{item['measured']:,.4g} {item['unit']}"
        print(f"  {verdict:>12}  {item['description']}: {measured} ({item['comparison']} {item['threshold']:g})")
    if results["failed_sections"]:
        print(f"failed sections: {', '.join(results['failed_sections'])} (see results.json)")
    print(f"results: {Path(out) / 'results.json'}\nreport:  {Path(out) / 'BENCHMARKS.md'}")
    return 1 if results["failed_sections"] else 0
