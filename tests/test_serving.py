"""The local endpoint server's HTTP contract, with a stand-in handler (no model: these tests are about the server).

The real handler (code/inference.py on real models) is tested in test_inference_handler.py
and end to end by ``flanops run`` / ``flanops serve`` in test_pipeline_local.py.
"""
from __future__ import annotations

import base64
import http.client
import json
import tarfile
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from flanops.pipelines.errors import FlanopsError
from flanops.infra.endpoint_client import runtime_client, summarize_remotely
from flanops.infra.serving import MAX_PAYLOAD_BYTES, fetch_model_data, serving

# Mirrors the real handler's contract: RequestError carries the status; str() is the message.
STAND_IN_HANDLER = '''
import json, threading, time

class RequestError(ValueError):
    def __init__(self, message, status_code=400):
        super().__init__(message)
        self.status_code = status_code

ACTIVE = []

def model_fn(model_dir):
    return {"prefix": open(f"{model_dir}/prefix.txt").read()}

def input_fn(data, content_type):
    if content_type == "text/plain":
        return {"inputs": [data.decode()]}
    if content_type != "application/json":
        raise RequestError(f"content type {content_type} is not supported", 415)
    try:
        request = json.loads(data)
    except ValueError:
        raise RequestError("the body is not valid JSON")
    if request.get("inputs") == "boom":
        raise KeyError("handler bug")
    inputs = request["inputs"]
    return {"inputs": inputs if isinstance(inputs, list) else [inputs]}

def predict_fn(data, model):
    ACTIVE.append(1)
    try:
        if len(ACTIVE) > 1:
            raise RuntimeError("two predictions at once")
        time.sleep(0.05)
        return [model["prefix"] + text for text in data["inputs"]]
    finally:
        ACTIVE.pop()

def output_fn(prediction, accept):
    if accept != "application/json":
        raise RequestError(f"accept {accept} is not supported", 406)
    return json.dumps([{"generated_text": text} for text in prediction])
'''


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    (folder / "code").mkdir()
    (folder / "code" / "inference.py").write_text(STAND_IN_HANDLER, encoding="utf-8")
    (folder / "prefix.txt").write_text("summary of: ", encoding="utf-8")
    archive = folder.parent / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return archive


@pytest.fixture(scope="module")
def server(artifact):
    lines: list[str] = []
    with serving(artifact, None, "flanops-test-endpoint", log=lines.append) as running:
        running.access_log = lines
        yield running


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    result = response.status, dict(response.headers), response.read()
    connection.close()
    return result


def test_ping_and_invocations(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", "/ping")
    assert connection.getresponse().status == 200
    status, headers, body = post(server, "/invocations", json.dumps({"inputs": ["a", "b"]}).encode())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == [{"generated_text": "summary of: a"}, {"generated_text": "summary of: b"}]
    status, _, body = post(server, "/invocations", b"plain dialogue", {"Content-Type": "text/plain"})
    assert status == 200 and json.loads(body) == [{"generated_text": "summary of: plain dialogue"}]
    assert any(line.startswith("POST /invocations 200 ") for line in server.access_log)


def test_boto3_invoke_endpoint_works_unchanged(server):
    client = runtime_client(server.url, "eu-west-1")
    response = client.invoke_endpoint(EndpointName="flanops-test-endpoint", ContentType="application/json",
                                      Body=json.dumps({"inputs": "hello"}))
    assert json.loads(response["Body"].read()) == [{"generated_text": "summary of: hello"}]
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert summarize_remotely(client, "flanops-test-endpoint", ["x", "y"]) == ["summary of: x", "summary of: y"]


def test_runtime_api_errors_are_what_boto3_expects(server):
    client = runtime_client(server.url, "eu-west-1")
    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="flanops-test-endpoint", ContentType="application/json", Body=b"{nope")
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError" and error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400 and error["OriginalMessage"] == "the body is not valid JSON"
    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="another-endpoint", Body=b"{}", ContentType="application/json")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "another-endpoint" in caught.value.response["Error"]["Message"]
    with pytest.raises(FlanopsError, match="endpoint flanops-test-endpoint: content type text/csv is not supported"):
        summarize_remotely(_CsvClient(client), "flanops-test-endpoint", ["x"])


