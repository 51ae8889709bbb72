"""The service definition archive: one zip, validated completely before anything is trusted.

Layout::

    manifest.json              schema version, stages, tensors, provenance, sha256 of members
    stages/<i>-<name>/...      a SavedModel (CPU stages) or program.fpgaprog (accelerator)
    labels.json                optional: class names, index -> name

Loading refuses, each with ``ArchiveError`` and a message saying what is wrong: an unreadable
zip, an unknown schema version, members missing from or absent in the manifest, checksum or size
mismatches, names that would escape the extraction folder (absolute, ``..``, backslashes, links),
members or totals over the size limits, suspicious compression ratios (zip bombs), stages whose
tensors do not wire up, and SavedModels whose serving graph reaches file-system or Python ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import platform
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from fpgaserve import __version__

from .stages import Stage, TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.json"
STAGE_KINDS = ("tensorflow", "keras", "accelerator")


class ArchiveError(ValueError):
    """The archive cannot be used; the message names the member or field and the fix."""


@dataclass(frozen=True)
class Limits:
    """Defaults fit VGG-16 with room to spare; raise them for bigger models."""

    max_members: int = 10_000
    max_member_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    max_ratio: float = 200.0  # uncompressed / compressed, for members over 1 MiB
    max_manifest_bytes: int = 4 << 20


@dataclass
class ModelDefinition:
    """What a service runs: a name, the stages in order, optional class labels."""

    name: str
    pipeline: list[Stage] = field(default_factory=list)
    labels: list[str] | None = None

    def save(self, path: str | Path) -> Path:
        """Write the archive (atomically: a crash leaves no half-written file behind)."""
        check_wiring([(s.name, s.input, s.output) for s in self.pipeline])
        path = Path(path)
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            stages = []
            for index, stage in enumerate(self.pipeline):
                folder = f"stages/{index}-{stage.name}"
                stage.save(root / folder)
                stages.append(
                    {
                        "name": stage.name,
                        "kind": stage.kind,
                        "path": folder,
                        "input": stage.input.as_dict(),
                        "output": stage.output.as_dict(),
                    }
                )
            if self.labels is not None:
                (root / LABELS).write_text(json.dumps(self.labels))
            members = {
                file.relative_to(root).as_posix(): _digest(file)
                for file in sorted(root.rglob("*"))
                if file.is_file()
            }
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "name": self.name,
                "input": self.pipeline[0].input.name,
                "stages": stages,
                "provenance": _provenance(self.pipeline),
                "members": members,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
                for name in members:
                    archive.write(root / name, name)
            partial.replace(path)
        return path


def _digest(file: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": file.stat().st_size}


def _provenance(pipeline: list[Stage]) -> dict[str, Any]:
    software = {"fpgaserve": __version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "numpy"):
        software[package] = version(package)
    accelerator = [s for s in pipeline if s.kind == "accelerator"]
    program = accelerator[0].program.metadata if accelerator else {}
    return {
        "software": software,
        "format": accelerator[0].program.format if accelerator else None,
        "program": dict(program),
    }


def check_wiring(stages: list[tuple[str, TensorSpec, TensorSpec]]) -> None:
    """Each stage's output must be the next stage's input: dtype, rank and known dims."""
    if not stages:
        raise ArchiveError("the pipeline has no stages")
    for (name_a, _, out), (name_b, inp, _) in itertools.pairwise(stages):
        same_rank = len(out.shape) == len(inp.shape)
        dims_agree = same_rank and all(
            a is None or b is None or a == b for a, b in zip(out.shape, inp.shape, strict=True)
        )
        if out.dtype != inp.dtype or not dims_agree:
            raise ArchiveError(
                f"stage {name_a!r} outputs {out.dtype}{list(out.shape)} but stage {name_b!r} "
                f"expects {inp.dtype}{list(inp.shape)}"
            )


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if (
        not name
        or not path.parts  # "." names the folder itself
        or "\\" in name
        or path.is_absolute()
        or ".." in path.parts
        or ":" in path.parts[0]
        or name != path.as_posix()
    ):
        raise ArchiveError(f"member {name!r} has an unsafe path; refusing to extract it")
    return path


def _check_entries(archive: zipfile.ZipFile, limits: Limits) -> dict[str, zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(f"archive has {len(infos)} members; the limit is {limits.max_members}")
    entries: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        _safe_name(info.filename)
        if info.is_dir():
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"member {info.filename!r} is a symbolic link; refusing it")
        if info.filename in entries:
            raise ArchiveError(f"member {info.filename!r} appears twice")
        if info.file_size > limits.max_member_bytes:
            raise ArchiveError(
                f"member {info.filename!r} is {info.file_size} bytes; the limit is "
                f"{limits.max_member_bytes}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1 << 20 and ratio > limits.max_ratio:
            raise ArchiveError(
                f"member {info.filename!r} expands {ratio:.0f}x: refusing a likely zip bomb"
            )
        total += info.file_size
        entries[info.filename] = info
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"archive expands to {total} bytes; the limit is {limits.max_total_bytes}"
        )
    return entries


def _read_manifest(archive: zipfile.ZipFile, entries, limits: Limits) -> dict[str, Any]:
    if MANIFEST not in entries:
        raise ArchiveError(f"archive has no {MANIFEST}: not a service definition")
    if entries[MANIFEST].file_size > limits.max_manifest_bytes:
        raise ArchiveError(f"{MANIFEST} is too large")
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArchiveError(f"{MANIFEST} must be a JSON object")
    schema = manifest.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise ArchiveError(
            f"archive schema version {schema!r} is not supported (this fpgaserve reads "
            f"{SCHEMA_VERSION}); rebuild it with this version's `fpgaserve build`"
        )
    return manifest


def _stage_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ArchiveError(f"{MANIFEST} lists no stages")
    parsed = []
    for index, stage in enumerate(stages):
        try:
            kind, path = stage["kind"], stage["path"]
            entry = {
                "name": str(stage["name"]),
                "kind": kind,
                "path": str(_safe_name(path)),
                "input": TensorSpec.from_dict(stage["input"]),
                "output": TensorSpec.from_dict(stage["output"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchiveError(f"stage {index} in {MANIFEST} is malformed: {exc}") from None
        if kind not in STAGE_KINDS:
            raise ArchiveError(f"stage {entry['name']!r} has unknown kind {kind!r}")
        parsed.append(entry)
    check_wiring([(s["name"], s["input"], s["output"]) for s in parsed])
    if manifest.get("input") != parsed[0]["input"].name:
        raise ArchiveError(
            f"{MANIFEST} names service input {manifest.get('input')!r}; the first stage takes "
            f"{parsed[0]['input'].name!r}"
        )
    return parsed


DEFAULT_LIMITS = Limits()


def _open(path: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path}: not a readable zip archive ({exc})") from None


# What zipfile and zlib raise for damaged bytes (a bad CRC, a corrupt stream, a flipped
# "encrypted" flag, an unknown compression method).
ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError,
              OSError, ValueError, struct.error)  # fmt: skip


@contextlib.contextmanager
def _refusing_damage(path: str | Path) -> Iterator[None]:
    try:
        yield
    except ArchiveError:
        raise
    except ZIP_DAMAGE as exc:  # offsets pointing nowhere give OSError and ValueError too
        raise ArchiveError(
            f"{path}: the archive is damaged ({type(exc).__name__}: {exc})"
        ) from None


def read_manifest(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The archive's manifest (e.g. its model name) without extracting anything."""
    with _refusing_damage(path), _open(path) as archive:
        return _read_manifest(archive, _check_entries(archive, limits), limits)


