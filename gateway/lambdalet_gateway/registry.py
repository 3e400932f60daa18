"""Functions from manifests (embedded mode): load, describe, and reload when a manifest or its code changes.

Loading is blocking file I/O and hashing: :func:`load` runs in a worker thread. An invalid manifest is
reported (file, field, rule) and skipped; the valid ones keep serving.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from lambdalet.spec import Function, SpecError, all_errors, is_function_document, load_manifest_file

log = logging.getLogger("lambdalet.gateway.registry")

_SKIP_DIRS = {"__pycache__", ".git", "node_modules", ".venv"}


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """A loaded function and what the control plane reports about it."""

    function: Function
    source: Path
    #: Base64 SHA-256 of the code (Lambda's CodeSha256 format).
    code_sha256: str
    code_size: int
    #: ISO-8601 as Lambda writes it, e.g. ``2024-01-02T03:04:05.000+0000``.
    last_modified: str

    @property
    def revision(self) -> str:
        """Changes whenever the code changes (spec changes show in the Function itself)."""
        return self.code_sha256


@dataclass(frozen=True, slots=True)
class Catalog:
    functions: dict[str, FunctionRecord] = field(default_factory=dict)
    errors: tuple[SpecError, ...] = ()


def _manifest_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())
        elif path.exists():
            files.append(path)
    return files


def _code_files(directory: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".pyc"):
                yield Path(root) / name


def _digest(function: Function) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    code = function.spec.code
    if code.path is not None:
        root = Path(code.path)
        for file in _code_files(root):
            data = file.read_bytes()
            digest.update(str(file.relative_to(root)).encode() + b"\0" + data + b"\0")
            size += len(data)
    elif code.inline is not None:
        for name, content in sorted(code.inline.files.items()):
            data = content.encode()
            digest.update(name.encode() + b"\0" + data + b"\0")
            size += len(data)
    else:
        digest.update((code.image or code.url or (code.configMap.name if code.configMap else "")).encode())
    return base64.b64encode(digest.digest()).decode(), size


def _lambda_time(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def _file_errors(path: Path, first: SpecError) -> list[SpecError]:
    """Every problem in a manifest file (the loader stops at the first)."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return [first]
    found: list[SpecError] = []
    for index, document in enumerate(documents):
        if is_function_document(document):
            source = str(path) if len(documents) == 1 else f"{path} (document {index + 1})"
            found += all_errors(document, source)
    return found or [first]


def load(paths: Sequence[Path]) -> Catalog:
    """Load every Function under ``paths``; invalid manifests become errors. Blocking."""
    functions: dict[str, FunctionRecord] = {}
    errors: list[SpecError] = []
    for file in _manifest_files(paths):
        try:
            loaded = load_manifest_file(file)
        except SpecError as exc:
            errors += _file_errors(file, exc)
            continue
        for function in loaded:
            if function.name in functions:
                other = functions[function.name].source
                errors.append(SpecError(str(file), "metadata.name", f"{function.name!r} is already defined in {other}"))
                continue
            try:
                sha, size = _digest(function)
                modified = file.stat().st_mtime
            except OSError as exc:
                errors.append(SpecError(str(file), "spec.code", f"cannot read the code: {exc}"))
                continue
            functions[function.name] = FunctionRecord(function, file, sha, size, _lambda_time(modified))
    return Catalog(functions, tuple(errors))


def fingerprint(paths: Sequence[Path], catalog: Catalog | None) -> tuple[tuple[str, int, int], ...]:
    """What changes when a manifest or a function's local code changes. Blocking."""
    items: list[tuple[str, int, int]] = []
    watched = _manifest_files(paths)
    if catalog is not None:
        for record in catalog.functions.values():
            if record.function.spec.code.path is not None:
                watched += list(_code_files(Path(record.function.spec.code.path)))
    for file in watched:
        try:
            stat = file.stat()
        except OSError:
            continue
        items.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(items)


class Registry:
    """Holds the current :class:`Catalog` and reloads it when the files change."""

    def __init__(self, paths: Sequence[Path], on_change: Callable[[Catalog], None]) -> None:
        self.paths = tuple(paths)
        self.catalog = Catalog()
        self._on_change = on_change
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None

    async def reload(self) -> bool:
        """Reload if anything changed; return whether it did."""
        current = await asyncio.to_thread(fingerprint, self.paths, self.catalog)
        if current == self._fingerprint:
            return False
        catalog = await asyncio.to_thread(load, self.paths)
        # the fingerprint including the newly loaded functions' code
        self._fingerprint = await asyncio.to_thread(fingerprint, self.paths, catalog)
        old_errors = {str(e) for e in self.catalog.errors}
        for error in catalog.errors:
            if str(error) not in old_errors:
                log.error(
                    "invalid manifest: %s",
                    error,
                    extra={"source": error.source, "field": error.field, "rule": error.rule},
                )
        self.catalog = catalog
        self._on_change(catalog)
        return True

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:
                log.exception("reloading manifests failed")
