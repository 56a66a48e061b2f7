"""Quiet by default: the library messages stepkit.quiet hides are gone from a step's output, shown with
FLANOPS_VERBOSE (what `flanops run --verbose` sets), and nothing else a library says is hidden."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import STEPS
from stepkit import catalog
from stepkit.quiet import GRADIENT_CHECKPOINTING_MESSAGE, MERGED_HEAD_MESSAGE, TIED_HEAD_MESSAGE, VERBOSE_ENV

from test_model_archive import TINY_DIMS

# A step as the pipeline runs one (run_step), doing what made the noise: load an untied-head T5 from its
# checkpoint, put LoRA on it and merge it; then a transformers warning that is not known noise.
STEP = textwrap.dedent("""
    import logging, sys
    from stepkit.errors import run_step

    def main(argv):
        from peft import LoraConfig, get_peft_model
        from transformers import T5ForConditionalGeneration
        model = T5ForConditionalGeneration.from_pretrained(argv[0])
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q", "v"]))
        model.merge_and_unload()
        logging.getLogger("transformers.modeling_utils").warning("an unrelated warning from the loader")

    sys.exit(run_step(main, sys.argv[1:]))
""")
NOISE = (TIED_HEAD_MESSAGE, GRADIENT_CHECKPOINTING_MESSAGE, MERGED_HEAD_MESSAGE)


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("untied") / "model"
    model = catalog.build_random_model(TINY_DIMS, seed=0)
    assert model.lm_head.weight is not model.shared.weight   # as every Flan-T5 checkpoint
    model.save_pretrained(folder)
    return folder


def _run(script: Path, model: Path, verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    if verbose:
        env[VERBOSE_ENV] = "1"
    env["PYTHONPATH"] = str(STEPS)
    result = subprocess.run([sys.executable, str(script), str(model)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_known_noise_is_hidden_unless_verbose_and_other_warnings_still_show(untied_checkpoint, tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP)
    quiet = _run(script, untied_checkpoint, verbose=False)
    loud = _run(script, untied_checkpoint, verbose=True)
    for message in NOISE:   # each filter still matches what the installed libraries say
        assert message in loud, f"{message!r} no longer appears with {VERBOSE_ENV}=1: update stepkit/quiet.py\n{loud}"
        assert message not in quiet, quiet
    assert "an unrelated warning from the loader" in quiet and "an unrelated warning from the loader" in loud


def test_flanops_verbose_reaches_the_jobs_through_the_environment(monkeypatch, tmp_path):
    from flanops.pipelines import cli, pipeline_commands

    seen = []

    def run(config, **options) -> int:   # where the run would start the executor
        seen.append(os.environ.get(VERBOSE_ENV))
        return 0

    monkeypatch.setenv(VERBOSE_ENV, "0")   # not verbose; and monkeypatch puts back whatever cli.main sets
    monkeypatch.setattr(pipeline_commands, "run", run)
    assert cli.main(["run", "--output-dir", str(tmp_path / "run")]) == 0
    assert cli.main(["run", "--verbose", "--output-dir", str(tmp_path / "run")]) == 0
    assert seen == ["0", "1"]   # the local executor passes this process's environment to every job


@pytest.mark.parametrize("missing, hidden", [
    (["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"], True),   # the shared embedding, stored once
    (["decoder.embed_tokens.weight"], True),
    (["encoder.embed_tokens.weight", "lm_head.weight"], False),             # a head of its own: really missing
    (["encoder.block.0.layer.0.SelfAttention.q.weight"], False),
])
def test_the_trainer_may_miss_only_the_tied_embeddings_quietly(missing, hidden, tmp_path):
    """distill.py's best-checkpoint load; the message as transformers' Trainer words it."""
    script = tmp_path / "trainer_log.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys
        from stepkit.quiet import quiet_known_noise
        logging.basicConfig()
        quiet_known_noise()
        logging.getLogger("transformers.trainer").warning("There were missing keys in the checkpoint model loaded: "
                                                          + repr({missing!r}) + ".")
    """))
    env = {**{k: v for k, v in os.environ.items() if k != VERBOSE_ENV}, "PYTHONPATH": str(STEPS)}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("missing keys" not in result.stderr) == hidden, result.stderr
