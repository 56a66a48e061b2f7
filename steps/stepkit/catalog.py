"""The Flan-T5 family: architecture, parameter counts, memory and SageMaker instance types.

Architecture figures are those of the published ``config.json`` of each ``google/flan-t5-*``
checkpoint (all T5 v1.1 style: gated-GELU feed-forward, untied LM head, vocabulary 32128,
32 relative-attention buckets, max distance 128, layer-norm epsilon 1e-6). Parameter counts
are computed from these dimensions (:func:`count_t5_parameters`), not copied from model
cards; a test checks the formula against real ``T5ForConditionalGeneration`` modules.

``tiny`` is the offline stand-in (no hub id): a small T5 of the same shape built by
``stepkit.tiny`` from the prepared data; its size is decided there and recorded in its card.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import StepError

GIB = 2**30
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2}
# Serving needs more than the weights: activations, the decoder's key/value cache and the
# CUDA context. 20% is a rule of thumb for batch-1 seq2seq generation at 512 tokens.
SERVING_OVERHEAD = 1.2
# On CPU-only instances the OS and the model server keep this much host memory for themselves.
CPU_HOST_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class T5Dims:
    """The dimensions that decide a T5's size (names as in ``T5Config``)."""

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    vocab_size: int = 32128
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @property
    def inner_dim(self) -> int:
        """Width of q/k/v/o projections: heads x per-head size (not always d_model: small has 6 x 64 = 384)."""
        return self.num_heads * self.d_kv

    @property
    def parameters(self) -> int:
        return count_t5_parameters(self)

    def weights_bytes(self, dtype: str = "float32") -> int:
        return self.parameters * bytes_per_param(dtype)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "T5Dims":
        """The dims of any loaded T5 config (a ``T5Config`` or its dict).

        transformers 5 stores ``tie_word_embeddings=True`` for every T5 (see
        :func:`untie_lm_head`); whether the head is really shared is a property of the model,
        so callers that have one should pass ``tied=`` through :func:`dims_of_model`.
        """
        values = config if isinstance(config, dict) else config.to_dict()
        known = {f.name for f in fields(cls)}
        kwargs = {k: values[k] for k in known if k in values and values[k] is not None}
        kwargs.setdefault("num_decoder_layers", values.get("num_layers"))
        return cls(**kwargs)


def count_t5_parameters(dims: T5Dims) -> int:
    """Parameters of a ``T5ForConditionalGeneration`` with these dims, from the architecture.

    d = d_model, i = num_heads * d_kv, f = d_ff, V = vocab_size, B = relative-attention buckets
      embeddings   V*d (shared by encoder and decoder input) + V*d for an untied LM head
      attention    q, k, v: d*i each, o: i*d                      -> 4*d*i per attention block
      feed-forward gated: wi_0, wi_1: d*f, wo: f*d (3*d*f); plain: 2*d*f
      layer norms  d each (scale only, no bias): 2 per encoder block, 3 per decoder block,
                   plus one final norm per stack
      position     B*num_heads relative-attention bias, in the first self-attention of each stack
    encoder block = 1 attention + FF; decoder block = self- and cross-attention + FF.
    """
    d, i, f = dims.d_model, dims.inner_dim, dims.d_ff
    ff = (3 if dims.feed_forward_proj.startswith("gated") else 2) * d * f
    attention = 4 * d * i
    position = dims.relative_attention_num_buckets * dims.num_heads
    encoder = dims.num_layers * (attention + ff + 2 * d) + position + d
    decoder = dims.num_decoder_layers * (2 * attention + ff + 3 * d) + position + d
    embeddings = dims.vocab_size * d * (1 if dims.tie_word_embeddings else 2)
    return embeddings + encoder + decoder


LORA_TARGET_SHAPES = {  # module name -> (in_features, out_features) as a function of dims
    "q": lambda m: (m.d_model, m.inner_dim),
    "k": lambda m: (m.d_model, m.inner_dim),
    "v": lambda m: (m.d_model, m.inner_dim),
    "o": lambda m: (m.inner_dim, m.d_model),
    "wi": lambda m: (m.d_model, m.d_ff),
    "wi_0": lambda m: (m.d_model, m.d_ff),
    "wi_1": lambda m: (m.d_model, m.d_ff),
    "wo": lambda m: (m.d_ff, m.d_model),
}