class _CsvClient:
    """Sends what summarize_remotely builds, as text/csv: a content type the handler refuses."""

    def __init__(self, client):
        self.client = client

    def invoke_endpoint(self, **request):
        return self.client.invoke_endpoint(**{**request, "ContentType": "text/csv"})


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{nope", {}, 400, "not valid JSON"),
    (b"a,b", {"Content-Type": "text/csv"}, 415, "text/csv is not supported"),
    (b"{\"inputs\": \"x\"}", {"Accept": "text/html"}, 406, "accept text/html"),
    (b"\xff\xfe", {}, 400, "not UTF-8"),
    (b"{\"inputs\": \"boom\"}", {}, 500, "KeyError"),
])
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(server, body, headers, status, message):
    got, _, reply = post(server, "/invocations", body, headers)
    assert got == status and message in json.loads(reply)["error"]
    again, _, reply = post(server, "/invocations", json.dumps({"inputs": "still here"}).encode())
    assert again == 200 and json.loads(reply)[0]["generated_text"] == "summary of: still here"


def test_oversize_and_unknown_routes(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_PAYLOAD_BYTES + 1))
    connection.endheaders()   # the body is never sent: the server answers from the header alone
    response = connection.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    connection.close()
    status, _, body = post(server, "/predict", b"{}")
    assert status == 404 and "/invocations" in json.loads(body)["error"]


def test_concurrent_requests_get_their_own_answers(server):
    results: dict[int, list] = {}

    def call(index: int) -> None:
        status, _, body = post(server, "/invocations", json.dumps({"inputs": f"dialogue {index}"}).encode())
        results[index] = [status, json.loads(body)]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == list(range(12))
    for index, (status, body) in results.items():
        assert status == 200, body   # the stand-in predict_fn fails if it is ever entered twice at once
        assert body == [{"generated_text": f"summary of: dialogue {index}"}]


def test_model_data_that_is_not_an_artifact_is_refused(tmp_path):
    with pytest.raises(FlanopsError, match="no such file or folder"):
        fetch_model_data(tmp_path / "missing.tar.gz", None, tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FlanopsError, match="no code/inference.py"):
        fetch_model_data(tmp_path / "plain", None, tmp_path)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(FlanopsError, match="not a readable tar archive"):
        fetch_model_data(broken, None, tmp_path / "work")


# ----------------------------------------------------------------------------- data capture
def test_data_capture_writes_sagemakers_records_for_the_sampled_share(artifact, fake_aws_credentials):
    """Requests and responses land in S3 in SageMaker's capture format; 25%: the 1st, 5th and 9th."""
    import boto3
    from moto import mock_aws

    from flanops.infra.serving import DataCapture, read_capture

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="capture-bucket")
        capture = DataCapture(s3, "s3://capture-bucket/group/staging/data-capture", "ep", sampling_percentage=25)
        with serving(artifact, None, "ep", log=lambda line: None, capture=capture) as endpoint:
            client = runtime_client(endpoint.url, "us-east-1")
            for i in range(8):
                summarize_remotely(client, "ep", [f"dialogue {i}"])
            status, _, _ = post(endpoint, "/invocations", b"plain words", {"Content-Type": "text/plain"})
            assert status == 200
            with pytest.raises(FlanopsError):   # a failed request is not captured, nor counted
                summarize_remotely(client, "ep", ["boom"])
        records = read_capture(s3, "s3://capture-bucket/group/staging/data-capture", "ep")
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket="capture-bucket")["Contents"]]
    assert [json.loads(r["captureData"]["endpointInput"]["data"])["inputs"] for r in records[:2]] == \
        ["dialogue 0", "dialogue 4"]
    assert len(records) == 3 and records[2]["captureData"]["endpointInput"]["encoding"] == "BASE64"
    assert base64.b64decode(records[2]["captureData"]["endpointInput"]["data"]) == b"plain words"
    first = records[0]
    assert first["eventVersion"] == "0" and first["eventMetadata"]["eventId"]
    assert first["captureData"]["endpointInput"]["mode"] == "INPUT"
    assert first["captureData"]["endpointInput"]["encoding"] == "JSON"
    assert json.loads(first["captureData"]["endpointOutput"]["data"]) == [{"generated_text": "summary of: dialogue 0"}]
    assert all(key.startswith("group/staging/data-capture/ep/AllTraffic/") and key.endswith(".jsonl") for key in keys)


def test_a_failing_capture_never_fails_the_request(artifact):
    class BrokenS3:
        def put_object(self, **kwargs):
            raise ConnectionError("S3 is unreachable")

    from flanops.infra.serving import DataCapture

    lines: list[str] = []
    capture = DataCapture(BrokenS3(), "s3://bucket/prefix", "ep")
    with serving(artifact, None, "ep", log=lines.append, capture=capture) as endpoint:
        status, _, body = post(endpoint, "/invocations", json.dumps({"inputs": "hi"}).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == [{"generated_text": "summary of: hi"}]
    assert any("data capture to s3://bucket/prefix failed: ConnectionError" in line for line in lines)
