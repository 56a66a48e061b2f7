"""Post-training quantization of T5 models, and an int8 format that loads back in a fresh process.

Methods:
  fp16, bf16    every weight cast to half precision; a plain ``save_pretrained`` folder. T5
                overflows in fp16 (feed-forward activations pass fp16's 65,504, giving inf/NaN);
                transformers keeps ``wo`` in fp32 when it loads fp16 T5, which helps but does not
                make it safe. bf16 has fp32's range.
  int8-dynamic  Linear weights int8; each Linear quantizes its input on the fly (per tensor, from
                that call's min/max) and runs an int8 GEMM (fbgemm/oneDNN) with fp32 output:
                ``torch.ao.nn.quantized.dynamic.Linear`` → ``torch.ops.quantized.linear_dynamic``.
  int8-static   the same int8 weights; each Linear's input scale and zero point are fixed
                beforehand by a calibration pass over training prompts (``HistogramObserver``),
                then ``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32``
                quantizes the input with them, runs the int8 GEMM and returns fp32. Only the
                Linear layers are quantized (one wrapper per Linear, not whole-graph static
                quantization): attention matmuls, softmax, norms and activations stay fp32.

In both int8 methods the FFN output projections ``wo`` stay fp32 (the largest activations in
T5 enter them; quantizing them costs accuracy: transformers keeps them in fp32 for fp16 too),
as do the embeddings (``shared``), ``lm_head``, layer norms and relative-position biases.
Weights are symmetric per output channel (zero point 0), as torch's default weight observer.

int8 format ("flanops-int8", version 1): one safetensors file, ``quantized_model.safetensors``
(no pickle), beside the source model's ``config.json``, ``generation_config.json`` and tokenizer:
  <linear>.weight            int8 [out, in]
  <linear>.weight_scale      float32 [out]    (real weight = int8 x scale)
  <linear>.input_scale       float32 [1]      int8-static only: fixed input quantization
  <linear>.input_zero_point  int32 [1]        (uint8 codes: real = (code - zero point) x scale)
  <linear>.bias              float32 [out]    when the layer has one (T5's have none)
  every other parameter      as saved, under its own name; tied parameters once, the others
                             listed in the header's ``aliases`` (JSON name → saved name)
The header's metadata holds ``format``, ``format_version`` and ``method``. The loader builds
the model from ``config.json`` on the meta device, swaps in the int8 modules, and assigns every
other tensor by name; a missing, extra or mis-shaped tensor is an error, never a silent init.

The kernels come from torch.ao.quantization, which torch has deprecated in favour of torchao
(it warns; still present and working in torch 2.13), on the x86 engine (fbgemm): tested on x86
CPUs only, not on ARM (qnnpack). The file itself holds plain int8 and
float tensors, so a future runtime (torchao, ``torch._int_mm``) can read it unchanged.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import StepError, first_line

HALF_METHODS = {"fp16": torch.float16, "bf16": torch.bfloat16}
INT8_METHODS = ("int8-dynamic", "int8-static")
METHODS = (*HALF_METHODS, *INT8_METHODS)
FORMAT = "flanops-int8"
FORMAT_VERSION = "1"
WEIGHTS_FILE = "quantized_model.safetensors"
KEEP_FULL_PRECISION = ("wo", "lm_head")  # Linear layers (by attribute name) that stay fp32 in the int8 methods
COPIED_FILES = ("config.json", "generation_config.json")  # taken verbatim from the source model folder
# Activation calibration for int8-static, as x86's default qconfig (torch.ao get_default_qconfig("x86")):
# a histogram observer (picks the range that minimises quantization error, clipping rare outliers)
# with 7-bit codes (0..127, "reduce_range") for the calibrated range, so that the u8 x s8 pair sums
# of fbgemm's AVX2 kernel cannot saturate int16 on CPUs without VNNI. The kernel itself takes the full
# uint8 range, so inputs beyond the calibrated range (up to about twice it) are kept, not clipped.
ACTIVATION_QUANT_RANGE = (0, 127)


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (one per call site, the same text every time)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
        yield


# ----------------------------------------------------------------------------- int8 modules


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(codes int8 [out, in], scale float32 [out])``."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    weight = weight.detach().float()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight)
    scale, _ = observer.calculate_qparams()
    codes = torch.clamp(torch.round(weight / scale[:, None]), -128, 127).to(torch.int8)
    return codes, scale.float()


def _qtensor(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The torch quantized tensor (qint8, per channel) for int8 codes and scales.

    Built with public calls only: dequantize, then quantize with the same scales (exact: the
    round trip moves each value by far less than half a step).
    """
    scale = scale.float()
    return torch.quantize_per_channel(codes.float() * scale[:, None], scale.double(),
                                      torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)


