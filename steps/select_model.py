"""Select the foundation model: fetch or build it and write it as a model folder with a card.

Where ``--model`` can point (first match wins):

  tiny                         the offline stand-in: the one shipped in stepkit/standin/ (pretrained
                               once on stepkit/pretraining.py's corpus; checked against its SHA256SUMS),
                               or with --pretrain-steps N, built and pretrained here (tens of minutes)
  flan-t5-base                 a catalog name or hub id (google/flan-t5-base): downloaded from
                               the Hugging Face Hub, or built with random weights (--random-weights)
  s3://bucket/prefix/          a save_pretrained folder in S3, or a prefix holding model.tar.gz
  s3://bucket/.../model.tar.gz a SageMaker model artifact; this includes JumpStart artifacts:
                               pass the s3:// URI of the JumpStart model tarball or of its
                               uncompressed prefix (what the JumpStart model's model_data points to)
  ./folder or model.tar.gz     the same, on local disk

Without ``--model``, a budget (--max-params, --max-memory-gb, --inference-instance) chooses the
largest Flan-T5 size that fits and the step prints why. ``--list`` prints the catalog.

The output folder holds safetensors weights, the tokenizer and ``model_card.json`` (base
model, source, parameter count, architecture, memory, recommended instances, selection reason).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stepkit import catalog
from stepkit.archive import extract_safely, find_model_root
from stepkit.catalog import GIB, Budget, CatalogEntry
from stepkit.contract import atomic_output_dir, env_path, path_help, require_output_dir
from stepkit.errors import StepError, first_line, run_step
from stepkit.modelcard import read_model_card
from stepkit.modelcheck import check_model_dir
from stepkit.modeling import count_parameters, load_model_and_tokenizer, save_model
from stepkit.s3 import download_keys, prefix_keys, relative_key, s3_errors, split_s3_uri
from stepkit.threads import configure_runtime

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
RUNTIME_BASELINE_GIB = 1.0  # python + torch + transformers before any weights exist
BUILD_OVERHEAD = 1.2  # measured peak RSS while building and saving is ~1.15x the weights
STAND_IN_NOTE = (
    "Random weights and a byte-level stand-in tokenizer: for size, latency and FLOPs benchmarks "
    "only. Outputs are meaningless; do not fine-tune or evaluate quality with this model."
)


@dataclass(frozen=True)
class Source:
    kind: str  # "hub", "random", "tiny", "local", "s3"
    uri: str
    entry: CatalogEntry | None = None


def build_parser() -> argparse.ArgumentParser:
    """This script's flags (flanops checks a config's ``steps`` settings against them)."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # --max-param must not pass for --max-params
        description="Select the Flan-T5 foundation model and write it as a model folder with a model card.",
        epilog="Sources for --model: a catalog name or hub id (see --list), 'tiny', a local folder or "
        "model.tar.gz, or an s3:// folder, prefix with model.tar.gz, or tarball (JumpStart artifacts too).",
    )
    parser.add_argument("--model", help="catalog name/hub id (flan-t5-base), 'tiny', a local folder or model.tar.gz, "
                        "or an s3:// URI; omit it to choose by budget")
    parser.add_argument("--random-weights", action="store_true",
                        help="build a catalog size with its real architecture and random weights (benchmarks only)")
    parser.add_argument("--tokenizer", help="with --random-weights: a tokenizer folder to ship instead of the "
                        "byte-level stand-in (e.g. a real Flan-T5 tokenizer copied to this machine)")
    parser.add_argument("--revision", default="main",
                        help="Hub revision of a catalog model: a commit sha pins exactly these weights and tokenizer "
                             "(the card records the commit either way; default: main)")
    parser.add_argument("--dtype", choices=sorted(catalog.BYTES_PER_PARAM), default="float32",
                        help="weight dtype to save, and to assume in memory budgets (default: float32)")
    parser.add_argument("--output-dir", default=env_path("SM_MODEL_DIR"),
                        help=path_help("where to write the model folder", "SM_MODEL_DIR"))
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and the tiny model (default: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="--model tiny: build the stand-in and pretrain it for this "
                                                           "many steps of 32 examples (default: the shipped stand-in, "
                                                           "pretrained with the same code)")
    budget = parser.add_argument_group("budget (choose the largest Flan-T5 size that fits every limit given)")
    budget.add_argument("--max-params", type=_count, help="parameter budget, e.g. 300M or 3B")
    budget.add_argument("--max-memory-gb", type=float, help="budget for the weights in --dtype, in GiB (2^30 bytes)")
    budget.add_argument("--inference-instance", choices=sorted(catalog.INSTANCES), metavar="TYPE",
                        help="SageMaker instance type to serve on, e.g. ml.g5.xlarge: the model must fit its "
                        "accelerator memory (host memory for CPU types)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be selected and why; write nothing")
    parser.add_argument("--list", action="store_true", help="print the catalog and the instance table, then exit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _count(text: str) -> int:
    try:
        return catalog.parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------- catalog listing


def catalog_table() -> str:
    header = ("name", "hub id", "params", "fp32 GiB", "bf16 GiB", "d_model", "d_ff", "heads", "layers", "train on", "serve on")
    rows = [header]
    for entry in catalog.CATALOG.values():
        dims = entry.dims
        rows.append((
            entry.name, entry.hub_id or "-",
            catalog.human_count(entry.parameters) if dims else "-",
            f"{entry.weights_gib('float32'):.2f}" if dims else "-",
            f"{entry.weights_gib('bfloat16'):.2f}" if dims else "-",
            *((str(dims.d_model), str(dims.d_ff), str(dims.num_heads), f"{dims.num_layers}+{dims.num_decoder_layers}")
              if dims else ("-",) * 4),
            entry.train_instance, entry.inference_instance,
        ))
    lines = [_format_rows(rows), "", "tiny: " + catalog.TINY.description, ""]
    instance_rows = [("instance", "GPUs", "accelerator GiB", "vCPUs", "host GiB")]
    for name, spec in catalog.INSTANCES.items():
        gpus = f"{spec.gpus} x {spec.gpu}" if spec.gpus else "-"
        instance_rows.append((name, gpus, str(spec.accelerator_gib or "-"), str(spec.vcpus), str(spec.host_gib)))
    lines.append(_format_rows(instance_rows))
    return "\n".join(lines)


def _format_rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


# ---------------------------------------------------------------- where the model comes from


def resolve_source(model: str, random_weights: bool, flag: str = "--model") -> Source:
    """Decide what ``--model`` names, with cheap checks only (nothing is downloaded or built here).

    ``flag`` is how errors name the value (flanops checks a config's BaseModelId with this too).
    """
    if model.startswith("s3://"):
        split_s3_uri(model, flag)
        source = Source("s3", model)
    elif (entry := catalog.lookup(model)) is not None:
        if entry is catalog.TINY:
            source = Source("tiny", "tiny", entry)
        else:
            source = Source("random" if random_weights else "hub", entry.hub_id, entry)
    elif Path(model).exists():
        path = Path(model)
        if path.is_file() and not path.name.endswith(ARCHIVE_SUFFIXES):
            raise StepError(f"{flag} {path}: a file that is not a model archive; expected a folder or model.tar.gz")
        if path.is_dir():
            check_model_dir(path, flag)
        source = Source("local", str(path.absolute()))
    elif model.startswith("huggingface-text2text-") or model.startswith("huggingface-"):
        raise StepError(
            f"{flag} {model}: this looks like a JumpStart model id; pass the s3:// URI of its model artifact "
            "(the tarball or uncompressed prefix its model_data points to) instead"
        )
    else:
        known = ", ".join(e.name for e in catalog.CATALOG.values())
        what = "not a Flan-T5 catalog id" if "/" in model and not model.startswith((".", "/")) else "not in the catalog and no such path"
        raise StepError(f"{flag} {model}: {what}; use one of {known} (or google/<name>), a local model folder, "
                        "a model.tar.gz, or an s3:// URI (select_model.py --list shows the catalog)")
    if random_weights and source.kind != "random":
        raise StepError(f"--random-weights builds a catalog architecture; {flag} {model} is a {source.kind} model. "
                        "Pass a catalog name such as flan-t5-base")
    return source


def check_budget_fits(name: str, parameters: int, budget: Budget) -> str:
    """A sentence saying why the model fits, or a StepError saying why it does not."""
    fits, fails = catalog.budget_check(parameters, budget)
    if fails:
        suggestion = ""
        try:
            chosen, _ = catalog.choose_by_budget(budget)
            suggestion = f"; the largest Flan-T5 size that fits is {chosen.name}"
        except StepError:
            pass
        raise StepError(f"{name} does not fit the budget: {'; '.join(fails)}{suggestion}")
    return f"{name} fits the budget: {'; '.join(fits)}" if fits else ""


def check_room_to_build(entry: CatalogEntry, dtype: str, action: str) -> None:
    """Refuse early, with numbers, when the weights cannot fit in this machine's memory."""
    weights = entry.dims.weights_bytes(dtype)
    needed = weights * BUILD_OVERHEAD + RUNTIME_BASELINE_GIB * GIB
    available = catalog.available_memory_bytes()
    if needed > available:
        half = " (--dtype bfloat16 halves it)" if dtype == "float32" else ""
        raise StepError(
            f"{action} {entry.hub_id} in {dtype} needs about {needed / GIB:.1f} GiB of memory "
            f"({weights / GIB:.1f} GiB of weights){half}; only {available / GIB:.1f} GiB is available here. "
            "Choose a smaller size or a machine with more memory"
        )


def check_disk(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise StepError(f"{folder}: needs {needed_bytes / GIB:.1f} GiB of disk for the weights, "
                        f"only {free / GIB:.1f} GiB is free")


# ---------------------------------------------------------------- building and fetching


def byte_level_tokenizer(model_max_length: int = 512):
    """A stand-in tokenizer that any text goes through: T5's special ids, 256 bytes, 100 sentinels.

    No Flan-T5 tokenizer is available offline and no data can train a 32k vocabulary
    honestly, so random-weight models ship this one. Its ids fit every Flan-T5 vocabulary
    (359 of 32128), but texts become 3-4x more tokens than with Flan-T5's SentencePiece
    vocabulary: pass real token counts when benchmarking sequence lengths.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + byte_symbols)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # nosec B106 # a special token
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                        special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",  # nosec B106 # special tokens
        additional_special_tokens=[f"<extra_id_{i}>" for i in range(100)], model_max_length=model_max_length,
    )


def load_tokenizer_folder(path: str, vocab_size: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)  # nosec B615 # a local folder (--tokenizer), not the Hub
    except (OSError, ValueError) as err:
        raise StepError(f"--tokenizer {path}: cannot load a tokenizer ({first_line(err)})") from None
    if len(tokenizer) > vocab_size:
        raise StepError(f"--tokenizer {path}: {len(tokenizer)} tokens do not fit the model's vocabulary of {vocab_size}")
    return tokenizer


def build_random(entry: CatalogEntry, args: argparse.Namespace):
    print(f"building {entry.hub_id} with random weights ({catalog.human_count(entry.parameters)} parameters, {args.dtype})")
    model = catalog.build_random_model(entry, dtype=args.dtype, seed=args.seed)
    if args.tokenizer:
        tokenizer = load_tokenizer_folder(args.tokenizer, entry.dims.vocab_size)
        tokenizer_note = f"loaded from {args.tokenizer} ({len(tokenizer)} tokens)"
        note = STAND_IN_NOTE.replace("and a byte-level stand-in tokenizer", f"(tokenizer from {args.tokenizer})")
    else:
        tokenizer = byte_level_tokenizer()
        tokenizer_note = (f"byte-level stand-in ({len(tokenizer)} tokens: T5 specials, 256 bytes, 100 sentinels); "
                          "not the Flan-T5 SentencePiece tokenizer, sequences are ~3-4x longer")
        note = STAND_IN_NOTE
    card = {"weights": "random", "seed": args.seed, "tokenizer": tokenizer_note, "benchmark_only": True, "note": note}
    return model, tokenizer, card


def download_from_hub(entry: CatalogEntry, dtype: str, revision: str):
    """The real cloud path: ``from_pretrained`` of the hub id at ``revision`` (cached under HF_HOME)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    print(f"downloading {entry.hub_id} at revision {revision} from the Hugging Face Hub")
    try:
        tokenizer = AutoTokenizer.from_pretrained(entry.hub_id, revision=revision)
        model = AutoModelForSeq2SeqLM.from_pretrained(entry.hub_id, revision=revision, dtype=getattr(torch, dtype))
    except OSError as err:
        raise StepError(
            f"cannot download {entry.hub_id}: the Hugging Face Hub is unreachable or refused the request "
            f"({first_line(err)}). Offline, use --model tiny, a local model folder or s3:// URI, or "
            f"--random-weights for benchmarks"
        ) from None
    card = {"weights": "pretrained", "tokenizer": f"{entry.hub_id} ({len(tokenizer)} tokens)", "benchmark_only": False,
            "hub_revision": revision, "hub_commit": getattr(model.config, "_commit_hash", None)}
    return model, tokenizer, card


def build_tiny(args: argparse.Namespace):
    """The shipped stand-in, or with --pretrain-steps one built here (tokenizer, model, pretraining)."""
    from stepkit import tiny

    if args.pretrain_steps is None:
        folder = tiny.check_standin()
        model, tokenizer = load_model_and_tokenizer(folder)
        shipped = read_model_card(folder)
        print(f"[tiny] the shipped stand-in ({folder}, checked against its {tiny.CHECKSUMS}); --pretrain-steps N "
              "builds one instead")
        return model, tokenizer, {**{key: value for key, value in shipped.items() if key not in ("source", "step")},
                                  "weights": "shipped stand-in (stepkit/standin)", "benchmark_only": False,
                                  "shipped": {"folder": "stepkit/standin", "recipe": tiny.STANDIN_RECIPE,
                                              "sha256": tiny.file_sha256(folder / "model.safetensors")}}
    model, tokenizer, card = tiny.build_tiny_foundation(seed=args.seed, pretrain_steps=args.pretrain_steps)
    return model, tokenizer, {"weights": "pretrained here (tiny)", "benchmark_only": False, **card}


def load_local(source: Source, work_dir: Path, dtype: str):
    path = Path(source.uri)
    if path.is_file():
        extract_safely(path, work_dir / "extracted", label=f"--model {path}")
        path = find_model_root(work_dir / "extracted", label=f"--model {source.uri}")
    return _load_folder(path, source, dtype)


def load_s3(source: Source, work_dir: Path, dtype: str):
    folder = download_s3(source.uri, work_dir)
    return _load_folder(find_model_root(folder, label=f"--model {source.uri}"), source, dtype)


def _load_folder(folder: Path, source: Source, dtype: str):
    import torch

    flag = "--model" if folder == Path(source.uri) else f"--model {source.uri}, fetched to"
    model, tokenizer = load_model_and_tokenizer(folder, flag=flag)
    model = model.to(getattr(torch, dtype))
    loaded_from = check_model_dir(folder, flag)  # differs from folder when it holds model.tar.gz (extracted once)
    previous = read_model_card(loaded_from)
    base_model = previous.get("base_model") or getattr(model.config, "_name_or_path", "") or source.uri
    if str(base_model) in (str(folder), str(loaded_from)):  # transformers records the temporary path we loaded from
        base_model = source.uri
    card = {"base_model": base_model, "weights": previous.get("weights", "pretrained"),
            "tokenizer": f"from the source folder ({len(tokenizer)} tokens)",
            "benchmark_only": bool(previous.get("benchmark_only", False))}
    if previous:
        card["source_card"] = previous
    return model, tokenizer, card


# ---------------------------------------------------------------- S3 and archives


def download_s3(uri: str, work_dir: Path) -> Path:
    """Fetch a model folder, a prefix holding model.tar.gz, or a tarball; return the local folder."""
    import boto3

    label = f"--model {uri}"
    bucket, key = split_s3_uri(uri, "--model")
    local = work_dir / "s3"
    with s3_errors(label, bucket):
        s3 = boto3.client("s3")
        if key.endswith(ARCHIVE_SUFFIXES):
            return _download_archive(s3, bucket, key, local, uri)
        folder, keys = prefix_keys(s3, bucket, key)
        if not keys:
            raise StepError(f"{label}: no objects under s3://{bucket}/{key}; check the prefix "
                            "(it should hold config.json, weights and tokenizer files, or model.tar.gz)")
        names = {relative_key(k, folder) for k in keys}
        if "config.json" not in names and "model.tar.gz" in names:
            return _download_archive(s3, bucket, f"{folder}/model.tar.gz".lstrip("/"), local, uri)
        print(f"downloading {len(keys)} objects from s3://{bucket}/{key}")
        download_keys(s3, bucket, keys, folder, local, label)
        return local


def _download_archive(s3, bucket: str, key: str, local: Path, uri: str) -> Path:
    archive = local.parent / "model.tar.gz"
    print(f"downloading s3://{bucket}/{key}")
    s3.download_file(bucket, key, str(archive))
    extract_safely(archive, local, label=f"--model {uri}")
    archive.unlink()
    return local


# ---------------------------------------------------------------- main


def describe(model, dtype: str, entry: CatalogEntry | None) -> dict:
    """Architecture, memory and instance recommendations measured from the model itself."""
    parameters = count_parameters(model)
    guide = entry or catalog.recommend_for(parameters)
    weights = {name: round(parameters * size / GIB, 3) for name, size in catalog.BYTES_PER_PARAM.items()}
    card = {
        "parameters": parameters,
        "architecture": {"model_type": model.config.model_type, **catalog.dims_of_model(model).as_dict()},
        "dtype": dtype,
        "memory_gib": {"weights": weights[dtype], **{f"weights_{name}": gib for name, gib in weights.items()},
                       "serving_estimate": round(weights[dtype] * catalog.SERVING_OVERHEAD, 3)},
        "recommended_instances": {"training": guide.train_instance, "inference": guide.inference_instance,
                                  "basis": guide.name if guide is entry else f"size of {guide.name} or smaller"},
    }
    return card


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(catalog_table())
        return 0
    budget = Budget(args.max_params, args.max_memory_gb, args.inference_instance, args.dtype)
    if args.model is None:
        if budget.empty:
            raise StepError("--model is required, or give a budget (--max-params, --max-memory-gb, "
                            "--inference-instance) to choose a Flan-T5 size; see --list")
        entry, reason = catalog.choose_by_budget(budget)
        source = resolve_source(entry.name, args.random_weights)
    else:
        source = resolve_source(args.model, args.random_weights)
        reason = f"chose {source.uri}: named by --model"
        if source.entry and source.entry.dims and not budget.empty:
            reason += "; " + check_budget_fits(source.entry.hub_id, source.entry.parameters, budget)
    print(reason)
    if args.dry_run:
        print(f"dry run: would take {source.kind} model {source.uri}")
        return 0

    if args.pretrain_steps is not None and (source.kind != "tiny" or args.pretrain_steps < 1):
        raise StepError(f"--pretrain-steps {args.pretrain_steps}: builds the stand-in (--model tiny) and needs at "
                        f"least 1 step; drop it to take {'the shipped stand-in' if source.kind == 'tiny' else args.model}")
    output_dir = require_output_dir(args.output_dir, "--output-dir", args.overwrite, "SM_MODEL_DIR")
    if source.kind in ("hub", "random"):
        check_room_to_build(source.entry, args.dtype, "downloading" if source.kind == "hub" else "building")
    configure_runtime()
    with atomic_output_dir(output_dir, args.overwrite) as staging, \
            tempfile.TemporaryDirectory(prefix="select-model-") as work:
        if source.kind in ("hub", "random"):
            check_disk(staging, source.entry.dims.weights_bytes(args.dtype))
        if source.kind == "random":
            model, tokenizer, card = build_random(source.entry, args)
        elif source.kind == "hub":
            model, tokenizer, card = download_from_hub(source.entry, args.dtype, args.revision)
        elif source.kind == "tiny":
            model, tokenizer, card = build_tiny(args)
        elif source.kind == "s3":
            model, tokenizer, card = load_s3(source, Path(work), args.dtype)
        else:
            model, tokenizer, card = load_local(source, Path(work), args.dtype)
        if source.entry is None or source.entry.dims is None:  # size known only now
            name = card.get("base_model") or source.uri
            fit = check_budget_fits(str(name), count_parameters(model), budget)
            reason += f"; {fit}" if fit else ""
        card = {
            **card,
            "step": "select_model",
            "base_model": source.entry.hub_id if source.entry and source.entry.hub_id else card.get("base_model", source.uri),
            "source": {"kind": source.kind, "uri": source.uri},
            "selection_reason": reason,
            **describe(model, args.dtype, source.entry),
            **({"catalog": source.entry.card()} if source.entry else {}),
        }
        save_model(model, tokenizer, staging, card)
    print(f"wrote {output_dir}: {card['base_model']} ({source.kind}, "
          f"{catalog.human_count(card['parameters'])} parameters, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