def lora_parameter_count(dims: T5Dims, r: int, target_modules: tuple[str, ...] | list[str] = ("q", "v")) -> int:
    """Trainable parameters LoRA adds: A (r x in) + B (out x r) = r*(in + out) per adapted Linear.

    Attention projections occur once per encoder block and twice per decoder block (self +
    cross attention); feed-forward projections once per block of either stack.
    """
    attention_blocks = dims.num_layers + 2 * dims.num_decoder_layers
    ff_blocks = dims.num_layers + dims.num_decoder_layers
    gated = dims.feed_forward_proj.startswith("gated")
    total = 0
    for name in target_modules:
        if name not in LORA_TARGET_SHAPES:
            raise StepError(f"LoRA target {name!r} is not a T5 Linear; use some of {', '.join(LORA_TARGET_SHAPES)}")
        if (name == "wi" and gated) or (name in ("wi_0", "wi_1") and not gated):
            continue  # module absent in this feed-forward variant
        fan_in, fan_out = LORA_TARGET_SHAPES[name](dims)
        blocks = attention_blocks if name in ("q", "k", "v", "o") else ff_blocks
        total += blocks * r * (fan_in + fan_out)
    return total


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hub_id: str | None
    dims: T5Dims | None  # None for tiny: decided by stepkit.tiny from the data
    train_instance: str  # LoRA fine-tuning (frozen base + adapters), one job
    inference_instance: str  # real-time endpoint, batch 1
    description: str

    @property
    def parameters(self) -> int | None:
        return self.dims.parameters if self.dims else None

    def weights_gib(self, dtype: str = "float32") -> float | None:
        return self.dims.weights_bytes(dtype) / GIB if self.dims else None

    def card(self) -> dict[str, Any]:
        """What a model card records about this entry."""
        card: dict[str, Any] = {"catalog_name": self.name, "hub_id": self.hub_id}
        if self.dims:
            card["catalog_parameters"] = self.parameters
        return card