def dynamic_linear(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_features, in_features = codes.shape
    module = DynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    module.set_weight_bias(_qtensor(codes, scale), bias)
    return module


class StaticInt8Linear(nn.Module):
    """A Linear whose input is quantized with a calibrated scale/zero point; int8 GEMM; fp32 out."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float, input_zero_point: int):
        from torch.ao.nn.quantized.modules.linear import LinearPackedParams

        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self._packed_params = LinearPackedParams(torch.qint8)  # torch's own holder: fbgemm/oneDNN packed weight
        self._packed_params.set_weight_bias(_qtensor(codes, scale), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.input_scale, self.input_zero_point, self._packed_params._packed_params)

    def _weight_bias(self):
        return self._packed_params._weight_bias()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point}")


def _is_int8_module(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, (DynamicLinear, StaticInt8Linear))


# ----------------------------------------------------------------------------- quantizing


def quantizable_linears(model) -> list[str]:
    """Names of the Linear layers the int8 methods quantize: all but ``wo`` and ``lm_head``."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FULL_PRECISION]


def short_names(patterns: list[str]) -> list[str]:
    """``decoder.block.*.layer.*.DenseReluDense.wo.weight`` → ``wo``: for one-line summaries."""
    return sorted({pattern.removesuffix(".weight").rsplit(".", 1)[-1] for pattern in patterns})


def kept_in_full_precision(model, quantized: list[str]) -> list[str]:
    """Parameter names left in floating point, block numbers folded into ``*`` (a short list)."""
    prefixes = tuple(f"{name}." for name in quantized)
    names = [name for name, _ in model.named_parameters() if not name.startswith(prefixes)]
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def quantize_dynamic(model) -> list[str]:
    """Swap every quantizable Linear for a dynamically quantized one, in place; returns their names."""
    names = quantizable_linears(model)
    with quiet_torch_ao():
        for name in names:
            linear = model.get_submodule(name)
            codes, scale = quantize_weight(linear.weight)
            model.set_submodule(name, dynamic_linear(codes, scale, _bias(linear)))
    return names


def calibrate(model, batches: list[dict], names: list[str]) -> dict[str, tuple[float, int]]:
    """Run ``batches`` through ``model`` and return each named Linear's input (scale, zero point).

    Each batch is a dict of model inputs (``input_ids``, ``attention_mask``, ``labels``): the
    decoder is teacher-forced on the reference summary, so its layers see realistic inputs.
    """
    from torch.ao.quantization.observer import HistogramObserver

    low, high = ACTIVATION_QUANT_RANGE
    observers = {name: HistogramObserver(dtype=torch.quint8, quant_min=low, quant_max=high) for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(_observe(observers[name])) for name in names]
    model.eval()
    try:
        with torch.no_grad(), quiet_torch_ao():
            for batch in batches:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    qparams = {}
    for name, observer in observers.items():
        scale, zero_point = observer.calculate_qparams()
        qparams[name] = (float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]))
    return qparams


def _observe(observer):
    def hook(module, args):
        observer(args[0].detach())

    return hook


def quantize_static(model, batches: list[dict]) -> list[str]:
    """Calibrate on ``batches``, then swap every quantizable Linear for a static int8 one, in place."""
    names = quantizable_linears(model)
    qparams = calibrate(model, batches, names)
    with quiet_torch_ao():
        for name in names:
            linear = model.get_submodule(name)
            codes, scale = quantize_weight(linear.weight)
            model.set_submodule(name, StaticInt8Linear(codes, scale, _bias(linear), *qparams[name]))
    return names


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float()


# ----------------------------------------------------------------------------- saving


def int8_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The int8 format's tensors for an in-memory quantized model, and the aliases of tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    with quiet_torch_ao():
        for name, module in model.named_modules():
            if not _is_int8_module(module):
                continue
            quantized.append(name)
            qweight, bias = module._weight_bias()
            zero_points = qweight.q_per_channel_zero_points()
            if qweight.qscheme() != torch.per_channel_affine or bool(zero_points.any()):
                raise ValueError(f"{name}: expected symmetric per-channel weights, got {qweight.qscheme()}")
            tensors[f"{name}.weight"] = qweight.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = qweight.q_per_channel_scales().float().contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().float().contiguous()
            if isinstance(module, StaticInt8Linear):
                tensors[f"{name}.input_scale"] = torch.tensor([module.input_scale], dtype=torch.float32)
                tensors[f"{name}.input_zero_point"] = torch.tensor([module.input_zero_point], dtype=torch.int32)
    prefixes = tuple(f"{name}." for name in quantized)
    aliases: dict[str, str] = {}
    saved_as: dict[int, str] = {}
    for name, tensor in _named_tensors(model):
        if name.startswith(prefixes):
            continue
        if id(tensor) in saved_as:
            aliases[name] = saved_as[id(tensor)]
            continue
        saved_as[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _named_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def save_int8(model, folder: str | Path, method: str) -> Path:
    """Write the int8 model's weights file into ``folder`` (config and tokenizer are the caller's)."""
    from safetensors.torch import save_file

    tensors, aliases = int8_tensors(model)
    path = Path(folder) / WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
                                            "aliases": json.dumps(aliases, sort_keys=True)})
    return path


