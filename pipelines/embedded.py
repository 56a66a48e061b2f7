"""Embedded AWS: one background moto server shared by every flanops process on this machine.

``flanops run``, a later ``flanops approve`` or ``flanops deploy``, a notebook and the AWS CLI
are separate processes that must see the same buckets, pipelines and model packages. The
first caller of :func:`ensure_server` starts moto as a detached process (own session, output
to ``<home>/embedded/server.log``) and records it in ``<home>/embedded/server.json``; later
callers find it there and reuse it. A file lock keeps concurrent callers from starting two.

    aws = ensure_server()
    with aws.activated():            # boto3, the AWS CLI and the SageMaker SDK now talk to moto
        boto3.client("s3").list_buckets()

From a shell: ``eval "$(flanops local env)"`` then ``aws s3 ls``; ``flanops local status|stop``
to inspect or stop the server. ``python -m flanops.pipelines.embedded_server serve`` is the server
process itself (embedded_server.py), which :func:`ensure_server` launches.

State lives only as long as the server process. ``stop_server()``, a reboot or a crash
loses every bucket, pipeline and model package. moto 5.2.5 has no snapshot or restore.
Its request recorder (``/moto-api/recorder/*``) replays a log of requests, which does not
reproduce state reliably. In a test with S3, SageMaker and CloudFormation, a replay:
  - lost every multipart upload. boto3's ``upload_file`` uses multipart above 8 MB, and the
    replayed UploadPart and CompleteMultipartUpload name upload ids that the new server
    never issued;
  - left CloudFormation stacks in REVIEW_IN_PROGRESS, because ExecuteChangeSet by change-set
    id names an id that the replayed CreateChangeSet does not reproduce;
  - gave pipeline executions new ARNs and every object new timestamps;
  - wrote an unreadable log. After three 64 MB ``upload_file`` calls, 19 of its 32 lines
    did not parse: parallel part uploads interleave their multi-MB lines, because the recorder
    appends from each request thread without a lock. A replay stops at the first such line.
It also keeps every request body forever (base64, in one file), so the log only grows.
This module therefore does not pretend to persist anything across a restart.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FlanopsError
from .files import write_text_atomic
from .home import embedded_dir, log_file, process_alive

if TYPE_CHECKING:
    import boto3

log = logging.getLogger(__name__)

EMBEDDED_REGION = "us-east-1"
"""Region used under embedded AWS unless the user set ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
moto serves every region; this default only names one for clients."""

# moto's documented fake credentials. They are set explicitly so that a user's real keys are never sent anywhere.
_FAKE_ACCESS_KEY_ID = "testing"
_FAKE_SECRET_ACCESS_KEY = "testing"  # nosec B105 # moto's dummy key; embedded AWS takes any
_HOST = "127.0.0.1"
_LAUNCHER_MODULE = "flanops.pipelines.embedded_server"  # also how stop_server recognises its process in /proc
# a server started by flanops before the flanops.pipelines layout: still ours to reuse or stop, not to orphan
_EARLIER_LAUNCHER_MODULES = ("flanops.embedded", "flanops.pipelines.embedded")
_START_TIMEOUT_S = 30.0  # moto imports in 1-3 s; a loaded 2-core CI machine can be much slower
_HEALTH_TIMEOUT_S = 2.0
_STOP_TIMEOUT_S = 10.0
_LOG_ROTATE_BYTES = 10 * 1024 * 1024  # each start rotates a log larger than this to server.log.1

# Variables that would send requests elsewhere or with other credentials. They are removed, not overridden.
_UNSET_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",  # when true, botocore ignores AWS_ENDPOINT_URL, our endpoint
)
_SERVICE_ENDPOINT_PREFIX = "AWS_ENDPOINT_URL_"  # AWS_ENDPOINT_URL_S3 etc. would take precedence over ours
# `flanops run` starts its executions with a client token that begins so: it runs their executor itself,
# so embedded AWS (embedded_api.py) starts none.
OWN_EXECUTOR_TOKEN = "flanops-run-"  # nosec B105 # a marker in a client token, not a secret


class EmbeddedAwsError(FlanopsError):
    """The embedded moto server could not be started, reached or stopped."""


def state_file() -> Path:
    return embedded_dir() / "server.json"


def _lock_file() -> Path:
    return embedded_dir() / "lock"


def _ready_file() -> Path:
    return embedded_dir() / "starting.port"


def _resolve_region(recorded: str | None = None) -> str:
    """A region the user set wins. Otherwise the region of whoever started the server, so that
    processes agree. Otherwise :data:`EMBEDDED_REGION`."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or recorded or EMBEDDED_REGION


