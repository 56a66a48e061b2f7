"""The endpoint's inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

Every ``model.tar.gz`` that flanops packages (``stepkit.packaging.package_model``) carries this file
as ``code/inference.py``, with ``code/stepkit/`` beside it. The SageMaker Hugging Face inference
toolkit (``sagemaker-huggingface-inference-toolkit``, in the Hugging Face inference images) puts
``code/`` on ``sys.path``, calls ``model_fn(model_dir)`` once, then per request
``input_fn(body, content_type)`` → ``predict_fn(data, model)`` → ``output_fn(prediction, accept)``.
None takes the toolkit's optional trailing ``context`` argument. Every model variant (fp32, bf16,
CTranslate2 int8, pruned, distilled) loads through ``stepkit.modeling.load_model_and_tokenizer`` and generates
through ``stepkit.generation.summarize``, with the prompt template the model was trained and
evaluated with; by default with the evaluation's settings (greedy, 64 new tokens).

Request (``application/json``)::

    {"inputs": "<dialogue>" | ["<dialogue>", ...],
     "parameters": {"max_new_tokens": 64, "num_beams": 4, ...}}      # optional

or ``text/plain``: the body is one dialogue (no Content-Type counts as JSON). Response (``application/json``; ``Accept`` may be
``application/json`` or ``*/*``): ``[{"generated_text": "<summary>"}, ...]``, one per input, in order.

Generation parameters allowed (anything else is refused):
  max_new_tokens        1 … FLANOPS_MAX_NEW_TOKENS        (default 64)
  min_new_tokens        0 … max_new_tokens
  num_beams             1 … FLANOPS_MAX_NUM_BEAMS         (default 1: greedy)
  length_penalty        -5.0 … 5.0                        (beam search: >0 favours longer summaries)
  no_repeat_ngram_size  0 … 10                            (0: off)
  repetition_penalty    1.0 … 2.0                         (1.0: off; below 1 rewards repeats)
  early_stopping        true / false                      (beam search)
  do_sample             true / false                      (default false)
  temperature           0.01 … 2.0                        only with do_sample
  top_p                 0.01 … 1.0                        only with do_sample
  top_k                 1 … 1000                          only with do_sample

Limits, set by the endpoint's environment (the Model's ``Environment``), whole numbers:
  FLANOPS_MAX_DIALOGUE_CHARS  10000  characters per dialogue (the model reads its first 512
                                     tokens, about 2,000 characters; this bounds tokenizing work)
  FLANOPS_MAX_BATCH_SIZE      16     dialogues per request
  FLANOPS_MAX_NEW_TOKENS      256    upper bound of max_new_tokens
  FLANOPS_MAX_NUM_BEAMS       8      upper bound of num_beams
Cost grows with batch x beams x new tokens: keep a request within the 60 s that SageMaker waits.

Concurrent requests are batched (``stepkit.batching``): requests with the same generation
settings share ``generate`` calls, and each dialogue's summary is the one it gets alone.
  FLANOPS_BATCH_DIALOGUES     32     dialogues per shared generate call
  FLANOPS_BATCH_WAIT_MS       2      longest wait for more requests to join a batch
  FLANOPS_MAX_QUEUE           64     requests waiting at most; beyond it a request gets 429
  FLANOPS_QUEUE_TIMEOUT_S     50     a request not started by then gets 503 (SageMaker waits 60 s)
Workers: a CTranslate2 model runs one batch per core at once (one intra-op thread each, see
``stepkit.threads``); a PyTorch model one batch at a time. Under the SageMaker Hugging Face
toolkit each model-server worker process holds its own model and batcher, and its requests
come one at a time: there, concurrency comes from the workers (SAGEMAKER_MODEL_SERVER_WORKERS).

A bad request raises :class:`RequestError` (a ValueError) whose ``status_code`` says why: 400 bad
JSON, empty input or bad parameter, 413 too large, 415 unsupported content type, 406 unsupported
Accept; ``str()`` is one sentence saying what was wrong and what is allowed. The toolkit answers
any exception with HTTP 400 and that text; flanops' local endpoint server uses ``status_code``.
Accept is only known to ``output_fn`` (the toolkit's interface), so a 406 comes after generating.

Requests share only the model, which they read, and the batcher: ``predict_fn`` may be called
from several threads at once (``CONCURRENT_REQUESTS``; flanops' local endpoint does).
"""
from __future__ import annotations

import codecs
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from stepkit.batching import Batcher, Refused
from stepkit.generation import summarize
from stepkit.modeling import load_model_and_tokenizer
from stepkit.quiet import quiet_known_noise
from stepkit.records import json_reason
from stepkit.threads import inference_threads

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain"