def extract(path: str | Path, target: Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Validate ``path`` and extract it into ``target``; returns the manifest with parsed
    stages. Nothing is written unless the member list, names and sizes pass first."""
    with _refusing_damage(path), _open(path) as archive:
        entries = _check_entries(archive, limits)
        manifest = _read_manifest(archive, entries, limits)
        members = manifest.get("members")
        if not isinstance(members, dict):
            raise ArchiveError(f"{MANIFEST} has no member list")
        present = set(entries) - {MANIFEST}
        missing, extra = set(members) - present, present - set(members)
        if missing:
            raise ArchiveError(f"members listed in {MANIFEST} are missing: {sorted(missing)[:5]}")
        if extra:
            raise ArchiveError(f"archive holds members not in {MANIFEST}: {sorted(extra)[:5]}")
        stages = _stage_specs(manifest)
        for name in sorted(members):
            _extract_member(archive, entries[name], members[name], target)
    for stage in stages:
        if stage["kind"] != "accelerator":
            _check_saved_model(stage["name"], target / stage["path"])
    manifest["stages"] = stages
    return manifest


# TensorFlow ops a serving graph has no business running: file-system access, Python callbacks,
# readers and writers of files. A SavedModel is a program; these would let an archive touch the
# server's disk. (Save/Restore ops also live in every SavedModel's checkpoint functions, which
# is why only what the serving signature reaches is checked.)
FORBIDDEN_OPS = frozenset({
    "ReadFile", "WriteFile", "DeleteFile", "MatchingFiles", "PyFunc", "PyFuncStateless",
    "EagerPyFunc", "SaveV2", "RestoreV2", "Save", "SaveSlices", "Restore", "RestoreSlice",
    "MergeV2Checkpoints", "ShardedFilename", "TFRecordDataset", "TextLineDataset",
    "FixedLengthRecordDataset", "CreateSummaryFileWriter", "WriteSummary", "ImmutableConst",
    "LoadAndRemapMatrix",
})  # fmt: skip


def _check_saved_model(stage: str, folder: Path) -> None:
    """Parse the SavedModel (protobuf, no code runs) and walk every function the serving
    signature can reach; refuse forbidden ops before TensorFlow ever loads it."""

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((folder / "saved_model.pb").read_bytes())
        graph = saved.meta_graphs[0]
        signature = graph.signature_def["serving_default"]
    except (OSError, DecodeError, IndexError, KeyError):
        raise ArchiveError(f"stage {stage!r}: not a SavedModel with a serving_default") from None
    functions = {f.signature.name: f for f in graph.graph_def.library.function}
    nodes = {node.name: node for node in graph.graph_def.node}
    pending = [nodes[t.name.split(":")[0]] for t in signature.outputs.values()
               if t.name.split(":")[0] in nodes]  # fmt: skip
    seen: set[str] = set()
    while pending:
        node = pending.pop()
        if node.op in FORBIDDEN_OPS:
            raise ArchiveError(
                f"stage {stage!r} uses TensorFlow op {node.op!r}, which a service definition "
                "may not run (file access or Python code)"
            )
        for value in node.attr.values():
            names = [value.func.name] if value.func.name else [f.name for f in value.list.func]
            for name in names:
                if name in functions and name not in seen:
                    seen.add(name)
                    pending.extend(functions[name].node_def)


def _extract_member(archive, info: zipfile.ZipInfo, expected: dict, target: Path) -> None:
    try:
        declared, checksum = int(expected["size"]), str(expected["sha256"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ArchiveError(f"member {info.filename!r} has no size/sha256 in the manifest") from None
    if declared != info.file_size:
        raise ArchiveError(f"member {info.filename!r}: size differs from the manifest")
    destination = target.joinpath(*_safe_name(info.filename).parts)
    digest, written = hashlib.sha256(), 0
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        sink = destination.open("xb")
    except OSError as exc:  # a member that is another's folder, a name too long, ...
        raise ArchiveError(f"member {info.filename!r} cannot be extracted: {exc}") from None
    with archive.open(info) as source, sink:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            written += len(chunk)
            if written > declared:
                raise ArchiveError(f"member {info.filename!r} is longer than declared")
            digest.update(chunk)
            sink.write(chunk)
    if digest.hexdigest() != checksum:
        raise ArchiveError(f"member {info.filename!r}: checksum mismatch (damaged or altered)")
