"""Pruning a T5: structured (whole units removed, the matrices shrink) and unstructured (magnitude zeros).

Structured pruning removes

* feed-forward neurons: neuron j of a block is row j of ``wi_0`` and ``wi_1`` (``wi`` in the
  non-gated T5 v1.0) and column j of ``wo``; removing it takes 3 x d_model weights (gated);
* attention heads: head h is rows h*d_kv … (h+1)*d_kv-1 of ``q``, ``k``, ``v``, the same
  columns of ``o`` and, in the first layer of each stack (the only one that has it),
  column h of ``relative_attention_bias``.

``T5Config`` has one ``d_ff`` and one ``num_heads`` for every layer, so every block loses the
same number of units; which ones is chosen per block, with one exception: T5 computes the
relative position bias once per stack (in its first layer) and every later layer adds
column h of it to its own head h. A self-attention head index therefore means the same
bias in every layer of a stack, and removing bias column h removes head h from all of them:
self-attention heads are chosen once per stack (encoder, decoder) by their importance
summed over its layers. Cross-attention has no position bias; its heads are chosen per layer.

Importance of a unit is how much it can add to the block's output:

* ``weight`` (needs no data): for a neuron ||wi_0[j]|| x ||wi_1[j]|| x ||wo[:, j]||; for a
  head ||v_h||_F x ||o_h||_F (q and k only steer where a head looks, not how much it adds);
* ``activation`` (needs a few examples): the mean norm of the unit's actual contribution
  to the output, ||h_j|| x ||wo[:, j]|| for a neuron and ||o_h x_h|| for a head, measured
  per token on calibration examples run through the model.

Unstructured pruning zeroes the smallest-magnitude weights of the blocks' Linear layers
(q, k, v, o, wi*, wo; not the embedding or the LM head) with ``torch.nn.utils.prune``, over
all of them at once (``global``) or layer by layer (``layer``), and makes it permanent.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .errors import StepError

STRUCTURED_TARGETS = ("ffn", "heads", "both")
UNSTRUCTURED_SCOPES = ("global", "layer")
IMPORTANCE = ("weight", "activation")
# What a model card (prune.py) and the benchmarks say about unstructured pruning's speed and size.
HONESTY_NOTE = (
    "Unstructured pruning only sets weights to zero: the tensors keep their shape, so dense kernels "
    "(PyTorch, the SageMaker Hugging Face containers) do the same work and the dense safetensors file "
    "has the same size. Only compression (model.tar.gz's gzip, see size) or a sparse storage format "
    "and sparse kernels can turn the zeros into smaller files or faster inference."
)


# -- how many units ---------------------------------------------------------------------------

def units_to_remove(amount: float, units: int, what: str) -> int:
    """``amount`` of ``units`` rounded to a whole number (halves up); at least one, never all."""
    remove = math.floor(amount * units + 0.5)
    if remove < 1:
        raise StepError(f"--amount {amount} removes no {what} of {units} (rounded to 0); "
                        f"use at least {0.5 / units:.4g}")
    if remove >= units:
        raise StepError(f"--amount {amount} would remove every one of the {units} {what} in each layer; "
                        f"use below {(units - 0.5) / units:.4g}")
    return remove


def structured_units(config, target: str) -> dict[str, int]:
    """Units per layer that ``target`` prunes, from a config (``T5Config`` or its dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    units = {}
    if target in ("ffn", "both"):
        units["ffn"] = int(values["d_ff"])
    if target in ("heads", "both"):
        units["heads"] = int(values["num_heads"])
    return units


def check_structured_amount(config, target: str, amount: float) -> dict[str, int]:
    """Units removed per layer for each pruned kind, or a StepError when none or all would go."""
    names = {"ffn": "feed-forward neurons (d_ff)", "heads": "attention heads (num_heads)"}
    return {kind: units_to_remove(amount, units, names[kind]) for kind, units in structured_units(config, target).items()}


# -- where the units are ----------------------------------------------------------------------

def _stacks(model) -> list[tuple[str, object]]:
    return [(name, getattr(model, name)) for name in ("encoder", "decoder") if getattr(model, name, None) is not None]


def feed_forwards(model) -> Iterator[tuple[str, object]]:
    """``(name, module)`` of each block's feed-forward (``DenseReluDense``)."""
    for stack_name, stack in _stacks(model):
        for index, block in enumerate(stack.block):
            yield f"{stack_name}.block.{index}.ff", block.layer[-1].DenseReluDense


def attentions(model) -> Iterator[tuple[str, str, object]]:
    """``(group, name, module)`` for each attention; group is the stack for self-attention, the name for cross."""
    for stack_name, stack in _stacks(model):
        for index, block in enumerate(stack.block):
            yield stack_name, f"{stack_name}.block.{index}.self_attention", block.layer[0].SelfAttention
            if len(block.layer) == 3:  # decoder block: self-, cross-attention, feed-forward
                name = f"{stack_name}.block.{index}.cross_attention"
                yield name, name, block.layer[1].EncDecAttention


def _input_linears(ff) -> list:
    if hasattr(ff, "wi_0"):
        return [ff.wi_0, ff.wi_1]
    if hasattr(ff, "wi"):
        return [ff.wi]
    raise StepError(f"unexpected T5 feed-forward {type(ff).__name__}: no wi or wi_0/wi_1 to prune")


# -- importance -------------------------------------------------------------------------------

def ffn_weight_scores(ff):
    import torch

    score = ff.wo.weight.detach().float().norm(dim=0)
    for linear in _input_linears(ff):
        score = score * linear.weight.detach().float().norm(dim=1)
    return score.to(torch.float64)


def head_weight_scores(attention):
    import torch

    heads, d_kv = attention.n_heads, attention.key_value_proj_dim
    v = attention.v.weight.detach().float().view(heads, d_kv, -1)
    o = attention.o.weight.detach().float().view(-1, heads, d_kv)
    return (v.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)).to(torch.float64)


