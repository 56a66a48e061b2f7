"""``model.tar.gz``: extracting one safely (once per process) and writing one reproducibly.

A model folder can arrive as SageMaker hands it to later jobs: a folder holding only
``model.tar.gz`` (a TrainingStep tars /opt/ml/model). :func:`extract_model_archive` unpacks it
after checking every member; :func:`pack_folder` packs a folder as it is, as a training job's output.
"""
from __future__ import annotations

import atexit
import gzip
import io
import os
import shutil
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path

from .errors import StepError, first_line

MODEL_ARCHIVE = "model.tar.gz"  # SageMaker's name for a packed model directory
_extracted: dict[tuple[str, int, int], Path] = {}  # (tarball, size, mtime) → its extracted folder, per process


def extract_model_archive(archive: str | Path, label: str) -> Path:
    """Extract a ``model.tar.gz`` into a private temporary folder (removed at exit) and return that folder.

    Cached per tarball, so a step that checks a folder and then loads it extracts once. Members
    are checked first (see :func:`extract_safely`); a corrupt tarball is a StepError naming it.
    """
    archive = Path(archive).absolute()
    stat = archive.stat()
    key = (str(archive), stat.st_size, stat.st_mtime_ns)
    if key in _extracted and _extracted[key].is_dir():
        return _extracted[key]
    destination = Path(tempfile.mkdtemp(prefix="flanops-model-"))
    atexit.register(shutil.rmtree, destination, ignore_errors=True)
    print(f"extracting {archive} ({stat.st_size / 1e6:.1f} MB) to {destination}")
    try:
        extract_safely(archive, destination, label)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    _extracted[key] = destination
    return destination


def path_inside(root: Path, relative: str, label: str, advice: str = "") -> Path:
    """``root/relative``, or a StepError (ending with ``advice``) if that would land outside ``root``."""
    target = (root / relative).resolve()
    if relative.startswith("/") or not target.is_relative_to(root.resolve()) or target == root.resolve():
        raise StepError(f"{label} would be written outside the folder it is unpacked into; refusing it{advice}")
    return target


# What to do about an archive that tries to write outside its folder: nothing of it was written.
REPACK = "; nothing was extracted: pack the model again from inside its folder (tar -czf model.tar.gz -C FOLDER .)"


def extract_safely(archive: Path, destination: Path, label: str) -> None:
    """Extract a tarball after checking every member: regular files and folders inside ``destination`` only.

    Checked before anything is written, so a hostile archive leaves nothing behind; tarfile's
    ``data`` filter then guards the extraction itself.
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if member.issym() or member.islnk():
                    raise StepError(f"{label}: archive member {member.name!r} is a link, which can point outside the "
                                    f"model folder; refusing it{REPACK}")
                if not (member.isfile() or member.isdir()):
                    raise StepError(f"{label}: archive member {member.name!r} is not a file or folder; refusing to extract")
                if member.name in ("", ".", "./") and member.isdir():
                    continue
                path_inside(destination, member.name, f"{label}: archive member {member.name!r}", REPACK)
            tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:  # what corrupt or cut-off gzip raises
        raise StepError(f"{label}: not a readable tar archive ({first_line(err)}); is it corrupted or truncated?") from None


def find_model_root(folder: Path, label: str) -> Path:
    """The folder holding config.json: the top, or one level down (some archives wrap a folder)."""
    if (folder / "config.json").is_file():
        return folder
    candidates = sorted(path.parent for path in folder.glob("*/config.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise StepError(f"{label}: no config.json found; expected a save_pretrained folder or a model.tar.gz holding one")
    raise StepError(f"{label}: several model folders ({', '.join(p.name for p in candidates)}); point at one of them")



def pack_folder(folder: str | Path, tar_path: str | Path) -> Path:
    """Every file of ``folder`` as it is, as SageMaker packs a training job's /opt/ml/model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StepError(f"cannot package {folder}: no such folder")
    return write_archive(folder_members(folder), tar_path)


def folder_members(folder: Path, skip=lambda top: False) -> dict[str, Path | bytes | None]:
    """Archive name → file (None for a folder) under ``folder``, except what ``skip`` says of the top-level name."""
    members: dict[str, Path | bytes | None] = {}
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if not skip(name.split("/")[0]):
            members[name] = None if path.is_dir() else path
    return members


def write_archive(members: dict[str, Path | bytes | None], tar_path: str | Path) -> Path:
    """Write a ``.tar.gz`` of ``members`` (archive name → file to copy, content, or None for a folder).

    Reproducible: the same members give the same bytes (sorted names, mtime 0, owner 0, normalized
    modes, no name or time in the gzip header), so an unchanged model gives an unchanged artifact.
    gzip level 6 (tar czf's): level 9 takes much longer on weights for a percent or two.
    Written to a temporary sibling and renamed, so ``tar_path`` is either absent or complete.
    """
    target = Path(tar_path).absolute()
    partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as zipped, \
                tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                _add_member(tar, name, members[name])
        os.replace(partial, target)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise StepError(f"cannot write {target}: {err.strerror or err}") from err
        raise
    return target


def _add_member(tar: tarfile.TarFile, name: str, source: Path | bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if source is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif isinstance(source, bytes):
        info.mode, info.size = 0o644, len(source)
        tar.addfile(info, io.BytesIO(source))
    else:
        status = os.stat(source)  # follows links: the file's content is packed, never a link
        info.mode, info.size = 0o755 if status.st_mode & 0o100 else 0o644, status.st_size
        with open(source, "rb") as handle:
            tar.addfile(info, handle)
