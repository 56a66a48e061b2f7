"""PEFT LoRA on a T5: the command-line settings and attaching the adapter, shared by every step that uses it.

``finetune_lora.py`` fine-tunes with it; ``prune.py`` uses it for its optional recovery
fine-tune. Both then merge the adapter into the weights (``merge_and_unload``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .errors import StepError

T5_LINEAR_MODULES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def add_lora_arguments(group, r: int = 32, alpha: int = 32, dropout: float = 0.05, target_modules: str = "q,v") -> None:
    """The ``--lora-*`` and ``--target-modules`` flags, with a step's own defaults."""
    group.add_argument("--lora-r", type=int, default=r, help=f"adapter rank (default: {r})")
    group.add_argument("--lora-alpha", type=int, default=alpha,
                       help=f"scaling numerator: updates are scaled by alpha/r (default: {alpha})")
    group.add_argument("--lora-dropout", type=float, default=dropout, help=f"dropout on the adapter input (default: {dropout})")
    group.add_argument("--target-modules", default=target_modules,
                       help="comma-separated T5 linear layers to adapt (q,k,v,o,wi_0,wi_1,wo) or all-linear "
                            f"(default: {target_modules})")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: str  # as given on the command line: "q,v" or "all-linear"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoraSettings":
        """The settings from :func:`add_lora_arguments`' flags, checked (a bad value is a StepError)."""
        settings = cls(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=args.target_modules)
        settings.check()
        return settings

    def check(self) -> None:
        if self.r < 1:
            raise StepError(f"--lora-r must be at least 1, got {self.r}")
        if self.alpha < 1:
            raise StepError(f"--lora-alpha must be at least 1, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise StepError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        target_modules(self.target_modules)

    def card(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": self.target_modules}


def target_modules(spec: str) -> str | list[str]:
    if spec.strip() == "all-linear":
        return "all-linear"  # peft: every linear layer except the LM head
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in T5_LINEAR_MODULES]
    if not names or unknown:
        raise StepError(f"--target-modules {spec!r}: unknown module(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(T5_LINEAR_MODULES)} or all-linear")
    return names


def attach_lora(model, settings: LoraSettings):
    """Wrap ``model`` in a peft model with a fresh LoRA adapter; prints peft's trainable-parameters line."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_modules(settings.target_modules), task_type=TaskType.SEQ_2_SEQ_LM)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. a module name this architecture lacks
        raise StepError(f"--target-modules {settings.target_modules}: {str(err).splitlines()[0]}") from None
    peft_model.print_trainable_parameters()  # peft's standard "trainable params: … || all params: …" line
    return peft_model