# ----------------------------------------------------------------------------- loading


def load_quantized(folder: str | Path, flag: str = "--model-dir"):
    """Load a model folder written by quantize.py, by the method its model card names."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .modeling import read_model_card

    folder = Path(folder)
    method = (read_model_card(folder).get("quantization") or {}).get("method")
    if method not in METHODS:
        raise StepError(f"{flag} {folder}: model_card.json names quantization method {method!r}; this version of "
                        f"flanops reads {', '.join(METHODS)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)  # nosec B615 # a local model folder, not the Hub
        if method in HALF_METHODS:
            model = AutoModelForSeq2SeqLM.from_pretrained(  # nosec B615 # a local model folder
                folder, **dtype_argument(HALF_METHODS[method]))
        else:
            model = load_int8_model(folder, flag)
    except (OSError, ValueError, RuntimeError) as err:
        raise StepError(f"{flag} {folder}: cannot load the {method} model ({first_line(err)}); "
                        "is a file corrupted or truncated?") from None
    return model, tokenizer


def dtype_argument(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` in transformers 5, ``torch_dtype`` in 4.x (the
    Hugging Face inference images; 4.51 passes ``dtype`` on to the config and fails serializing it)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_int8_model(folder: str | Path, flag: str = "--model-dir"):
    """Rebuild an int8 model from ``config.json`` and ``quantized_model.safetensors``."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig

    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise StepError(f"{flag} {folder}: no {WEIGHTS_FILE}; the model card says int8 (written by quantize.py)")
    try:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata() or {}
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}
    except SafetensorError as err:
        raise StepError(f"{path}: not a readable safetensors file ({first_line(err)}); is it truncated?") from None
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise StepError(f"{path}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}; "
                        f"this version of flanops reads {FORMAT} version {FORMAT_VERSION}")
    aliases = json.loads(metadata.get("aliases") or "{}")

    config = AutoConfig.from_pretrained(folder)  # nosec B615 # a local model folder, not the Hub
    with torch.device("meta"):  # structure only: every tensor comes from the file
        model = AutoModelForSeq2SeqLM.from_config(config)
    used: set[str] = set()
    with quiet_torch_ao():
        for name in sorted(key[: -len(".weight_scale")] for key in tensors if key.endswith(".weight_scale")):
            model.set_submodule(name, _int8_module(model, name, tensors, used, path))
    _assign_tensors(model, tensors, aliases, used, path)
    unused = sorted(set(tensors) - used)
    if unused:
        raise StepError(f"{path}: {len(unused)} tensor(s) that config.json's model does not have, e.g. {unused[0]}; "
                        "do config.json and the weights come from the same model?")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)  # nosec B615 # a local folder
    model.eval()
    return model


def _int8_module(model, name: str, tensors: dict, used: set[str], path: Path) -> nn.Module:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    codes, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
    if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(codes.shape):
        raise StepError(f"{path}: {name} is an int8 layer of shape {tuple(codes.shape)}, but config.json's model "
                        f"has {'no such Linear' if linear is None else type(linear).__name__ + ' ' + str(tuple(linear.weight.shape))}")
    if codes.dtype != torch.int8 or scale.shape != (codes.shape[0],):
        raise StepError(f"{path}: {name}: expected int8 weights and one scale per output channel")
    bias = tensors.get(f"{name}.bias")
    keys = [f"{name}.weight", f"{name}.weight_scale"] + ([f"{name}.bias"] if bias is not None else [])
    if f"{name}.input_scale" in tensors:
        keys += [f"{name}.input_scale", f"{name}.input_zero_point"]
        module = StaticInt8Linear(codes, scale, bias, float(tensors[f"{name}.input_scale"][0]),
                                  int(tensors[f"{name}.input_zero_point"][0]))
    else:
        module = dynamic_linear(codes, scale, bias)
    used.update(keys)
    return module


def _assign_tensors(model, tensors: dict, aliases: dict[str, str], used: set[str], path: Path) -> None:
    """Put every remaining parameter/buffer of the meta-device model in place from ``tensors``."""
    loaded: dict[str, torch.Tensor] = {}
    for name, placeholder in list(_named_tensors(model)):
        source = name if name in tensors else aliases.get(name)
        if source not in tensors:
            raise StepError(f"{path}: no tensor for {name}; do config.json and the weights come from the same model?")
        if source not in loaded:
            tensor = tensors[source]
            if tuple(tensor.shape) != tuple(placeholder.shape):
                raise StepError(f"{path}: {source} has shape {tuple(tensor.shape)}, config.json's model expects "
                                f"{tuple(placeholder.shape)}")
            loaded[source] = nn.Parameter(tensor, requires_grad=False) if isinstance(placeholder, nn.Parameter) else tensor
            used.add(source)
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attribute in owner._parameters:
            owner._parameters[attribute] = loaded[source]
        else:
            owner._buffers[attribute] = loaded[source]