@dataclass(frozen=True)
class EmbeddedAws:
    """A running embedded moto server and how to point AWS clients at it."""

    endpoint_url: str
    region: str
    pid: int
    port: int

    def environment(self) -> dict[str, str]:
        """The variables to SET so that boto3, the AWS CLI and the SageMaker SDK use this server.

        Also remove every name in :meth:`variables_to_unset`. :meth:`activated` and
        :meth:`subprocess_environment` do both."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": _FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": _FAKE_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # The user's config and credential files must not apply: a profile's
            # s3.addressing_style = virtual, for example, cannot reach a bucket on 127.0.0.1.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            # SDK v3's ModelTrainer validates roles with IAM SimulatePrincipalPolicy, which moto lacks.
            "SAGEMAKER_VALIDATE_ROLE": "false",
            # A corporate HTTP(S)_PROXY would otherwise receive our requests to 127.0.0.1.
            "NO_PROXY": _no_proxy_with_loopback(os.environ),
            "no_proxy": _no_proxy_with_loopback(os.environ),
        }

    def variables_to_unset(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Names to REMOVE from ``environ`` (default ``os.environ``): profiles, session tokens and
        per-service endpoints such as ``AWS_ENDPOINT_URL_S3``. Any of these would override
        the fake credentials or the endpoint."""
        environ = os.environ if environ is None else environ
        service_endpoints = sorted(name for name in environ if name.startswith(_SERVICE_ENDPOINT_PREFIX))
        return [*_UNSET_VARIABLES, *service_endpoints]

    def subprocess_environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A complete environment for a child process (``subprocess.run(..., env=...)``): ``base``
        (default ``os.environ``) without :meth:`variables_to_unset`, plus :meth:`environment`."""
        base = os.environ if base is None else base
        dropped = set(self.variables_to_unset(base))
        return {**{k: v for k, v in base.items() if k not in dropped}, **self.environment()}

    def shell_lines(self) -> list[str]:
        """The ``unset`` and ``export`` lines that point a POSIX shell at the server (``flanops local env``)."""
        return [*(f"unset {name}" for name in self.variables_to_unset()),
                *(f"export {name}={_shell_quote(value)}" for name, value in self.environment().items())]

    def activate(self) -> dict[str, str | None]:
        """Point this process's ``os.environ`` at the server. Returns the previous values (None: was
        unset), which ``restore_environment`` puts back; :meth:`activated` does that for you."""
        previous: dict[str, str | None] = {}
        for name in self.variables_to_unset():
            previous[name] = os.environ.pop(name, None)
        for name, value in self.environment().items():
            previous.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        return previous

    @contextlib.contextmanager
    def activated(self) -> Iterator[EmbeddedAws]:
        """``with aws.activated(): ...`` points ``os.environ`` at the server and restores it afterwards."""
        previous = self.activate()
        try:
            yield self
        finally:
            restore_environment(previous)

    def boto_session(self) -> boto3.Session:
        """A boto3 Session whose clients and resources use this server. It is isolated from the
        user's profile, config and credential files. ``os.environ`` stays as it is."""
        import botocore.session
        from botocore.configprovider import ConstantProvider

        core = botocore.session.Session()
        store = core.get_component("config_store")
        # Constant providers and not set_config_variable: a None there would still fall back to $AWS_PROFILE.
        for name, value in (("profile", None), ("config_file", os.devnull), ("credentials_file", os.devnull)):
            store.set_config_provider(name, ConstantProvider(value))
        return _endpoint_session_class()(
            endpoint_url=self.endpoint_url,
            botocore_session=core,
            aws_access_key_id=_FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=_FAKE_SECRET_ACCESS_KEY,
            region_name=self.region,
        )