@dataclass
class Scores:
    ffn: dict[str, object] = field(default_factory=dict)  # name -> tensor [d_ff]
    heads: dict[str, object] = field(default_factory=dict)  # attention name -> tensor [num_heads]


def weight_scores(model) -> Scores:
    scores = Scores()
    for name, ff in feed_forwards(model):
        scores.ffn[name] = ffn_weight_scores(ff)
    for _, name, attention in attentions(model):
        scores.heads[name] = head_weight_scores(attention)
    return scores


def activation_scores(model, features: Sequence[dict]) -> Scores:
    """Mean per-token norm of each unit's contribution to its block's output, on ``features``.

    ``features`` are tokenized examples (``input_ids``, ``labels``) run one at a time, so no
    padding token is counted; the decoder sees the reference summary (teacher forcing).
    """
    import torch

    sums = Scores()
    tokens: dict[str, int] = {}
    hooks = []

    def ffn_hook(name, ff):
        column_norms = ff.wo.weight.detach().float().norm(dim=0)

        def hook(module, inputs):
            hidden = inputs[0].detach().float().flatten(0, -2)  # tokens x d_ff
            sums.ffn[name] = sums.ffn.get(name, 0) + (hidden.abs() * column_norms).sum(dim=0).double()
            tokens[name] = tokens.get(name, 0) + hidden.shape[0]
        return hook

    def head_hook(name, attention):
        heads, d_kv = attention.n_heads, attention.key_value_proj_dim
        o = attention.o.weight.detach().float().view(-1, heads, d_kv)  # d_model x heads x d_kv

        def hook(module, inputs):
            hidden = inputs[0].detach().float().flatten(0, -2).view(-1, heads, d_kv)  # tokens x heads x d_kv
            contribution = torch.einsum("thk,dhk->thd", hidden, o).norm(dim=-1)  # tokens x heads
            sums.heads[name] = sums.heads.get(name, 0) + contribution.sum(dim=0).double()
            tokens[name] = tokens.get(name, 0) + hidden.shape[0]
        return hook

    for name, ff in feed_forwards(model):
        hooks.append(ff.wo.register_forward_pre_hook(ffn_hook(name, ff)))
    for _, name, attention in attentions(model):
        hooks.append(attention.o.register_forward_pre_hook(head_hook(name, attention)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for feature in features:
                model(input_ids=torch.tensor([feature["input_ids"]]), labels=torch.tensor([feature["labels"]]))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not tokens:
        raise StepError("no calibration examples to measure activations on")
    return Scores(ffn={k: v / tokens[k] for k, v in sums.ffn.items()},
                  heads={k: v / tokens[k] for k, v in sums.heads.items()})


# -- choosing and removing --------------------------------------------------------------------

def _lowest(score, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (ties: lower index first), sorted."""
    import torch

    order = torch.argsort(score, stable=True)
    return sorted(int(i) for i in order[:count])


def choose_units(model, scores: Scores, remove: dict[str, int]) -> dict[str, dict[str, list[int]]]:
    """Which units to remove: ``{"ffn": {block: [neurons]}, "heads": {attention: [heads]}}``."""
    chosen: dict[str, dict[str, list[int]]] = {}
    if "ffn" in remove:
        chosen["ffn"] = {name: _lowest(scores.ffn[name], remove["ffn"]) for name, _ in feed_forwards(model)}
    if "heads" in remove:
        groups: dict[str, list[str]] = {}
        for group, name, _ in attentions(model):
            groups.setdefault(group, []).append(name)
        chosen["heads"] = {}
        for group, names in groups.items():
            # Shared position bias: one choice for all of a stack's self-attentions, every layer
            # weighted equally (each layer's scores normalized to sum to 1).
            total = sum(scores.heads[n] / scores.heads[n].sum().clamp_min(1e-30) for n in names)
            heads = _lowest(total, remove["heads"])
            for name in names:
                chosen["heads"][name] = heads
    return chosen


def _keep(size: int, removed: Sequence[int]):
    import torch

    gone = set(removed)
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def _sliced_linear(linear, index, dim: int):
    """A new Linear holding only ``index`` along ``dim`` of the weight (0: outputs, 1: inputs)."""
    from torch import nn

    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach().index_select(0, index).clone() if dim == 0 else linear.bias.detach().clone()
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def remove_ffn_neurons(ff, neurons: Sequence[int]) -> None:
    keep = _keep(ff.wo.in_features, neurons)
    for attr in ("wi_0", "wi_1", "wi"):
        if hasattr(ff, attr):
            setattr(ff, attr, _sliced_linear(getattr(ff, attr), keep, dim=0))
    ff.wo = _sliced_linear(ff.wo, keep, dim=1)


def remove_heads(attention, heads: Sequence[int]) -> None:
    import torch
    from torch import nn

    d_kv = attention.key_value_proj_dim
    keep_heads = _keep(attention.n_heads, heads)
    rows = (keep_heads[:, None] * d_kv + torch.arange(d_kv)[None, :]).flatten()
    for attr in ("q", "k", "v"):
        setattr(attention, attr, _sliced_linear(getattr(attention, attr), rows, dim=0))
    attention.o = _sliced_linear(attention.o, rows, dim=1)
    if attention.has_relative_attention_bias:
        old = attention.relative_attention_bias
        table = old.weight.detach().index_select(1, keep_heads).clone()
        new = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
        new.weight = nn.Parameter(table, requires_grad=old.weight.requires_grad)
        attention.relative_attention_bias = new
    attention.n_heads = len(keep_heads)
    attention.inner_dim = attention.n_heads * d_kv


def prune_structured(model, chosen: dict[str, dict[str, list[int]]]) -> dict[str, int]:
    """Remove the ``chosen`` units in place and write the new ``d_ff``/``num_heads`` into the configs."""
    sizes = {}
    if "ffn" in chosen:
        for name, ff in feed_forwards(model):
            remove_ffn_neurons(ff, chosen["ffn"][name])
        sizes["d_ff"] = {ff.wo.in_features for _, ff in feed_forwards(model)}.pop()
    if "heads" in chosen:
        for _, name, attention in attentions(model):
            remove_heads(attention, chosen["heads"][name])
        sizes["num_heads"] = {a.n_heads for _, _, a in attentions(model)}.pop()
    for config in {id(c): c for c in (model.config, *(stack.config for _, stack in _stacks(model)))}.values():
        for key, value in sizes.items():
            setattr(config, key, value)
    return sizes


# -- unstructured -----------------------------------------------------------------------------

def block_linears(model) -> list[tuple[str, object]]:
    """``(name, Linear)`` of every Linear inside the encoder and decoder blocks (not the LM head)."""
    from torch import nn

    found = []
    for stack_name, stack in _stacks(model):
        for name, module in stack.block.named_modules():
            if isinstance(module, nn.Linear):
                found.append((f"{stack_name}.block.{name}", module))
    return found


def prune_unstructured(model, amount: float, scope: str) -> dict[str, object]:
    """Zero the ``amount`` smallest-magnitude weights of the block Linears; returns each layer's keep mask."""
    import torch
    from torch.nn.utils import prune

    layers = block_linears(model)
    if scope == "global":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    elif scope == "layer":
        for _, module in layers:
            prune.l1_unstructured(module, "weight", amount=amount)
    else:
        raise StepError(f"--scope {scope!r}: choose from {', '.join(UNSTRUCTURED_SCOPES)}")
    masks = {}
    for name, module in layers:
        masks[name] = module.weight_mask.detach().to(torch.bool).clone()
        prune.remove(module, "weight")  # permanent: weight = weight_orig * mask, no hooks left
    return masks


def reapply_masks(model, masks: dict[str, object]) -> None:
    """Zero again what ``masks`` pruned (after merging a dense LoRA update into pruned weights)."""
    import torch

    layers = dict(block_linears(model))
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def sparsity(model, layer_names: Sequence[str] | None = None) -> dict:
    """Zeros among all parameters and among the named block Linears' weights (fractions in [0, 1])."""
    zeros_all = sum(int((p == 0).sum()) for p in model.parameters())
    total_all = sum(p.numel() for p in model.parameters())
    layers = dict(block_linears(model))
    names = list(layers) if layer_names is None else list(layer_names)
    zeros = sum(int((layers[n].weight == 0).sum()) for n in names)
    total = sum(layers[n].weight.numel() for n in names)
    return {"overall": round(zeros_all / total_all, 6), "pruned_layers": round(zeros / total, 6) if total else 0.0,
            "zeros_overall": zeros_all, "zeros_in_pruned_layers": zeros, "pruned_layers_parameters": total,
            "pruned_layers_count": len(names)}


# -- size -------------------------------------------------------------------------------------

def weights_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def gzip_size(paths: Sequence[Path], level: int = 6, chunk: int = 1 << 22) -> int:
    """Bytes of ``paths`` after deflate at gzip's default level (what ``model.tar.gz`` applies), without writing."""
    total = 0
    for path in paths:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip framing
        with open(path, "rb") as source:
            while block := source.read(chunk):
                total += len(compressor.compress(block))
        total += len(compressor.flush())
    return total


def weights_size(folder: str | Path, compressed: bool = True) -> dict:
    """Size of a model folder's weight files as stored (dense) and, optionally, gzip-compressed."""
    files = weights_files(folder)
    size = {"weights_bytes": sum(f.stat().st_size for f in files)}
    if compressed:
        size["weights_gzip_bytes"] = gzip_size(files)
    return size
