"""The models and inputs the benchmarks measure: random-weight Flan-T5s of real dimensions, saved as the steps save them.

No Flan-T5 tokenizer is available offline, so one is trained on synthetic dialogues
(``stepkit.tiny.train_tokenizer``); its ids all fall inside the models' 32128-row embedding.
Inputs have an exact token length (prompts cut to ``input_tokens``) so that every model does
the same work, and generation always produces exactly ``new_tokens`` tokens.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from stepkit.catalog import build_random_model
from stepkit.cost import encode_prompts, generate_fixed
from stepkit.modeling import save_model
from .harness import BenchSettings, ModelSpec, Progress, interleaved

TOKENIZER_DIALOGUES = 300
DATA_SEED = 11   # any seed: the texts only give the tokenizer and the prompts their words


def dialogues(count: int, seed: int = DATA_SEED) -> list[dict]:
    from stepkit.synthetic import generate_splits

    return generate_splits({"test": count}, seed)["test"]


def build_tokenizer():
    from stepkit.tiny import train_tokenizer

    rows = dialogues(TOKENIZER_DIALOGUES)
    return train_tokenizer([r["dialogue"] for r in rows] + [r["summary"] for r in rows])


def long_texts(count: int, min_chars: int) -> list[str]:
    """``count`` distinct texts of at least ``min_chars`` characters (dialogues joined end to end)."""
    rows = dialogues(max(8, count * 2))
    texts = []
    for start in range(count):
        text, index = "", start
        while len(text) < min_chars:
            text += rows[index % len(rows)]["dialogue"] + "\n"
            index += 1
        texts.append(text)
    return texts


def fixed_inputs(tokenizer, length: int, batch: int = 1):
    """A batch of prompts each exactly ``length`` tokens long (no padding), as model inputs."""
    texts = long_texts(batch, min_chars=length * 8)   # a token is rarely longer than 8 characters here
    inputs = encode_prompts(tokenizer, texts, length)
    if tuple(inputs["input_ids"].shape) != (batch, length) or not bool(inputs["attention_mask"].all()):
        raise RuntimeError(f"bug: prompts of {length} tokens expected, got shape {tuple(inputs['input_ids'].shape)}")
    return inputs


def batch1_latency(models: dict[str, Any], tokenizer, settings: BenchSettings, progress: Progress,
                   label: str) -> dict[str, list[float]]:
    """Each model's fixed-length generation from one fixed-length prompt, timed in interleaved rounds."""
    import torch

    single = fixed_inputs(tokenizer, settings.input_tokens, 1)
    with torch.inference_mode():
        return interleaved({name: (lambda m=model: generate_fixed(m, single, settings.new_tokens))
                            for name, model in models.items()},
                           settings.warmup, settings.repeats, progress, f"{label} batch 1")

class Workspace:
    """A scratch folder of saved models (removed at the end of the run), the shared tokenizer, and what
    sections share (a model variant, a measurement) made once per run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._tokenizer = None
        self._fp32: dict[str, Path] = {}
        self._once: dict[tuple, Any] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer()
        return self._tokenizer

    def folder(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def fp32(self, spec: ModelSpec, seed: int) -> Path:
        """The random-weight float32 model of ``spec``, saved once per run (save_model: safetensors + card)."""
        if spec.name not in self._fp32:
            model = build_random_model(spec.dims, "float32", seed).eval()
            folder = self.folder(spec.name, "fp32")
            save_model(model, self.tokenizer, folder, {"base_model": spec.name, "method": "none",
                                                       "weights": f"random (seed {seed}): a benchmark model"})
            self._fp32[spec.name] = folder
        return self._fp32[spec.name]

    def variant(self, spec: ModelSpec, method: str, seed: int) -> Path:
        """``method`` of the fp32 model (quantize.py's: ct2-int8, bf16, fp16), made by steps/quantize.py itself."""
        if method == "fp32":
            return self.fp32(spec, seed)

        def make() -> Path:
            from flanops.pipelines.step_scripts import import_step

            folder = self.root / spec.name / method
            shutil.rmtree(folder, ignore_errors=True)
            import_step("quantize").main(["--model-dir", str(self.fp32(spec, seed)), "--method", method,
                                          "--output-dir", str(folder)])
            return folder

        return self.once(("variant", spec.name, method), make)

    def once(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``'s result, made at the first call with ``key`` in this run."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]

    def save(self, model, spec: ModelSpec, variant: str, card: dict) -> Path:
        folder = self.folder(spec.name, variant)
        save_model(model, self.tokenizer, folder, {"base_model": spec.name, **card})
        return folder

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