def _limit(name: str, default: int) -> int:
    """A positive whole number from the environment; a bad value stops the endpoint at start-up."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r}: expected a whole number of at least 1")
    return value


MAX_DIALOGUE_CHARS = _limit("FLANOPS_MAX_DIALOGUE_CHARS", 10000)
MAX_BATCH_SIZE = _limit("FLANOPS_MAX_BATCH_SIZE", 16)
MAX_NEW_TOKENS = _limit("FLANOPS_MAX_NEW_TOKENS", 256)
MAX_NUM_BEAMS = _limit("FLANOPS_MAX_NUM_BEAMS", 8)
BATCH_DIALOGUES = _limit("FLANOPS_BATCH_DIALOGUES", 32)
BATCH_WAIT_MS = _limit("FLANOPS_BATCH_WAIT_MS", 2)
MAX_QUEUE = _limit("FLANOPS_MAX_QUEUE", 64)
QUEUE_TIMEOUT_S = _limit("FLANOPS_QUEUE_TIMEOUT_S", 50)
CONCURRENT_REQUESTS = True   # predict_fn may be called from several threads at once (the batcher serialises)

# name → (type, lowest, highest); highest None: the limit above. Sampling knobs need do_sample.
PARAMETERS: dict[str, tuple[type, float, float | None]] = {
    "max_new_tokens": (int, 1, None),
    "min_new_tokens": (int, 0, None),
    "num_beams": (int, 1, None),
    "length_penalty": (float, -5.0, 5.0),
    "no_repeat_ngram_size": (int, 0, 10),
    "repetition_penalty": (float, 1.0, 2.0),
    "early_stopping": (bool, 0, 1),
    "do_sample": (bool, 0, 1),
    "temperature": (float, 0.01, 2.0),
    "top_p": (float, 0.01, 1.0),
    "top_k": (int, 1, 1000),
}
SAMPLING_ONLY = ("temperature", "top_p", "top_k")
# summarize's own default, which evaluate.py scores the model with (for checking min_new_tokens against it)
DEFAULT_MAX_NEW_TOKENS = inspect.signature(summarize).parameters["max_new_tokens"].default


class RequestError(ValueError):
    """A request the handler refuses; ``status_code`` is the HTTP status that fits."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Summarizer:
    """What ``model_fn`` loads: read-only afterwards, so requests share nothing else but the batcher."""

    model: Any
    tokenizer: Any
    batcher: Batcher


@dataclass(frozen=True)
class SummarizationRequest:
    dialogues: list[str]
    generation: dict[str, Any] = field(default_factory=dict)


def model_fn(model_dir):
    import torch

    quiet_known_noise()   # the toolkit calls model_fn in its own process: no step's run_step ran there
    model, tokenizer = load_model_and_tokenizer(model_dir, "model_dir", serving=True)
    model.eval()
    workers = getattr(model, "workers", 1)   # CTranslate2 runs one batch per core group at once
    if getattr(model, "runtime", None) != "ctranslate2":
        torch.set_num_threads(inference_threads(sum(p.numel() for p in model.parameters())))

    def generate(dialogues: list[str], settings: dict[str, Any]) -> list[str]:
        return summarize(model, tokenizer, dialogues, batch_size=len(dialogues), **settings)

    batcher = Batcher(generate, max_dialogues=BATCH_DIALOGUES, max_wait_s=BATCH_WAIT_MS / 1000, max_queue=MAX_QUEUE,
                      queue_timeout_s=QUEUE_TIMEOUT_S, workers=workers,
                      limit_names={"max_queue": "FLANOPS_MAX_QUEUE", "queue_timeout_s": "FLANOPS_QUEUE_TIMEOUT_S"})
    return Summarizer(model, tokenizer, batcher)


def input_fn(input_data, content_type):
    media_type, charset = _media_type(content_type or JSON_TYPE)
    if media_type not in (JSON_TYPE, TEXT_TYPE):
        raise RequestError(f"content type {media_type!r} is not supported; send {JSON_TYPE} "
                           f'({{"inputs": "<dialogue>" or a list, "parameters": {{...}}}}) or {TEXT_TYPE} (one dialogue)', 415)
    text = _decode(input_data, charset)
    if not text.strip():
        raise RequestError('the request body is empty; send {"inputs": "<dialogue>"} (JSON) or the dialogue itself '
                           f"({TEXT_TYPE})")
    if media_type == TEXT_TYPE:
        return SummarizationRequest(_dialogues(text), {})
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request body is not valid JSON ({json_reason(err)} at line {err.lineno} column "
                           f'{err.colno}); send {{"inputs": "<dialogue>"}}') from None
    if not isinstance(body, dict) or "inputs" not in body:
        raise RequestError('the JSON body must be an object with "inputs" (a dialogue or a list of dialogues) '
                           'and optionally "parameters"')
    unknown = sorted(set(body) - {"inputs", "parameters"})
    if unknown:
        raise RequestError(f"unknown key(s) {', '.join(map(repr, unknown))} in the JSON body; "
                           'allowed: "inputs", "parameters"')
    return SummarizationRequest(_dialogues(body["inputs"]), _generation(body.get("parameters")))


def predict_fn(data, model):
    try:
        return model.batcher.submit(data.dialogues, data.generation)
    except Refused as err:
        raise RequestError(str(err), err.status_code) from None


def output_fn(prediction, accept):
    accepted = [_media_type(part)[0] for part in (accept or "*/*").split(",")]
    if not any(media_type in (JSON_TYPE, "application/*", "*/*") for media_type in accepted):
        raise RequestError(f"Accept {accept!r} is not supported; responses are {JSON_TYPE} "
                           "(send Accept: application/json or */*)", 406)
    return json.dumps([{"generated_text": text} for text in prediction])


