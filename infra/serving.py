"""A local SageMaker endpoint: ``model.tar.gz`` served through its own ``code/inference.py``.

moto runs no containers, so this is what answers for an endpoint on embedded AWS. It does what
SageMaker hosting and the Hugging Face inference toolkit do with the artifact: extract it,
put ``code/`` on ``sys.path``, import ``inference`` and call its ``model_fn`` once, then per
request ``input_fn`` → ``predict_fn`` → ``output_fn``. Bodies of UTF-8 content types
(JSON, CSV) reach ``input_fn`` as text and others as bytes, as the toolkit passes them.

Routes:
  GET  /ping                            200 once the model is loaded (the container contract)
  POST /invocations                     the container contract; errors are JSON ``{"error": …}``
  POST /endpoints/{name}/invocations    the SageMaker Runtime API, so that
      boto3.client("sagemaker-runtime", endpoint_url=URL).invoke_endpoint(EndpointName=name, …)
      works unchanged; handler errors come back as SageMaker's ModelError (HTTP 424)

Requests are served by threads. flanops' own handler batches concurrent requests
(``CONCURRENT_REQUESTS`` in code/inference.py, see stepkit/batching.py); any other handler gets
its predictions one at a time (a lock). /ping answers while predictions run. A bad request
gets a 4xx naming what was wrong; an error inside the handler is a 500 for that request
only; the server keeps serving.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from flanops.pipelines.errors import FlanopsError
from flanops.pipelines.files import write_json_atomic
from flanops.pipelines.s3 import parse_s3_uri, split_s3_uri

from .endpoint_client import endpoint_record
from .template import VARIANT_NAME

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024        # SageMaker real-time endpoints refuse larger request bodies
UTF8_CONTENT_TYPES = ("application/json", "text/csv")   # the toolkit decodes these before input_fn
HANDLER_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn")


# ----------------------------------------------------------------------------- the artifact
def fetch_model_data(source: str | Path, session, workdir: Path) -> Path:
    """The model folder for ``source``: an S3 URI or a local ``model.tar.gz``, extracted; or an extracted folder.

    An S3 URI may name the tarball or a prefix that holds ``model.tar.gz``.
    """
    from stepkit.errors import StepError
    from stepkit.archive import MODEL_ARCHIVE, extract_safely

    text = str(source)
    if text.startswith("s3://"):
        bucket, key = parse_s3_uri(text)
        if not key:
            raise FlanopsError(f"model data {text}: expected s3://bucket/key/model.tar.gz")
        if not key.endswith(".tar.gz"):
            key = f"{key}/{MODEL_ARCHIVE}"
        archive = workdir / MODEL_ARCHIVE
        from botocore.exceptions import ClientError

        try:
            session.client("s3").download_file(bucket, key, str(archive))
        except ClientError as err:
            raise FlanopsError(f"model data s3://{bucket}/{key}: cannot download it "
                               f"({err.response['Error'].get('Message') or err.response['Error']['Code']})") from None
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            return check_artifact(path, text)
        if not path.is_file():
            raise FlanopsError(f"model data {text}: no such file or folder")
        archive = path
    folder = workdir / "model"
    try:
        extract_safely(archive, folder, f"model data {text}")
    except StepError as err:
        raise FlanopsError(str(err)) from None
    return check_artifact(folder, text)


def check_artifact(folder: Path, label: str) -> Path:
    handler = folder / "code" / "inference.py"
    if not handler.is_file():
        raise FlanopsError(f"model data {label}: no code/inference.py; this is not a model.tar.gz that flanops "
                           "packaged (the pipeline's Evaluate step writes one)")
    return folder


def import_handler(model_dir: Path):
    """Import ``code/inference.py`` as the toolkit does: ``code/`` first on ``sys.path``, module ``inference``.

    Its ``import stepkit`` finds the kit this process has already loaded (installed with flanops, the
    files the artifact's ``code/stepkit`` was packed from), so each stepkit module has one identity here.
    """
    code_dir = model_dir / "code"
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location("inference", code_dir / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["inference"] = module   # this artifact's handler; another one imported earlier is another file
    spec.loader.exec_module(module)
    missing = [name for name in HANDLER_FUNCTIONS if not callable(getattr(module, name, None))]
    if missing:
        raise FlanopsError(f"{model_dir / 'code' / 'inference.py'}: no {', '.join(missing)}; a handler needs "
                           f"{', '.join(HANDLER_FUNCTIONS)}")
    return module


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        return cls(status, json.dumps({"error": message, "code": status}).encode())


class LoadedModel:
    """One artifact's handler and model; :meth:`invoke` may be called from several threads."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.handler = import_handler(model_dir)
        self.model = self.handler.model_fn(str(model_dir))
        # A handler that batches concurrent requests itself says so; any other runs one request at a time
        self._lock = contextlib.nullcontext() if getattr(self.handler, "CONCURRENT_REQUESTS", False) else threading.Lock()

    def invoke(self, body: bytes, content_type: str, accept: str) -> Reply:
        # As the toolkit's handle(): the header as sent (parameters such as charset included) goes to
        # input_fn, and only an exact UTF-8 type is decoded here
        content_type = (content_type or "application/json").strip()
        accept = (accept or "").strip()
        if not accept or accept == "*/*":
            accept = "application/json"
        data: Any = body
        if content_type in UTF8_CONTENT_TYPES:
            try:
                data = body.decode("utf-8")
            except UnicodeDecodeError:
                return Reply.error(400, f"the request body is not UTF-8 text, which {content_type} must be")
        try:
            with self._lock:
                prediction = self.handler.predict_fn(self.handler.input_fn(data, content_type), self.model)
                output = self.handler.output_fn(prediction, accept)
        except Exception as err:   # the request's fault (RequestError) or the handler's; never the server's end
            status = getattr(err, "status_code", None)
            if isinstance(status, int) and (400 <= status < 500 or status == 503):   # 503: overloaded, says why
                return Reply.error(status, str(err))
            traceback.print_exc()
            return Reply.error(500, f"the model handler failed: {type(err).__name__}: {err}")
        # The toolkit echoes Accept as the content type; every flanops handler reply is JSON, so say so
        return Reply(200, output.encode() if isinstance(output, str) else bytes(output), "application/json")


# ----------------------------------------------------------------------------- data capture
@dataclass
class DataCapture:
    """Requests and responses written to S3 the way SageMaker's endpoint data capture writes them.

    One JSON line per invocation (``captureData.endpointInput/endpointOutput`` and ``eventMetadata``)
    under ``<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/``; JSON bodies as JSON, others base64.
    SageMaker batches several events per file; here each event is its own file, read the same way.
    Sampling is deterministic (SageMaker's is random): exactly the share asked for, the first request
    included, so that a few requests to a 20% stage always leave a record to look at.
    """

    s3: Any
    destination: str                  # s3://bucket/prefix (the EndpointConfig's DestinationS3Uri)
    endpoint_name: str
    sampling_percentage: int = 100
    json_content_types: tuple[str, ...] = ("application/json",)
    seen: int = 0                     # successful invocations so far (the sampler's counter)
    counter_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sampled(self) -> bool:
        """Whether this invocation is captured: the k-th is when the running share first crosses k."""
        with self.counter_lock:   # requests are served on threads
            index, self.seen = self.seen, self.seen + 1
        return index == 0 and self.sampling_percentage > 0 or \
            (index * self.sampling_percentage) // 100 != ((index - 1) * self.sampling_percentage) // 100

    @classmethod
    def of_endpoint(cls, session, endpoint_name: str) -> DataCapture | None:
        """The capture an endpoint's EndpointConfig asks for (None: it captures nothing or is unknown)."""
        from botocore.exceptions import ClientError

        sagemaker = session.client("sagemaker")
        try:
            config_name = sagemaker.describe_endpoint(EndpointName=endpoint_name)["EndpointConfigName"]
            config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name).get("DataCaptureConfig") or {}
        except ClientError:
            return None
        if not config.get("EnableCapture", True) or not config.get("DestinationS3Uri"):
            return None
        json_types = config.get("CaptureContentTypeHeader", {}).get("JsonContentTypes") or ["application/json"]
        return cls(session.client("s3"), config["DestinationS3Uri"].rstrip("/"), endpoint_name,
                   int(config.get("InitialSamplingPercentage", 100)), tuple(json_types))

    def payload(self, body: bytes, content_type: str, mode: str) -> dict:
        if content_type.split(";")[0].strip() in self.json_content_types:
            data, encoding = body.decode("utf-8", errors="replace"), "JSON"
        else:
            import base64

            data, encoding = base64.b64encode(body).decode(), "BASE64"
        return {"observedContentType": content_type, "mode": mode, "data": data, "encoding": encoding}

    def record(self, request: bytes, content_type: str, reply: Reply) -> str | None:
        """Capture one invocation (if sampled); the S3 key written, or None."""
        import uuid
        from datetime import datetime, timezone

        if not self.sampled():
            return None
        now = datetime.now(timezone.utc)
        event_id = str(uuid.uuid4())
        line = {"captureData": {"endpointInput": self.payload(request, content_type or "application/json", "INPUT"),
                                "endpointOutput": self.payload(reply.body, reply.content_type, "OUTPUT")},
                "eventMetadata": {"eventId": event_id, "inferenceTime": now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"},
                "eventVersion": "0"}
        bucket, prefix = split_s3_uri(self.destination)
        key = (f"{prefix}/{self.endpoint_name}/{VARIANT_NAME}/{now:%Y/%m/%d/%H}/"
               f"{now:%M-%S}-{now.microsecond // 1000:03d}-{event_id}.jsonl").lstrip("/")
        self.s3.put_object(Bucket=bucket, Key=key, Body=(json.dumps(line) + "\n").encode())
        return key


def read_capture(s3, destination: str, endpoint_name: str) -> list[dict]:
    """Every capture record of ``endpoint_name`` under ``destination``, oldest first (keys sort by time)."""
    bucket, prefix = split_s3_uri(destination.rstrip("/"))
    prefix = f"{prefix}/{endpoint_name}/".lstrip("/")
    keys = sorted(item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for item in page.get("Contents", []) if item["Key"].endswith(".jsonl"))
    records = []
    for key in keys:
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        records.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return records


# ----------------------------------------------------------------------------- HTTP
class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: with more clients than that reconnecting at once (after a
    # 413 closes their connection) on a busy machine, a connection could be dropped (seen once in
    # the 16-client load test).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], model: LoadedModel, endpoint_name: str, log: Callable[[str], None],
                 capture: DataCapture | None = None):
        self.model, self.endpoint_name, self.log, self.capture = model, endpoint_name, log, capture
        super().__init__(address, RequestHandler)

    def handle_error(self, request, client_address) -> None:
        """One line instead of socketserver's traceback; a client that hung up is no error of ours."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"error serving {client_address[0]}:{client_address[1]}: {type(error).__name__}: {error}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class RequestHandler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle's algorithm on, the second waited for the
    # client's delayed ACK: about 40 ms added to every response (52 ms vs 7 ms for the tiny model).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:   # our own access line instead (no bodies logged)
        pass

    def do_GET(self) -> None:
        started = time.monotonic()
        if self.path.split("?")[0] == "/ping":
            reply = Reply(200, b"{}")
        else:
            reply = Reply.error(404, f"no route GET {self.path}; GET /ping, POST /invocations or "
                                     "POST /endpoints/{name}/invocations")
        self.send(reply, started)

    def do_POST(self) -> None:
        started = time.monotonic()
        path = self.path.split("?")[0]
        runtime_api = path.startswith("/endpoints/") and path.endswith("/invocations")
        if runtime_api:
            name = unquote(path[len("/endpoints/"):-len("/invocations")])
            if name != self.server.endpoint_name:
                self.drain()
                return self.send(runtime_error(400, "ValidationError", f"Endpoint {name} not found; this local "
                                               f"server serves {self.server.endpoint_name}"), started)
        elif path != "/invocations":
            self.drain()
            return self.send(Reply.error(404, f"no route POST {path}; POST /invocations or "
                                              "/endpoints/{name}/invocations"), started)
        body = self.read_body()
        if isinstance(body, Reply):
            reply = body
        else:
            reply = self.server.model.invoke(body, self.headers.get("Content-Type", ""), self.headers.get("Accept", ""))
            if reply.status == 200 and self.server.capture:
                self.capture(body, reply)
        if runtime_api and reply.status != 200:
            reply = model_error(reply)
        self.send(reply, started, variant=runtime_api and reply.status == 200)

    def capture(self, body: bytes, reply: Reply) -> None:
        try:
            self.server.capture.record(body, self.headers.get("Content-Type", ""), reply)
        except Exception as err:   # noqa: BLE001 - as on SageMaker, a capture failure never fails the request
            self.server.log(f"data capture to {self.server.capture.destination} failed: {type(err).__name__}: {err}")

    def read_body(self) -> bytes | Reply:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            return Reply.error(411, "send the request body with a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            return Reply.error(400, f"Content-Length {length!r} is not a number")
        if size > MAX_PAYLOAD_BYTES:
            self.close_connection = True   # the body is not read: this connection cannot carry another request
            return Reply.error(413, f"the request body is {size:,} bytes; an endpoint takes at most "
                                    f"{MAX_PAYLOAD_BYTES:,} (SageMaker's limit): send fewer dialogues per request")
        return self.rfile.read(size)

    def drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_PAYLOAD_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def send(self, reply: Reply, started: float, variant: bool = False) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if variant:
            self.send_header("x-Amzn-Invoked-Production-Variant", VARIANT_NAME)
        if isinstance(reply, RuntimeReply) and reply.error_type:
            self.send_header("x-amzn-ErrorType", reply.error_type)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)
        self.server.log(f"{self.command} {self.path} {reply.status} {(time.monotonic() - started) * 1000:.0f} ms")


@dataclass
class RuntimeReply(Reply):
    error_type: str | None = None


def runtime_error(status: int, error_type: str, message: str, **fields: Any) -> RuntimeReply:
    """An error as the SageMaker Runtime API sends it: botocore raises ``error_type`` with these fields."""
    return RuntimeReply(status, json.dumps({"message": message, **fields}).encode(), "application/json", error_type)


def model_error(reply: Reply) -> RuntimeReply:
    """The container's error as SageMaker Runtime reports it: ModelError (424) carrying the original status."""
    try:
        original = json.loads(reply.body).get("error", "")
    except (ValueError, AttributeError):
        original = reply.body.decode(errors="replace")
    return runtime_error(424, "ModelError", f"Received client error ({reply.status}) from primary with message "
                         f"\"{original}\"", OriginalStatusCode=reply.status, OriginalMessage=original)


# ----------------------------------------------------------------------------- running it
@contextlib.contextmanager
def serving(model_data: str | Path, session, endpoint_name: str, host: str = "127.0.0.1", port: int = 0,
            log: Callable[[str], None] = print, record: dict | None = None,
            capture: DataCapture | None = None) -> Iterator[EndpointServer]:
    """Load the artifact and serve it on a background thread while the block runs.

    With ``record``, the endpoint is announced in ``$FLANOPS_HOME/endpoints/<name>.json`` (for
    ``flanops invoke``) until the block ends. With ``capture``, successful invocations are captured.
    """
    with tempfile.TemporaryDirectory(prefix="flanops-endpoint-") as workdir:
        started = time.monotonic()
        model_dir = fetch_model_data(model_data, session, Path(workdir))
        model = LoadedModel(model_dir)
        log(f"loaded {model_data} through code/inference.py in {time.monotonic() - started:.1f} s")
        try:
            server = EndpointServer((host, port), model, endpoint_name, log, capture)
        except OSError as err:
            raise FlanopsError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
        thread = threading.Thread(target=server.serve_forever, name=f"endpoint-{endpoint_name}", daemon=True)
        thread.start()
        record_path = None
        try:
            if record is not None:
                record_path = endpoint_record(endpoint_name, os.getpid())
                write_json_atomic(record_path, {**record, "endpoint_name": endpoint_name, "url": server.url,
                                                "pid": os.getpid(), "started": time.time()})
            yield server
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
            if record_path:
                record_path.unlink(missing_ok=True)
