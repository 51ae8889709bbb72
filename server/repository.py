"""The model repository: which archives are served under which name and version.

Sources are archives named on the command line (version 1, name from the manifest) and/or a
directory laid out as ``<name>/<version>/model.zip``. The directory is rescanned every
``poll_seconds``: new versions are loaded (and warmed) before the versions they replace are
drained and unloaded, so a broken new version never takes down the one already serving; a
failed file is not retried until it changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fpgaserve.hal import Device, DeviceClosedError, DeviceFaultError
from fpgaserve.pipeline import read_manifest
from fpgaserve.pipeline.runtime import EXTRACTED_PREFIX

from .errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .model import AVAILABLE, END, ServedModel
from .scheduler import BatchingConfig, remaining

log = logging.getLogger("fpgaserve.server")

ARCHIVE_FILE = "model.zip"
LABELS_FILE = "version_labels.json"  # optional, per model: {"stable": 1, "canary": 2}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Where archives are extracted while they load; errors from TensorFlow quote these paths.
_EXTRACTED = re.compile(
    re.escape(os.path.join(tempfile.gettempdir(), EXTRACTED_PREFIX)) + r"[^/\s]*/"
)


def _version_folder(name: str) -> bool:
    """ASCII digits only (str.isdigit also takes '²' and '٢'), 1 .. int64."""
    return name.isascii() and name.isdigit() and len(name) <= 18 and int(name) > 0


def check_model_name(name: str) -> str:
    """Model names become directory names and metric labels: keep them plain."""
    if not NAME.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: ``latest`` (the highest), ``all``, or listed ones."""

    kind: str = "latest"
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        if text in ("latest", "all"):
            return cls(text)
        try:
            versions = frozenset(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(
                f"version policy {text!r}: use latest, all, or version numbers like 1,3"
            ) from None
        if not versions or min(versions) < 1:
            raise ValueError(f"version policy {text!r}: version numbers start at 1")
        return cls("specific", versions)

    def __str__(self) -> str:  # as --version-policy takes it
        return ",".join(map(str, sorted(self.versions))) if self.kind == "specific" else self.kind

    def select(self, versions: Iterable[int]) -> set[int]:
        versions = set(versions)
        if self.kind == "all":
            return versions
        if self.kind == "specific":
            return versions & self.versions
        return {max(versions)} if versions else set()


@dataclass(frozen=True)
class Candidate:
    """An archive on disk; ``stamp`` changes when the file does."""

    path: Path
    stamp: tuple[int, ...]

    @classmethod
    def of(cls, path: Path) -> Candidate:
        # Not only time and size: reproducible builds fix mtimes, and a file renamed into place
        # (how to publish) is a new inode; ctime catches an overwrite in place.
        stat = path.stat()
        return cls(path, (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns))


class ModelRepository:
    """Loads, routes to and unloads model versions; thread-safe."""

    def __init__(
        self,
        device: Device,
        batching: BatchingConfig,
        *,
        archives: Iterable[Path] = (),
        root: Path | None = None,
        policy: VersionPolicy = VersionPolicy(),
        warmup: bool = True,
        on_change: Callable[[], None] = lambda: None,
        on_new_model: Callable[[ServedModel], None] = lambda model: None,
    ) -> None:
        self.device, self.batching, self.root, self.policy = device, batching, root, policy
        self._warmup, self._on_change, self._on_new_model = warmup, on_change, on_new_model
        self._lock = threading.RLock()
        self._models: dict[str, dict[int, ServedModel]] = {}
        # (name, version) -> (the file that failed, or None: the device failed; the error)
        self._failed: dict[tuple[str, int], tuple[Candidate | None, str]] = {}
        self._loading: dict[tuple[str, int], ServedModel] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._fixed: dict[str, Candidate] = {}
        self._reported: set[Path] = set()  # layout mistakes already logged
        for path in archives:
            name = check_model_name(str(read_manifest(path)["name"]))
            if name in self._fixed:
                raise ValueError(
                    f"two archives define model {name!r}: {self._fixed[name].path}, {path}"
                )
            self._fixed[name] = Candidate.of(Path(path))
        if root is not None and not root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        if root is None and not self._fixed:
            raise ValueError("nothing to serve: give archives and/or a model repository directory")
        self._stop = threading.Event()
        self._first_sync = threading.Event()
        self._poller: threading.Thread | None = None
        self._poll_seconds = 5.0

    # -- routing -----------------------------------------------------------------------------

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a model of this server (loaded, loading or failed)."""
        with self._lock:
            known = name in self._models or name in self._fixed
            return known or any(n == name for n, _ in (*self._failed, *self._loading))

    def names(self) -> list[str]:
        with self._lock:
            others = {name for name, _ in (*self._failed, *self._loading)}
            return sorted(set(self._models) | set(self._fixed) | others)

    def only_model(self, field: str = "model_spec.name") -> str:
        """The name to use when a request names none (in its ``field``): allowed while exactly
        one model is served."""
        names = self.names()
        if len(names) != 1:
            raise InvalidArgument(
                f"name the model ({field}); this server has {len(names)}: {names}"
            )
        return names[0]

    def get(self, name: str, version: int | None = None, label: str | None = None) -> ServedModel:
        """The model version a request names, or the newest available one."""
        with self._lock:
            versions = self._models.get(name)
            if versions is None:
                if any(known == name for known, _ in self._loading):
                    raise Unavailable(f"model {name!r} is still loading; retry shortly")
                if any(n == name and file is None for (n, _), (file, _) in self._failed.items()):
                    raise Unavailable(f"model {name!r} failed on the device; retry shortly")
                if any(known == name for known, _ in self._failed):
                    raise FailedPrecondition(
                        f"model {name!r} failed to load; GetModelStatus says why: fix or "
                        "replace its archive"
                    )
                raise NotFound(f"model {name!r} is not served here; models: {self.names()}")
            if label:
                labels = self._labels.get(name, {})
                if label not in labels:
                    raise NotFound(
                        f"model {name!r} has no version label {label!r}; labels: {sorted(labels)}"
                    )
                version = labels[label]
            available = {v: m for v, m in versions.items() if m.state == AVAILABLE}
            if version is None:
                if not available:
                    raise Unavailable(f"model {name!r} is still loading; retry shortly")
                return available[max(available)]
            if version not in available:
                if (name, version) in self._loading:
                    raise Unavailable(f"model {name!r} version {version} is still loading; retry")
                failed = self._failed.get((name, version))
                if failed is not None and failed[0] is None and version not in versions:
                    raise Unavailable(
                        f"model {name!r} version {version} failed on the device; retry shortly"
                    )
                if failed is not None and version not in versions:
                    raise FailedPrecondition(
                        f"model {name!r} version {version} failed to load; GetModelStatus says "
                        f"why; available versions: {sorted(available)}"
                    )
                state = versions[version].state if version in versions else self._absent()
                named = f"version {version}" + (f" (label {label!r})" if label else "")
                raise NotFound(
                    f"model {name!r} {named} is not available ({state}); "
                    f"available versions: {sorted(available)}"
                )
            return available[version]

    def _absent(self) -> str:
        """Why a version is not loaded at all: in a repository, the policy may leave it out."""
        if self.root is None:
            return "not present"
        return f"not present, or left out by the version policy {self.policy}"

    def versions(self, name: str) -> list[tuple[int, str, str]]:
        """(version, state, error) of every version known for ``name``, for status calls."""
        with self._lock:
            rows = {v: (v, m.state, m.error) for (n, v), m in self._loading.items() if n == name}
            rows |= {v: (v, m.state, m.error) for v, m in self._models.get(name, {}).items()}
            for (known, version), (_, error) in self._failed.items():
                if known != name:
                    continue
                if version in rows:  # a new file for a serving version failed to load
                    state = rows[version][1]
                    error = f"still serving the previous file: its replacement failed: {error}"
                    rows[version] = (version, state, error)
                else:
                    rows[version] = (version, END, error)
        if not rows:
            raise NotFound(f"model {name!r} is not served here; models: {self.names()}")
        return [rows[v] for v in sorted(rows)]

    def model_ready(self, name: str) -> bool:
        with self._lock:
            return any(m.ready for m in self._models.get(name, {}).values())

    def ready(self) -> bool:
        """The first load pass is over and every loaded model has a version AVAILABLE on a
        healthy device. A model none of whose versions loads is reported by its own health
        status and GetModelStatus, not by keeping the whole server out of rotation."""
        with self._lock:
            return (
                self._first_sync.is_set()
                and bool(self._models)
                and all(self.model_ready(name) for name in self._models)
            )

    def served(self) -> list[ServedModel]:
        with self._lock:
            return [m for versions in self._models.values() for m in versions.values()]

    # -- loading and reloading -------------------------------------------------------------

    def start(self, poll_seconds: float = 5.0) -> None:
        """Load everything in the background, then keep the directory in sync (and retry
        loads that failed on the device, archives named on the command line included)."""
        self._poll_seconds = poll_seconds

        def loop() -> None:
            self.sync()
            while not self._stop.wait(poll_seconds):
                if self.root is not None or self._device_failures():
                    self.sync()

        self._poller = threading.Thread(target=loop, name="model-repository", daemon=True)
        self._poller.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the first pass has tried to load everything."""
        return self._first_sync.wait(timeout)

    def scan(self) -> dict[str, dict[int, Candidate]]:
        found = {name: {1: candidate} for name, candidate in self._fixed.items()}
        if self.root is None:
            return found
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith("."):  # hidden, or a mounted ConfigMap's ..data links
                continue
            if not folder.is_dir():
                if folder.suffix == ".zip":
                    self._ignore(folder, f"archives go in <model name>/<version>/{ARCHIVE_FILE}")
                continue
            if not NAME.match(folder.name):
                self._ignore(
                    folder, "a model name is a letter or digit, then letters, digits, . _ -"
                )
                continue
            if folder.name in found:
                self._ignore(folder, "an archive named on the command line serves that model")
                continue
            if not self._inside(folder):
                self._ignore(folder, "it links outside the model repository")
                continue
            versions = {}
            # "1" before "01" before "001": when several folders name one version, the plainest
            # is served, the same one on every scan, and the others are reported once.
            for sub in sorted(folder.iterdir(), key=lambda sub: (len(sub.name), sub.name)):
                archive = sub / ARCHIVE_FILE
                if _version_folder(sub.name) and archive.is_file() and self._inside(archive):
                    if int(sub.name) in versions:
                        served = versions[int(sub.name)].path
                        why = f"{served} has the same version number; remove or renumber one"
                        self._ignore(archive, why)
                        continue
                    versions[int(sub.name)] = Candidate.of(archive)
            if versions:
                found[folder.name] = versions
            else:
                where = f"{folder.name}/<number>/{ARCHIVE_FILE}"
                self._ignore(folder, f"no version folder in it holds a model; expected {where}")
            self._read_labels(folder)
        return found

    def _ignore(self, path: Path, why: str) -> None:
        """A layout mistake, logged once however often the folder is scanned."""
        if path not in self._reported:
            self._reported.add(path)
            log.error("ignoring %s: %s", path, why)

    def _inside(self, path: Path) -> bool:
        """Links are followed only while they stay inside the repository (as a mounted
        ConfigMap's do); one that leads elsewhere is not served."""
        return path.resolve().is_relative_to(self.root.resolve())

    def _read_labels(self, folder: Path) -> None:
        path = folder / LABELS_FILE
        if not path.is_file():
            self._labels.pop(folder.name, None)
            return
        try:
            labels = json.loads(path.read_text())
            if not all(isinstance(k, str) and isinstance(v, int) for k, v in labels.items()):
                raise ValueError("expected {label: version number}")
            self._labels[folder.name] = labels
        except (ValueError, AttributeError, OSError) as exc:
            log.error("ignoring %s: %s", path, exc)

    def sync(self) -> None:
        """One reconcile pass: load what the policy wants and is new or changed, then unload
        what it no longer wants (only once a replacement is available)."""
        try:
            found = self.scan()
        except Exception as exc:  # the poller must survive anything the folder holds
            log.error("cannot scan the model repository %s: %s", self.root, exc)
            self._first_sync.set()
            return
        for name, candidates in found.items():
            served = self._models.get(name, {})
            usable = {
                version: candidate
                for version, candidate in candidates.items()
                if version in served or not self._known_bad(name, version, candidate)
            }
            for version in sorted(self.policy.select(usable)):
                candidate, current = usable[version], served.get(version)
                if current is not None and current.stamp == candidate.stamp:
                    continue
                if not self._known_bad(name, version, candidate):
                    self._load(name, version, candidate)
        self._retire(found)
        self._forget_missing(found)
        self._first_sync.set()
        self._on_change()

    def _forget_missing(self, found: dict[str, dict[int, Candidate]]) -> None:
        """Failures and labels of folders that are gone: a deleted broken model is no longer
        listed (nor counted when a request names no model)."""
        with self._lock:
            for name, version in list(self._failed):
                if version not in found.get(name, {}):
                    del self._failed[(name, version)]
            for name in set(self._labels) - set(found):
                del self._labels[name]

    def _for_clients(self, error: str) -> str:
        """A load error as status calls show it: paths relative to the repository, so that
        clients learn which archive failed but not how the server's disk is laid out."""
        folders = {str(self.root.resolve()), str(self.root)} if self.root else set()
        for folder in sorted(folders, key=len, reverse=True):  # the longer may contain the other
            error = error.replace(folder + "/", "")
        for candidate in self._fixed.values():
            error = error.replace(str(candidate.path), candidate.path.name)
        return _EXTRACTED.sub("", error)  # "stages/2-classifier/..." names the archive's member

    def _device_failures(self) -> bool:
        """Loads that failed on the device, not on their file: each poll tries them again."""
        with self._lock:
            return any(candidate is None for candidate, _ in self._failed.values())

    def _known_bad(self, name: str, version: int, candidate: Candidate) -> bool:
        """This very file failed before; it is retried only once it changes."""
        failed = self._failed.get((name, version))
        return failed is not None and failed[0] == candidate

    def _load(self, name: str, version: int, candidate: Candidate) -> None:
        model = ServedModel(
            name, version, candidate.path, self.batching, self._on_change, candidate.stamp
        )
        self._on_new_model(model)
        log.info("loading model %s version %d from %s", name, version, candidate.path)
        with self._lock:
            self._loading[(name, version)] = model
        self._on_change()  # health: the model is known, NOT_SERVING until it is available
        try:
            model.load(self.device, warmup=self._warmup)
        except Exception as exc:  # any load failure: the version already serving stays
            error = self._for_clients(str(exc))
            # A board that faulted (still starting, reset) may work at the next poll; a bad
            # file is retried only once it changes.
            device_fault = isinstance(exc, Unavailable | DeviceFaultError | DeviceClosedError)
            if device_fault:
                error += f" (tried again every {self._poll_seconds:g} s)"
            log.error("model %s version %d failed to load: %s", name, version, error)
            with self._lock:
                del self._loading[(name, version)]
                self._failed[(name, version)] = (None if device_fault else candidate, error)
            return
        with self._lock:
            del self._loading[(name, version)]
            self._failed.pop((name, version), None)
            previous = self._models.setdefault(name, {}).get(version)
            self._models[name][version] = model
        log.info("model %s version %d is available", name, version)
        self._on_change()  # SERVING now, while other models may still be loading
        if previous is not None:
            previous.unload()

    def _retire(self, found: dict[str, dict[int, Candidate]]) -> None:
        retired = []
        with self._lock:
            for name, versions in list(self._models.items()):
                on_disk = found.get(name, {})
                wanted = self.policy.select(
                    v for v in on_disk if v in versions and versions[v].state == AVAILABLE
                )
                for version in list(versions):
                    if version not in wanted:
                        retired.append(versions.pop(version))
                if not versions:
                    del self._models[name]
        for model in retired:
            log.info("unloading model %s version %d", model.name, model.version)
            model.unload()

    def close(self, timeout: float | None = None) -> bool:
        """Stop polling, drain and unload every version, all within ``timeout`` seconds. False
        when some version was still running a request or a stage then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
        unloaded = [model.unload(remaining(deadline)) for model in self.served()]
        return all(unloaded)