# ----------------------------------------------------------------------------- request checks


def _media_type(header: str) -> tuple[str, str | None]:
    """``"text/plain; charset=latin-1"`` → ``("text/plain", "latin-1")``."""
    media_type, *params = header.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"')
    return media_type.strip().lower(), charset


def _decode(data, charset: str | None) -> str:
    """The body as text: the toolkit passes str for JSON, bytes otherwise (and for ``...; charset=``)."""
    if isinstance(data, str):
        return data
    charset = charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise RequestError(f"charset {charset!r} is unknown; send UTF-8 text", 415) from None
    try:
        return bytes(data).decode(charset)
    except UnicodeDecodeError:
        raise RequestError(f"the request body is not valid {charset} text") from None


def _dialogues(inputs) -> list[str]:
    dialogues = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(dialogues, list):
        raise RequestError(f'"inputs" is {_json_type(inputs)}; it must be a dialogue (a string) or a list of '
                           "dialogues (strings)")
    wrong = next((index for index, item in enumerate(dialogues) if not isinstance(item, str)), None)
    if wrong is not None:
        raise RequestError(f'"inputs"[{wrong}] is {_json_type(dialogues[wrong])}; "inputs" must be a dialogue (a '
                           "string) or a list of dialogues (strings)")
    if not dialogues:
        raise RequestError('"inputs" is an empty list; send at least one dialogue')
    if len(dialogues) > MAX_BATCH_SIZE:  # refused, not queued: a request must finish within SageMaker's 60 s
        raise RequestError(f"{len(dialogues)} dialogues in one request; at most {MAX_BATCH_SIZE} are accepted: send "
                           f"them in requests of up to {MAX_BATCH_SIZE} (the endpoint's FLANOPS_MAX_BATCH_SIZE)", 413)
    for index, dialogue in enumerate(dialogues):
        where = "the dialogue" if isinstance(inputs, str) else f"dialogue {index}"
        if not dialogue.strip():
            raise RequestError(f"{where} is empty; send the conversation to summarize")
        if len(dialogue) > MAX_DIALOGUE_CHARS:
            raise RequestError(f"{where} has {len(dialogue)} characters; at most {MAX_DIALOGUE_CHARS} are accepted "
                               "(the endpoint's FLANOPS_MAX_DIALOGUE_CHARS; the model reads only about the first 2,000)",
                               413)
    return dialogues


def _json_type(value) -> str:
    """What a JSON value is, as a client would call it: a number, an object …"""
    kinds = {bool: "true/false", int: "a number", float: "a number", dict: "an object", list: "a list",
             type(None): "null", str: "a string"}
    return kinds.get(type(value), type(value).__name__)


def _generation(parameters) -> dict[str, Any]:
    """Checked generation settings: names from PARAMETERS, each of its type and in its range."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError('"parameters" must be an object, e.g. {"max_new_tokens": 64, "num_beams": 4}')
    settings = {name: value for name, value in parameters.items() if value is not None}  # null: the default
    unknown = sorted(set(settings) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown generation parameter(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {', '.join(PARAMETERS)}")
    highest = {"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS, "num_beams": MAX_NUM_BEAMS}
    limit_names = {"max_new_tokens": "FLANOPS_MAX_NEW_TOKENS", "min_new_tokens": "FLANOPS_MAX_NEW_TOKENS",
                   "num_beams": "FLANOPS_MAX_NUM_BEAMS"}
    for name, value in settings.items():
        kind, low, high = PARAMETERS[name]
        settings[name] = _checked(name, value, kind, low, highest[name] if high is None else high, limit_names.get(name))
    if settings.get("min_new_tokens", 0) > settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS):
        raise RequestError(f"min_new_tokens {settings['min_new_tokens']} is more than max_new_tokens "
                           f"{settings.get('max_new_tokens', DEFAULT_MAX_NEW_TOKENS)}; it must not be")
    sampling = [name for name in SAMPLING_ONLY if name in settings]
    if sampling and not settings.get("do_sample"):
        raise RequestError(f"{', '.join(sampling)} only apply when sampling; add \"do_sample\": true or leave them out")
    return settings


def _checked(name: str, value, kind: type, low: float, high: float, limit_name: str | None = None):
    if kind is bool:
        if not isinstance(value, bool):
            raise RequestError(f"parameter {name} must be true or false, not {json.dumps(value)}")
        return value
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (number_ok and float(value).is_integer()):
        raise RequestError(f"parameter {name} must be a whole number, not {json.dumps(value)}")
    if not number_ok or not math.isfinite(value):
        raise RequestError(f"parameter {name} must be a number, not {json.dumps(value)}")
    if not low <= value <= high:  # refused, never clamped: the caller learns the limit instead of a shorter answer
        raise RequestError(f"parameter {name}={value} is out of range; allowed: {low} to {high}"
                           + (f" (the endpoint's {limit_name})" if limit_name else ""))
    return kind(value)