FAMILY: tuple[CatalogEntry, ...] = (  # smallest first
    CatalogEntry("flan-t5-small", "google/flan-t5-small",
                 T5Dims(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
                 "ml.g5.xlarge", "ml.m5.xlarge", "fits a CPU endpoint; the usual first choice for experiments"),
    CatalogEntry("flan-t5-base", "google/flan-t5-base",
                 T5Dims(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
                 "ml.g5.2xlarge", "ml.g5.xlarge", "the common quality/cost balance for summarisation"),
    CatalogEntry("flan-t5-large", "google/flan-t5-large",
                 T5Dims(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24),
                 "ml.g5.4xlarge", "ml.g5.2xlarge", "24+24 layers; one A10G GPU serves it comfortably"),
    CatalogEntry("flan-t5-xl", "google/flan-t5-xl",
                 T5Dims(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24),
                 "ml.g5.12xlarge", "ml.g5.4xlarge", "fits one 24 GiB GPU for inference; train with LoRA on 4 GPUs"),
    CatalogEntry("flan-t5-xxl", "google/flan-t5-xxl",
                 T5Dims(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24),
                 "ml.p4d.24xlarge", "ml.g5.12xlarge", "needs several GPUs (sharded) even in bfloat16"),
)
TINY = CatalogEntry(
    "tiny", None, None, "ml.m5.xlarge", "ml.m5.xlarge",
    "offline stand-in: small T5 of the Flan-T5 shape, own tokenizer; shipped warmed up (or built from --data-dir)",
)
CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in (*FAMILY, TINY)}


@dataclass(frozen=True)
class Instance:
    gpus: int
    gpu: str | None
    accelerator_gib: int  # total over all GPUs
    vcpus: int
    host_gib: int


# Sizes from AWS's EC2 accelerated/general-purpose instance tables (SageMaker's ml.* types
# run on the same hardware). Extend here to make another type usable with --inference-instance.
INSTANCES: dict[str, Instance] = {
    "ml.m5.xlarge": Instance(0, None, 0, 4, 16),
    "ml.m5.2xlarge": Instance(0, None, 0, 8, 32),
    "ml.m5.4xlarge": Instance(0, None, 0, 16, 64),
    "ml.c5.2xlarge": Instance(0, None, 0, 8, 16),
    "ml.g4dn.xlarge": Instance(1, "NVIDIA T4", 16, 4, 16),
    "ml.g4dn.2xlarge": Instance(1, "NVIDIA T4", 16, 8, 32),
    "ml.g5.xlarge": Instance(1, "NVIDIA A10G", 24, 4, 16),
    "ml.g5.2xlarge": Instance(1, "NVIDIA A10G", 24, 8, 32),
    "ml.g5.4xlarge": Instance(1, "NVIDIA A10G", 24, 16, 64),
    "ml.g5.8xlarge": Instance(1, "NVIDIA A10G", 24, 32, 128),
    "ml.g5.12xlarge": Instance(4, "NVIDIA A10G", 96, 48, 192),
    "ml.g5.24xlarge": Instance(4, "NVIDIA A10G", 96, 96, 384),
    "ml.g5.48xlarge": Instance(8, "NVIDIA A10G", 192, 192, 768),
    "ml.p3.2xlarge": Instance(1, "NVIDIA V100", 16, 8, 61),
    "ml.p4d.24xlarge": Instance(8, "NVIDIA A100 40GB", 320, 96, 1152),
}


def bytes_per_param(dtype: str) -> int:
    if dtype not in BYTES_PER_PARAM:
        raise StepError(f"dtype {dtype!r} is not supported; use one of {', '.join(BYTES_PER_PARAM)}")
    return BYTES_PER_PARAM[dtype]


def lookup(model_id: str) -> CatalogEntry | None:
    """The entry for a short name (``flan-t5-base``) or hub id (``google/flan-t5-base``), else None."""
    key = model_id.strip().lower()
    for entry in CATALOG.values():
        if key == entry.name or (entry.hub_id and key == entry.hub_id.lower()):
            return entry
    return None


def instance(name: str) -> Instance:
    if name not in INSTANCES:
        raise StepError(
            f"instance type {name!r} is not in the catalog's table; known: {', '.join(INSTANCES)} "
            "(add it to INSTANCES in steps/stepkit/catalog.py)"
        )
    return INSTANCES[name]


def human_count(n: int) -> str:
    """77M, 248M, 2.85B: the way model sizes are usually quoted (3 significant digits)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale * 0.9995:  # 999,999 reads 1M, not 1e+03K
            return f"{n / scale:.3g}{unit}"
    return str(n)


def parse_count(text: str) -> int:
    """'300M', '2.5B', '80k', '3e8' or '300000000' -> an integer."""
    value = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(value[-1:], 1)
    number = value[:-1] if scale != 1 else value
    try:
        count = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a count; write e.g. 300M, 2.5B or 300000000") from None
    if count <= 0:
        raise ValueError(f"{text!r} must be positive")
    return int(count)


# ---------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    max_params: int | None = None
    max_memory_gib: float | None = None  # weights only, in ``dtype``
    inference_instance: str | None = None  # serving memory must fit this instance
    dtype: str = "float32"

    @property
    def empty(self) -> bool:
        return self.max_params is None and self.max_memory_gib is None and self.inference_instance is None


def serving_limit_gib(name: str) -> tuple[float, str]:
    """Memory a model may use when served on ``name``, and what that memory is."""
    spec = instance(name)
    if spec.gpus:
        per_gpu = spec.accelerator_gib // spec.gpus
        what = f"{spec.accelerator_gib} GiB accelerator memory" + (
            f" over {spec.gpus} x {per_gpu} GiB GPUs" if spec.gpus > 1 else "")
        return float(spec.accelerator_gib), what
    return spec.host_gib - CPU_HOST_RESERVE_GIB, f"{spec.host_gib} GiB host memory, {CPU_HOST_RESERVE_GIB:g} GiB kept for the OS and server"


def budget_check(parameters: int, budget: Budget) -> tuple[list[str], list[str]]:
    """(why it fits, why it does not) for a model of ``parameters`` under ``budget``."""
    fits: list[str] = []
    fails: list[str] = []
    weights_gib = parameters * bytes_per_param(budget.dtype) / GIB
    if budget.max_params is not None:
        line = f"{human_count(parameters)} params"
        if parameters <= budget.max_params:
            fits.append(f"{line} ≤ {human_count(budget.max_params)} budget")
        else:
            fails.append(f"{line} > {human_count(budget.max_params)} budget")
    if budget.max_memory_gib is not None:
        line = f"{weights_gib:.2f} GiB of {budget.dtype} weights"
        if weights_gib <= budget.max_memory_gib:
            fits.append(f"{line} ≤ {budget.max_memory_gib:g} GiB budget")
        else:
            fails.append(f"{line} > {budget.max_memory_gib:g} GiB budget")
    if budget.inference_instance is not None:
        limit, what = serving_limit_gib(budget.inference_instance)
        serving = weights_gib * SERVING_OVERHEAD
        line = f"{serving:.1f} GiB to serve in {budget.dtype} (weights x {SERVING_OVERHEAD})"
        spec = INSTANCES[budget.inference_instance]
        if serving <= limit:
            sharded = spec.gpus > 1 and serving > spec.accelerator_gib / spec.gpus
            fits.append(f"{line} fits {budget.inference_instance} ({what})" + (" when sharded across its GPUs" if sharded else ""))
        else:
            fails.append(f"{line} exceeds {budget.inference_instance} ({what})")
    return fits, fails


def choose_by_budget(budget: Budget) -> tuple[CatalogEntry, str]:
    """The largest Flan-T5 size that fits every limit in ``budget``, and a sentence saying why."""
    if budget.empty:
        raise StepError("no budget given: pass --max-params, --max-memory-gb or --inference-instance")
    chosen: CatalogEntry | None = None
    reason_fits: list[str] = []
    for entry in FAMILY:
        fits, fails = budget_check(entry.parameters, budget)
        if fails:
            break
        chosen, reason_fits = entry, fits
    if chosen is None:
        _, fails = budget_check(FAMILY[0].parameters, budget)
        raise StepError(
            f"no Flan-T5 size fits the budget: the smallest, {FAMILY[0].hub_id}, has {'; '.join(fails)}. "
            f"Raise the budget{', use --dtype bfloat16' if budget.dtype == 'float32' and budget.max_params is None else ''}"
            ", or use --model tiny"
        )
    reason = f"chose {chosen.hub_id}: {'; '.join(reason_fits)}"
    larger = FAMILY.index(chosen) + 1
    if larger < len(FAMILY):
        bigger = FAMILY[larger]
        _, fails = budget_check(bigger.parameters, budget)
        reason += f"; {bigger.name} ({human_count(bigger.parameters)}) does not fit: {'; '.join(fails)}"
    else:
        reason += "; it is the largest Flan-T5 size"
    return chosen, reason


def recommend_for(parameters: int) -> CatalogEntry:
    """The smallest catalog size at least as large as a model: its instance types are a safe guess."""
    for entry in FAMILY:
        if entry.parameters >= parameters:
            return entry
    return FAMILY[-1]


# ---------------------------------------------------------------- building models


def t5_config(entry_or_dims: CatalogEntry | T5Dims, **overrides):
    """A ``T5Config`` for a catalog entry (or any dims), with T5's special-token ids."""
    from transformers import T5Config

    dims = entry_or_dims.dims if isinstance(entry_or_dims, CatalogEntry) else entry_or_dims
    if dims is None:
        raise StepError(f"{entry_or_dims.name} has no fixed architecture: it is built by stepkit.tiny from the data")
    settings = {**dims.as_dict(), "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,  # nosec B105 # token ids
                "dropout_rate": 0.1, **overrides}
    return T5Config(**settings)


def untie_lm_head(model) -> None:
    """Give the LM head its own weights, as every Flan-T5 checkpoint has.

    transformers 5 forces ``tie_word_embeddings=True`` in ``T5Config`` (it keeps the old
    value only to decide output scaling), so ``T5ForConditionalGeneration(config)`` shares
    ``lm_head.weight`` with the input embedding: 32128 x d_model fewer parameters than the
    real model (16M for small, 134M for xxl). ``from_pretrained`` does not re-tie weights
    that differ in the checkpoint, so an untied head survives save and load.
    """
    import torch
    from torch import nn

    if model.lm_head.weight is not model.shared.weight:
        return
    head = torch.empty_like(model.shared.weight)
    if head.device.type != "meta":
        nn.init.normal_(head, mean=0.0, std=model.config.initializer_factor)  # T5's own init for an untied head
    model.lm_head.weight = nn.Parameter(head)
    getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)