@functools.cache
def _endpoint_session_class() -> type[boto3.Session]:
    import boto3

    class EndpointSession(boto3.Session):
        """boto3 has no per-session endpoint: a per-client endpoint always replaces the
        configured one. This class supplies ``endpoint_url`` to each client and resource it
        creates, unless the caller passes one."""

        def __init__(self, *, endpoint_url: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.endpoint_url = endpoint_url

        def client(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("endpoint_url", self.endpoint_url)
            return super().client(*args, **kwargs)

        def resource(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("endpoint_url", self.endpoint_url)
            return super().resource(*args, **kwargs)

    return EndpointSession


def restore_environment(previous: Mapping[str, str | None]) -> None:
    """Undo :meth:`EmbeddedAws.activate`. ``previous`` maps each name to its old value, None if it was unset."""
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _no_proxy_with_loopback(environ: Mapping[str, str]) -> str:
    current = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    hosts = [h.strip() for h in current.split(",") if h.strip()]
    for host in (_HOST, "localhost"):
        if host not in hosts:
            hosts.append(host)
    return ",".join(hosts)


# ---------------------------------------------------------------------------------------------
# Server lifecycle


def ensure_server(timeout: float = _START_TIMEOUT_S) -> EmbeddedAws:
    """The running embedded server, started now if there is none.

    Reuses the server named in ``server.json`` if that process is alive and answers. Otherwise
    starts a new one, replacing a stale state file and stopping a hung server of ours, and
    waits up to ``timeout`` seconds for it to answer."""
    directory = embedded_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked():
        state = _read_state()
        if state is not None:
            ours = _is_server_process(state["pid"])
            if ours and _answers(state["endpoint_url"], attempts=3):
                return _from_state(state)
            if ours:  # alive but silent for seconds: hung. Stop it rather than leave an orphan holding the port.
                log.warning("embedded AWS: server pid %s does not answer; stopping it, starting another", state["pid"])
                _terminate(state["pid"])
            state_file().unlink(missing_ok=True)
        state = _start(timeout)
        _write_state(state)
        return _from_state(state)


def server_status() -> EmbeddedAws | None:
    """The running embedded server, or None. Never starts one."""
    state = _read_state()
    if state is None or not _is_server_process(state["pid"]) or not _answers(state["endpoint_url"]):
        return None
    return _from_state(state)


def stop_server() -> bool:
    """Stop the embedded server and remove its state file. Returns whether one was running.

    Everything in it (buckets, pipelines, model packages) is lost; see the module docstring."""
    if not state_file().exists():
        return False
    with _locked():
        state = _read_state()
        if state is None:
            return False
        running = _is_server_process(state["pid"])
        if running:
            _terminate(state["pid"])
        state_file().unlink(missing_ok=True)
        return running


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    import fcntl  # POSIX only, like start_new_session below

    embedded_dir().mkdir(parents=True, exist_ok=True)
    with open(_lock_file(), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state() -> dict[str, Any] | None:
    path = state_file()
    try:
        state = json.loads(path.read_text())
        state["pid"], state["port"] = int(state["pid"]), int(state["port"])
        state["endpoint_url"] = str(state["endpoint_url"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        # Writers replace the file atomically, so an unreadable one was not written by this module: treat as stale.
        log.warning("embedded AWS: ignoring unreadable %s (%s); a new server will replace it", path, error)
        return None
    return state


def _write_state(state: dict[str, Any]) -> None:
    write_text_atomic(state_file(), json.dumps(state, indent=2) + "\n")


def _from_state(state: Mapping[str, Any]) -> EmbeddedAws:
    return EmbeddedAws(
        endpoint_url=state["endpoint_url"],
        region=_resolve_region(state.get("region")),
        pid=int(state["pid"]),
        port=int(state["port"]),
    )


def _answers(endpoint_url: str, attempts: int = 1) -> bool:
    """Whether a moto server answers at ``endpoint_url``. The request bypasses any HTTP proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(attempts):
        try:
            with opener.open(f"{endpoint_url}/moto-api/", timeout=_HEALTH_TIMEOUT_S) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            if attempt + 1 < attempts:
                time.sleep(0.5)
    return False


def _is_server_process(pid: int) -> bool:
    """Whether ``pid`` is alive and runs our launcher. The state file may outlive the server and
    its pid be reused; an unrelated program must never be signalled."""
    if not process_alive(pid):
        return False
    command_line = _command_line(pid)
    return any(f"-m {module} serve " in command_line for module in (_LAUNCHER_MODULE, *_EARLIER_LAUNCHER_MODULES))


def _command_line(pid: int) -> str:
    """The process's command line, space-joined; "" if it cannot be read."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.is_dir():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""
    try:  # no /proc (macOS): ps is POSIX
        return subprocess.run(["ps", "-o", "command=", "-p", str(pid)],  # nosec B607 # ps from PATH, as a shell finds it
                              capture_output=True, text=True).stdout
    except OSError:
        return ""


def _terminate(pid: int) -> None:
    """SIGTERM the server's process group, then SIGKILL if it has not exited after a grace period."""
    for sig, grace in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, _STOP_TIMEOUT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # the server leads its own session, so its pgid is its pid
            os.killpg(pid, signal.SIGCONT)  # a stopped (SIGSTOP, Ctrl-Z) server handles SIGTERM only once continued
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return
            time.sleep(0.05)
    raise EmbeddedAwsError(f"embedded AWS: moto server pid {pid} survived SIGKILL; stop it by hand (kill -9 {pid})")


def _rotate_log(path: Path) -> None:
    if path.exists() and path.stat().st_size > _LOG_ROTATE_BYTES:
        os.replace(path, path.with_name(path.name + ".1"))


def _start(timeout: float) -> dict[str, Any]:
    """Launch a detached server, wait until it answers, return its state. The caller holds the lock."""
    import moto

    log_path = log_file()
    ready = _ready_file()
    ready.unlink(missing_ok=True)
    _rotate_log(log_path)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    # The server needs no credentials. It must not inherit the recorder switch: that writes a file into its cwd.
    server_env = {k: v for k, v in os.environ.items() if k not in ("MOTO_ENABLE_RECORDING", *_UNSET_VARIABLES)}
    server_env.update(AWS_ACCESS_KEY_ID=_FAKE_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=_FAKE_SECRET_ACCESS_KEY)
    command = [sys.executable, "-m", _LAUNCHER_MODULE, "serve", "--host", _HOST, "--ready-file", str(ready)]
    with open(log_path, "ab") as log:
        log.write(f"--- {started_at} flanops starts moto {moto.__version__}: {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=embedded_dir(),  # never hold on to the caller's cwd, which may be a temporary folder
            env=server_env,
            start_new_session=True,  # own session: no SIGHUP or Ctrl-C from our terminal, outlives us
        )

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise EmbeddedAwsError(
                f"embedded AWS: the moto server exited with code {process.returncode} while starting.\n"
                f"Its log {log_path} ends with:\n{_tail(log_path)}"
            )
        port = _read_port(ready)
        if port is not None and _answers(f"http://{_HOST}:{port}"):
            break
        if time.monotonic() > deadline:
            _terminate(process.pid)
            raise EmbeddedAwsError(
                f"embedded AWS: the moto server (pid {process.pid}) did not answer within {timeout:.0f} s and was "
                f"stopped. See {log_path}; a slow machine may need ensure_server(timeout=...) larger.\n"
                f"The log ends with:\n{_tail(log_path)}"
            )
        time.sleep(0.05)
    ready.unlink(missing_ok=True)

    endpoint_url = f"http://{_HOST}:{port}"
    return {
        "pid": process.pid,
        "port": port,
        "endpoint_url": endpoint_url,
        "region": _resolve_region(),
        "started_at": started_at,
        "log": str(log_path),
        "moto_version": moto.__version__,
    }


def _read_port(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None  # not written yet; the launcher writes it atomically, so ValueError means not yet too


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(cannot read the log: {error})"


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"
