"""code/inference.py, the handler every model.tar.gz carries: requests, limits, and serving the artifact
under our transformers 5 and under the Hugging Face inference image's transformers 4.51.3 toolkit.

:func:`assert_artifacts_serve` is the end-to-end check: it packages model folders as model.tar.gz,
extracts them, and serves each in a fresh process twice, side by side: through code/inference.py's
four functions under transformers 5 (as flanops' local endpoint server calls them), and through
sagemaker-huggingface-inference-toolkit 2.6.0's own HuggingFaceHandlerService under transformers
4.51.3 (the image the pipeline registers the model with). Both must give the same summaries. The
fine-tuned (fp32) model is checked here; test_quantize, test_prune and test_distill check their
variants with it, from the models their module fixtures already built.

The 4.51.3 environment is an overlay: exactly pinned packages installed with ``pip --no-deps
--target`` into the user's cache folder (built once, about 10 s), put first on PYTHONPATH so that
they shadow the venv's transformers 5; torch, numpy, safetensors etc. come from the venv.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from flanops.steps import inference
from conftest import STEPS
from stepkit.archive import MODEL_ARCHIVE, extract_safely
from stepkit.generation import summarize
from stepkit.packaging import package_model
from stepkit.records import read_split

TOOLKIT_TRANSFORMERS = "4.51.3"
# Exactly what the 4.51.3 check runs; --no-deps, so each pin is checked against its dependants' metadata.
TOOLKIT_OVERLAY = (
    f"transformers=={TOOLKIT_TRANSFORMERS}",
    "tokenizers==0.21.1",                 # transformers 4.51.3: tokenizers>=0.21,<0.22
    "huggingface_hub==0.30.2",            # transformers 4.51.3: huggingface-hub>=0.30.0,<1.0
    "sagemaker-huggingface-inference-toolkit==2.6.0",  # the newest 2.x, as in the 4.51.3 images
    "sagemaker-inference==1.10.1",        # the toolkit's model-server plumbing
    "multi-model-server==1.1.11",         # mms.service.PredictionException, raised by the toolkit
    "retrying==1.3.4",                    # sagemaker-inference: retrying>=1.3.3,<1.4
)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two processes side by side on 2 shared cores
BEAM = {"num_beams": 3, "max_new_tokens": 24, "no_repeat_ngram_size": 3, "length_penalty": 1.2, "early_stopping": True}

# Runs in a fresh interpreter. argv: mode ("handler" or "toolkit"), requests (JSON), then extracted
# artifact folders. "handler" calls code/inference.py as flanops' server does; "toolkit" goes through
# the toolkit's HuggingFaceHandlerService with a stand-in for the model server's context.
SERVE_SCRIPT = r"""
import importlib, json, sys
import transformers

mode, requests, folders = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
UTF8_TYPES = ("application/json", "text/csv")  # decoded to str before input_fn, as the toolkit's handle() does

class Properties:
    def __init__(self, headers):
        self.headers = headers
    def get_request_properties(self):
        return self.headers

class Metrics:
    def add_time(self, *args, **kwargs):
        pass

class Context:
    def __init__(self, model_dir):
        self.system_properties = {"model_dir": model_dir, "batch_size": 1, "gpu_id": 0}
        self.request_processor, self.metrics, self.response_content_type = [Properties({})], Metrics(), None
    def set_response_content_type(self, index, value):
        self.response_content_type = value

def toolkit_server(folder):
    from sagemaker_huggingface_inference_toolkit.handler_service import HuggingFaceHandlerService
    from mms.service import PredictionException
    service, context = HuggingFaceHandlerService(), Context(folder)
    service.initialize(context)
    def call(body, headers):
        context.request_processor = [Properties(headers)]
        try:
            response = service.handle([{"body": body}], context)[0]
        except PredictionException as err:
            return {"status": err.error_code, "message": err.message}
        return {"status": 200, "content_type": context.response_content_type, "body": json.loads(response)}
    return call

def handler_server(folder):
    sys.path.insert(0, f"{folder}/code")
    handler = importlib.import_module("inference")
    model = handler.model_fn(folder)
    def call(body, headers):
        content_type, accept = headers.get("Content-Type"), headers.get("Accept")
        data = body.decode("utf-8") if content_type in UTF8_TYPES else body
        try:
            response = handler.output_fn(handler.predict_fn(handler.input_fn(data, content_type), model), accept)
        except handler.RequestError as err:
            return {"status": err.status_code, "message": str(err)}
        return {"status": 200, "content_type": "application/json", "body": json.loads(response)}
    return call

report = {"transformers": transformers.__version__}
try:
    import ctranslate2
    report["ctranslate2"] = ctranslate2.__file__
except ImportError:
    pass
