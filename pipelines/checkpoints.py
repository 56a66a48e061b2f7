"""A training job's checkpoint location, kept locally the way SageMaker keeps it (``CheckpointConfig``).

SageMaker, for a training job with ``CheckpointConfig`` {S3Uri, LocalPath}: when the job starts it copies
what S3Uri holds to LocalPath (so a retried or resumed job finds the checkpoints of the attempt before it),
and while the job runs it copies what the job writes there to S3Uri. :func:`synced_checkpoints` does the
same for a local job: restore on entry, upload new and changed files every ``SYNC_SECONDS`` while the job
runs, and once more on exit however the job ended (a killed job's last checkpoint is kept too). Files the
job deletes (the Trainer keeps its last two checkpoints) stay in S3: a resume takes the latest.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from stepkit.errors import StepError
from stepkit.s3 import download_keys, prefix_keys, relative_key

from .failures import StepFailed
from .s3 import split_s3_uri

DEFAULT_LOCAL_PATH = "/opt/ml/checkpoints"   # SageMaker's LocalPath when the config gives none
SYNC_SECONDS = 5.0


class CheckpointSync:
    """One job's checkpoint folder and its S3 location: what was restored, and what was uploaded since."""

    def __init__(self, s3, uri: str, folder: Path, extra_args: dict | None = None) -> None:
        self.s3, self.uri, self.folder, self.extra_args = s3, uri, folder, extra_args
        self.bucket, key = split_s3_uri(uri)
        self.prefix = key.rstrip("/")
        self.uploaded: dict[str, tuple[int, int]] = {}   # relative path → (size, mtime_ns) as last uploaded

    def restore(self) -> int:
        """Copy every object below the S3 location into the folder; returns how many."""
        self.folder.mkdir(parents=True, exist_ok=True)
        folder, keys = prefix_keys(self.s3, self.bucket, self.prefix + "/")
        try:
            download_keys(self.s3, self.bucket, keys, folder, self.folder, self.uri)
        except StepError as err:   # a key that would land outside the folder
            raise StepFailed(str(err)) from None
        for key in keys:
            relative = relative_key(key, folder)
            stat = (self.folder / relative).stat()
            self.uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
        return len(keys)

    def upload_changed(self) -> int:
        """Upload the files that are new or changed since their last upload; returns how many."""
        count = 0
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            relative = path.relative_to(self.folder).as_posix()
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue   # the job removed it meanwhile (an old checkpoint)
            if self.uploaded.get(relative) == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                self.s3.upload_file(str(path), self.bucket, f"{self.prefix}/{relative}", ExtraArgs=self.extra_args)
            except FileNotFoundError:
                continue
            self.uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
            count += 1
        return count


@contextlib.contextmanager
def synced_checkpoints(s3, checkpoint_config: dict | None, local_path: Callable[[str], Path],
                       extra_args: dict | None = None, echo: Callable[[str], None] = print,
                       every: float = SYNC_SECONDS) -> Iterator[CheckpointSync | None]:
    """While the block runs, the job's checkpoint folder (``local_path`` maps its container path) is synced with
    ``checkpoint_config``'s S3Uri; without a checkpoint config, nothing happens."""
    if not checkpoint_config:
        yield None
        return
    sync = CheckpointSync(s3, checkpoint_config["S3Uri"],
                          local_path(checkpoint_config.get("LocalPath") or DEFAULT_LOCAL_PATH), extra_args)
    restored = sync.restore()
    if restored:
        echo(f"    restored {restored} checkpoint file(s) from {sync.uri}")
    stop = threading.Event()
    failures: list[Exception] = []

    def upload_while_running() -> None:
        while not stop.wait(every):
            try:
                sync.upload_changed()
            except Exception as err:   # noqa: BLE001 - said below; the final sync uploads what this one could not
                failures.append(err)
                return

    uploader = threading.Thread(target=upload_while_running, daemon=True, name="checkpoint-sync")
    uploader.start()
    try:
        yield sync
    finally:
        stop.set()
        uploader.join()
        if failures:
            echo(f"    checkpoints stopped reaching {sync.uri} while the job ran ({failures[0]}); syncing them now")
        sent = sync.upload_changed()
        if sent:
            echo(f"    synced {sent} checkpoint file(s) to {sync.uri}")