def build_random_model(entry_or_dims: CatalogEntry | T5Dims, dtype: str = "float32", seed: int = 0, device: str | None = None):
    """A ``T5ForConditionalGeneration`` with the real architecture and random weights.

    ``device="meta"`` allocates nothing: use it to count parameters of any size.
    """
    import torch
    from transformers import T5ForConditionalGeneration

    config = t5_config(entry_or_dims)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    if device:
        with torch.device(device):
            model = T5ForConditionalGeneration._from_config(config, dtype=torch_dtype)
    else:
        model = T5ForConditionalGeneration._from_config(config, dtype=torch_dtype)
    untie_lm_head(model)
    return model


def dims_of_model(model) -> T5Dims:
    """The dims of a loaded model, with ``tie_word_embeddings`` as the model really is."""
    dims = T5Dims.from_config(model.config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return T5Dims(**{**dims.as_dict(), "tie_word_embeddings": tied})


def available_memory_bytes() -> int:
    """Memory this process can still use: MemAvailable, capped by a cgroup limit if one is set."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:  # not Linux
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:  # a container's limit (cgroup v2) can be far below the machine's free memory
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as usage_file:
            usage = int(usage_file.read().strip())
        if limit.isdigit():
            available = min(available, int(limit) - usage)
    except (OSError, ValueError):
        pass
    return available
