"""The local executor's CheckpointConfig: a training job's checkpoint folder synced with S3 as SageMaker does."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import mocked_aws
from flanops.pipelines.checkpoints import synced_checkpoints

BUCKET = "flanops-checkpoints-test"
URI = f"s3://{BUCKET}/pipeline/exec1/FineTuneLoRA/checkpoints"


@pytest.fixture
def s3():
    with mocked_aws("us-east-1", BUCKET) as session:
        yield session.client("s3")


def keys(s3) -> set[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="pipeline/exec1/FineTuneLoRA/checkpoints/").get("Contents", [])
    return {item["Key"].rsplit("checkpoints/", 1)[1] for item in listed}


def sandbox(root: Path):
    return lambda container_path: root / container_path.lstrip("/")


@pytest.mark.smoke
def test_checkpoints_reach_s3_while_the_job_runs_and_when_it_dies_and_come_back_for_the_next_attempt(s3, tmp_path):
    config = {"S3Uri": URI, "LocalPath": "/opt/ml/checkpoints"}
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="killed"):
        with synced_checkpoints(s3, config, sandbox(tmp_path / "first"), echo=lines.append, every=0.05) as sync:
            assert sync.folder == tmp_path / "first" / "opt/ml/checkpoints" and sync.folder.is_dir()
            (sync.folder / "checkpoint-10").mkdir()
            (sync.folder / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
            deadline = time.monotonic() + 10
            while "checkpoint-10/trainer_state.json" not in keys(s3):   # uploaded while the job still runs
                assert time.monotonic() < deadline, "not uploaded while running"
                time.sleep(0.05)
            (sync.folder / "checkpoint-20").mkdir()
            (sync.folder / "checkpoint-20" / "trainer_state.json").write_text('{"global_step": 20}')
            raise RuntimeError("killed")   # the job dies: what it wrote last is uploaded on the way out
    assert keys(s3) == {"checkpoint-10/trainer_state.json", "checkpoint-20/trainer_state.json"}

    # the retried job (a fresh sandbox) starts with them
    with synced_checkpoints(s3, {"S3Uri": URI}, sandbox(tmp_path / "second"), echo=lines.append) as sync:
        assert sync.folder == tmp_path / "second" / "opt/ml/checkpoints"   # SageMaker's default LocalPath
        assert (sync.folder / "checkpoint-20" / "trainer_state.json").read_text() == '{"global_step": 20}'
        assert sync.upload_changed() == 0, "restored files are not uploaded again"
    assert f"    restored 2 checkpoint file(s) from {URI}" in lines


def test_a_job_without_a_checkpoint_config_gets_no_folder(s3, tmp_path):
    with synced_checkpoints(s3, None, sandbox(tmp_path)) as sync:
        assert sync is None
    assert not (tmp_path / "opt").exists()


def test_a_failed_upload_while_running_is_said_and_the_final_sync_still_uploads(s3, tmp_path, monkeypatch):
    from flanops.pipelines import checkpoints

    real, calls, lines = checkpoints.CheckpointSync.upload_changed, [], []

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("S3 went away")
        return real(self)

    monkeypatch.setattr(checkpoints.CheckpointSync, "upload_changed", flaky)
    with synced_checkpoints(s3, {"S3Uri": URI}, sandbox(tmp_path), echo=lines.append, every=0.01) as sync:
        (sync.folder / "checkpoint-5").mkdir()
        (sync.folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert keys(s3) == {"checkpoint-5/trainer_state.json"}
    assert any("stopped reaching" in line and "S3 went away" in line for line in lines), lines