for folder in folders:
    for name in [n for n in sys.modules if n == "inference" or n.split(".")[0] == "stepkit"]:
        del sys.modules[name]  # each artifact's own code/
    call = (toolkit_server if mode == "toolkit" else handler_server)(folder)
    report[folder] = [call(r["body"].encode("utf-8"), r["headers"]) for r in requests]
print(json.dumps(report))
"""


# ----------------------------------------------------------------------------- the 4.51.3 overlay


@functools.lru_cache(maxsize=1)
def toolkit_overlay() -> Path:
    """The pinned toolkit environment, built once per machine under the user's cache folder.

    Keyed by the pins and the Python/platform (tokenizers is compiled); built in a temporary
    sibling and renamed, so a concurrent or interrupted build never leaves a half overlay behind.
    """
    key = hashlib.sha256(json.dumps([TOOLKIT_OVERLAY, sys.version_info[:2], platform.machine()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flanops" / f"toolkit-overlay-{key}"
    if (cache / "transformers" / "__init__.py").is_file():
        return cache
    building = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
                             "--quiet", "--target", str(building), *TOOLKIT_OVERLAY],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.fail(f"cannot install the transformers {TOOLKIT_TRANSFORMERS} toolkit environment with pip "
                    f"(is the package index reachable?):\n{result.stderr[-3000:]}")
    try:
        building.rename(cache)
    except OSError:  # another test process finished first: use its overlay
        shutil.rmtree(building, ignore_errors=True)
    return cache


# ----------------------------------------------------------------------------- serving artifacts


THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def packaged(model_dir: Path, into: Path) -> Path:
    """``model_dir`` as the endpoint receives it: packaged as model.tar.gz (a CTranslate2 model with its
    runtime's wheel for this Python, standing in for the image's), then extracted."""
    archive = package_model(model_dir, into.with_suffix(".tar.gz"), serving_python=THIS_PYTHON)
    extract_safely(archive, into, str(archive))
    return into


def install_requirements_offline(folder: Path) -> Path | None:
    """What the toolkit does at start-up, ``pip install -r code/requirements.txt``, with no package index
    reachable (--no-index comes from the file itself); into a folder of its own so that the served code
    imports the shipped wheel, not the venv's copy. numpy and pyyaml, its dependencies, come with the image
    (here: the venv). None for an artifact whose requirements install nothing."""
    requirements = folder / "code" / "requirements.txt"
    if not any(line.strip() and not line.startswith("#") for line in requirements.read_text().splitlines()):
        return None
    target = folder.parent / f"{folder.name}-site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
                             "--disable-pip-version-check", "--target", str(target), "-r", str(requirements)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/"})
    assert result.returncode == 0, f"installing {requirements} offline failed:\n{result.stderr[-3000:]}"
    return target


def serving_requests(dialogues: list[str]) -> list[dict]:
    json_type = {"Content-Type": "application/json"}
    return [
        {"body": json.dumps({"inputs": dialogues}), "headers": json_type},
        {"body": dialogues[0], "headers": {"Content-Type": "text/plain", "Accept": "*/*"}},
        {"body": json.dumps({"inputs": dialogues[0], "parameters": BEAM}),
         "headers": {**json_type, "Accept": "application/json"}},
        {"body": json.dumps({"inputs": ["   "]}), "headers": json_type},  # refused: empty dialogue
    ]


def serve(mode: str, folders: list[Path], requests: list[dict]) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if mode == "toolkit":
        installed = [str(site) for site in map(install_requirements_offline, folders) if site]
        env["PYTHONPATH"] = os.pathsep.join([*installed, str(toolkit_overlay()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, mode, json.dumps(requests), *map(str, folders)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _report(process: subprocess.Popen, mode: str) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"{mode} process failed:\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def assert_artifacts_serve(model_dirs: dict[str, Path], data_dir: Path, tmp_path: Path) -> dict:
    """Package and serve each model under transformers 5 and 4.51.3 (one fresh process each, run side
    by side); assert both answer every request and agree word for word. Returns the 5.x replies by name."""
    dialogues = [row["dialogue"] for row in read_split(data_dir, "test")[:2]]
    requests = serving_requests(dialogues)
    folders = {name: packaged(folder, tmp_path / f"artifact-{name}") for name, folder in model_dirs.items()}
    processes = {mode: serve(mode, list(folders.values()), requests) for mode in ("handler", "toolkit")}
    reports = {mode: _report(process, mode) for mode, process in processes.items()}
    assert reports["handler"]["transformers"].startswith("5.")
    assert reports["toolkit"]["transformers"] == TOOLKIT_TRANSFORMERS
    replies = {}
    for name, folder in folders.items():
        current, toolkit = reports["handler"][str(folder)], reports["toolkit"][str(folder)]
        batch, plain, beam, empty = current
        assert [reply["status"] for reply in current] == [200, 200, 200, 400], (name, current)
        assert len(batch["body"]) == 2 and all(item["generated_text"].strip() for item in batch["body"]), (name, batch)
        assert plain["body"] == batch["body"][:1]   # the same dialogue alone: the same summary
        assert beam["body"][0]["generated_text"].strip()
        assert "empty" in empty["message"]
        # The toolkit serves the same artifact unchanged, with the same words (greedy and beam search) and
        # our message in its 400; its own handle() decides the response content type.
        assert toolkit == current, f"{name}: transformers {TOOLKIT_TRANSFORMERS} differs:\n{toolkit}\n{current}"
        if (folder / "ctranslate2").is_dir():   # the toolkit ran the wheel the artifact shipped, installed offline
            assert "-site/ctranslate2" in reports["toolkit"]["ctranslate2"], reports["toolkit"]["ctranslate2"]
            assert (folder / "code" / "wheels").is_dir()
        replies[name] = current
    return replies


def test_finetuned_artifact_serves_under_transformers_5_and_the_4_51_toolkit(chain, tmp_path):
    replies = assert_artifacts_serve({"fp32": chain["tuned"]}, chain["data"], tmp_path)
    beam = replies["fp32"][2]["body"][0]["generated_text"]
    assert len(beam.split()) <= BEAM["max_new_tokens"]


# ----------------------------------------------------------------------------- the handler in this process


@pytest.fixture(scope="module")
def summarizer(chain):
    return inference.model_fn(str(chain["tuned"]))


@pytest.fixture(scope="module")
def dialogues(chain) -> list[str]:
    return [row["dialogue"] for row in read_split(chain["data"], "test")[:3]]


def ask(summarizer, body, content_type="application/json", accept="application/json") -> list[str]:
    data = json.dumps(body) if content_type == "application/json" and not isinstance(body, (str, bytes)) else body
    output = inference.output_fn(inference.predict_fn(inference.input_fn(data, content_type), summarizer), accept)
    return [item["generated_text"] for item in json.loads(output)]


def test_default_request_is_what_evaluation_scored(summarizer, dialogues):
    """The template is applied once (in summarize): the endpoint answers exactly what evaluate.py measured."""
    expected = summarize(summarizer.model, summarizer.tokenizer, dialogues)
    assert ask(summarizer, {"inputs": dialogues}) == expected
    assert ask(summarizer, {"inputs": dialogues[1]}) == expected[1:2]
    assert ask(summarizer, dialogues[2].encode("utf-8"), "text/plain; charset=utf-8", "*/*") == expected[2:]
    assert ask(summarizer, json.dumps({"inputs": dialogues[0]}).encode("utf-8"), "application/json; charset=utf-8") == expected[:1]


def test_parameters_reach_generation_and_leave_the_model_unchanged(summarizer, dialogues):
    before = summarizer.model.generation_config.to_dict()
    first = ask(summarizer, {"inputs": dialogues[0]})
    short = ask(summarizer, {"inputs": dialogues[0], "parameters": {"max_new_tokens": 3}})[0]
    assert len(summarizer.tokenizer(short, add_special_tokens=False).input_ids) <= 3
    sampled = ask(summarizer, {"inputs": dialogues[0], "parameters": {"do_sample": True, "top_k": 5, "temperature": 0.7}})
    assert sampled[0].strip()
    assert ask(summarizer, {"inputs": dialogues[0], "parameters": {**BEAM, "max_new_tokens": None}})[0].strip()
    assert summarizer.model.generation_config.to_dict() == before  # no request leaves settings behind
    assert ask(summarizer, {"inputs": dialogues[0]}) == first


LONG = "#Person1#: hello\n" * 1000  # 17,000 characters


@pytest.mark.parametrize("body, content_type, status, words", [
    ("{not json", "application/json", 400, ["not valid JSON", "line 1 column 2"]),
    ("[1, 2]", "application/json", 400, ['"inputs"']),
    ('{"dialogue": "hi"}', "application/json", 400, ['"inputs"']),
    ('{"inputs": "hi", "parametres": {}}', "application/json", 400, ["'parametres'", "allowed"]),
    ('{"inputs": ""}', "application/json", 400, ["empty"]),
    ('{"inputs": []}', "application/json", 400, ["empty list"]),
    ('{"inputs": ["ok", 3]}', "application/json", 400, ["list of dialogues"]),
    (b"   ", "text/plain", 400, ["empty"]),
    (b"\xff\xfe", "text/plain", 400, ["not valid utf-8"]),
    (b"hi", "text/plain; charset=klingon", 415, ["klingon"]),
    ("hi", "text/csv", 415, ["'text/csv'", "application/json", "text/plain"]),
    (b"hi", "application/octet-stream", 415, ["not supported"]),
    (json.dumps({"inputs": LONG}), "application/json", 413, ["17000 characters", "at most 10000"]),
    (json.dumps({"inputs": ["x"] * 17}), "application/json", 413, ["17 dialogues", "at most 16"]),
    ('{"inputs": "hi", "parameters": {"temperature_x": 1}}', "application/json", 400, ["'temperature_x'", "max_new_tokens"]),
    ('{"inputs": "hi", "parameters": {"num_beams": 9}}', "application/json", 400, ["num_beams=9", "1 to 8"]),
    ('{"inputs": "hi", "parameters": {"max_new_tokens": 0}}', "application/json", 400, ["max_new_tokens=0", "1 to 256"]),
    ('{"inputs": "hi", "parameters": {"max_new_tokens": 2.5}}', "application/json", 400, ["whole number"]),
    ('{"inputs": "hi", "parameters": {"num_beams": true}}', "application/json", 400, ["whole number"]),
    ('{"inputs": "hi", "parameters": {"top_p": "0.9", "do_sample": true}}', "application/json", 400, ["top_p", "number"]),
    ('{"inputs": "hi", "parameters": {"early_stopping": 1}}', "application/json", 400, ["true or false"]),
    ('{"inputs": "hi", "parameters": {"repetition_penalty": 0.5}}', "application/json", 400, ["1.0 to 2.0"]),
    ('{"inputs": "hi", "parameters": {"min_new_tokens": 80}}', "application/json", 400, ["min_new_tokens 80", "max_new_tokens 64"]),
    ('{"inputs": "hi", "parameters": {"temperature": 0.5}}', "application/json", 400, ["temperature", "do_sample"]),
    ('{"inputs": "hi", "parameters": [1]}', "application/json", 400, ['"parameters" must be an object']),
])
def test_bad_requests_say_what_was_wrong(body, content_type, status, words):
    with pytest.raises(inference.RequestError) as caught:
        inference.input_fn(body, content_type)
    assert caught.value.status_code == status and isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert all(word.lower() in message.lower() for word in words), message
    assert "\n" not in message


@pytest.mark.parametrize("accept", ["application/json", "*/*", None, "text/html, application/*;q=0.5",
                                    "application/json; charset=utf-8"])
def test_json_or_anything_is_accepted(accept):
    assert json.loads(inference.output_fn(["a summary"], accept)) == [{"generated_text": "a summary"}]


@pytest.mark.parametrize("accept", ["text/plain", "text/csv", "application/x-npy"])
def test_other_accepts_are_refused_with_406(accept):
    with pytest.raises(inference.RequestError, match=f"Accept '{accept}' is not supported; responses are application/json") as caught:
        inference.output_fn(["a summary"], accept)
    assert caught.value.status_code == 406


def _fresh_handler(name: str):
    """A separate copy of steps/inference.py, imported now (its limits are read at import)."""
    spec = importlib.util.spec_from_file_location(name, STEPS / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it is being executed
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLANOPS_MAX_BATCH_SIZE", "2")
    monkeypatch.setenv("FLANOPS_MAX_NUM_BEAMS", "2")
    handler = _fresh_handler("inference_small_limits")
    with pytest.raises(handler.RequestError, match="3 dialogues in one request; at most 2") as caught:
        handler.input_fn('{"inputs": ["a", "b", "c"]}', "application/json")
    assert caught.value.status_code == 413
    with pytest.raises(handler.RequestError, match="1 to 2"):
        handler.input_fn('{"inputs": "a", "parameters": {"num_beams": 3}}', "application/json")
    monkeypatch.setenv("FLANOPS_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ValueError, match="FLANOPS_MAX_BATCH_SIZE='lots': expected a whole number of at least 1"):
        _fresh_handler("inference_bad_limits")


def test_the_handler_takes_no_context_argument():
    """The toolkit passes its context only to functions with one more argument than these (function_extra_arg)."""
    import inspect

    expected = {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}
    assert {name: len(inspect.signature(getattr(inference, name)).parameters) for name in expected} == expected


def test_artifact_carries_the_handler_and_the_stepkit_it_imports(chain, tmp_path):
    archive = package_model(chain["tuned"], tmp_path / MODEL_ARCHIVE)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"code/inference.py", "code/requirements.txt", "code/stepkit/modeling.py", "code/stepkit/prompt.py",
            "code/stepkit/ctranslate.py", "code/stepkit/batching.py", "model.safetensors", "config.json",
            "tokenizer_config.json",
            "generation_config.json", "model_card.json"} <= names
    assert not {name for name in names if name.split("/")[0] in ("_SUCCESS", "adapter", "training_curve.json")}
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if "standin" in name or name.startswith("code/wheels")]   # needs neither
