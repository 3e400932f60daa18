"""Preparing a function's code directory before an environment starts (embedded mode).

Interpreted runtimes run their code directory as is. Compiled code is built here when its toolchain is
present, cached by content under ``$LAMBDALET_CACHE/builds/<hash>`` (default ``~/.cache/lambdalet``),
and the built directory is what the environment runs:

- ``provided.*`` with a ``go.mod`` and no ``bootstrap``: ``go build`` of the main package into
  ``bootstrap`` (modules such as ``github.com/aws/aws-lambda-go`` come from the Go module proxy);
- ``java17``/``java21`` with a ``pom.xml`` (and ``mvn``): ``mvn package``, classes at the root and the
  runtime dependencies in ``lib/`` as in a Lambda zip; with ``.java`` sources and no ``pom.xml``:
  ``javac`` against ``aws-lambda-java-core`` (fetched once with the Java runtime client) and ``lib/*.jar``.

When code cannot be built, ``BuildError`` says why, and the gateway answers invocations with that reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Bumped when the layout of built directories changes, so older cache entries are not reused.
BUILDER_VERSION = "1"
GO_RUNTIMES = frozenset({"provided.al2023", "provided.al2"})
JAVA_RUNTIMES = frozenset({"java17", "java21"})
#: Folders that are build output or tool state, never part of the source.
_IGNORED = frozenset({".git", "target", ".gradle", "node_modules", "__pycache__", ".idea"})
_BUILD_TIMEOUT = 900.0
_OUTPUT_TAIL = 2000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BuildError(RuntimeError):
    """The code cannot be prepared; the message is the reason a user should read."""


@dataclass(frozen=True, slots=True)
class PreparedCode:
    directory: Path
    built: bool = False


def prepare_code(runtime: str | None, code_dir: Path, *, environ: Mapping[str, str] | None = None) -> PreparedCode:
    """Return the directory an environment should run for ``code_dir``; build it first if needed.

    Blocking (it may run a compiler): call it from a worker thread. ``environ`` (default ``os.environ``)
    gives ``PATH`` for finding toolchains and ``LAMBDALET_CACHE``.
    """
    env = dict(os.environ if environ is None else environ)
    if not code_dir.is_dir():
        raise BuildError(f"code directory {code_dir} does not exist")
    kind = build_kind(runtime, code_dir)
    if kind is None:
        return PreparedCode(code_dir)
    target = cache_root(env) / "builds" / content_hash(runtime or "", code_dir)
    if (target / ".lambdalet-built").is_file():
        return PreparedCode(target, built=True)
    _check_toolchain(kind, env)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=target.parent) as scratch:
        work, out = Path(scratch) / "src", Path(scratch) / "out"
        shutil.copytree(code_dir, work, ignore=shutil.ignore_patterns(*_IGNORED), symlinks=True)
        out.mkdir()
        if kind == "go":
            _build_go(work, out, env)
        elif kind == "maven":
            _build_maven(work, out, env)
        else:
            _build_javac(work, out, env)
        (out / ".lambdalet-built").write_text(f"{runtime} {kind} builder {BUILDER_VERSION}\n")
        try:
            out.rename(target)
        except OSError:
            # Another build of the same content finished first; its result is as good as ours.
            if not (target / ".lambdalet-built").is_file():
                raise
    return PreparedCode(target, built=True)


def build_kind(runtime: str | None, code_dir: Path) -> str | None:
    """``go``, ``maven``, ``javac``, or None when the directory runs as is."""
    if runtime in GO_RUNTIMES:
        if (code_dir / "go.mod").is_file() and not (code_dir / "bootstrap").exists():
            return "go"
        return None
    if runtime in JAVA_RUNTIMES:
        if (code_dir / "pom.xml").is_file():
            return "maven"
        if any(_sources(code_dir, ".java")):
            return "javac"
    return None


def _check_toolchain(kind: str, env: Mapping[str, str]) -> None:
    """Fail before copying anything when the build cannot run at all."""
    if kind == "go":
        _tool("go", env, "a Go function (provided runtime with go.mod)")
    elif kind == "javac":
        _tool("javac", env, "a Java function (a JDK)")
    elif shutil.which("mvn", path=env.get("PATH")) is None and shutil.which("javac", path=env.get("PATH")) is None:
        raise BuildError(
            "a Java function with a pom.xml needs `mvn` on PATH to build (or `javac`), and neither is installed"
        )


def cache_root(environ: Mapping[str, str]) -> Path:
    configured = environ.get("LAMBDALET_CACHE")
    if configured:
        return Path(configured)
    return Path(environ.get("HOME") or Path.home()) / ".cache" / "lambdalet"


def content_hash(runtime: str, code_dir: Path) -> str:
    """A digest of the runtime, the builder version and every source file's path and bytes."""
    digest = hashlib.sha256(f"{BUILDER_VERSION}\0{runtime}\0".encode())
    for path in sorted(_files(code_dir)):
        relative = path.relative_to(code_dir).as_posix()
        digest.update(relative.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link\0" + str(path.readlink()).encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
            digest.update(b"x" if os.access(path, os.X_OK) else b"-")
    return digest.hexdigest()[:32]


def _files(root: Path) -> Iterator[Path]:
    for directory, folders, files in os.walk(root):
        folders[:] = [name for name in folders if name not in _IGNORED]
        for name in files:
            yield Path(directory) / name


def _sources(root: Path, suffix: str) -> Iterator[Path]:
    return (path for path in _files(root) if path.suffix == suffix)


def _tool(name: str, env: Mapping[str, str], needed_for: str) -> str:
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise BuildError(f"{needed_for} needs `{name}` on PATH to build, and it is not installed")
    return found


def _run(command: list[str], cwd: Path, env: Mapping[str, str], what: str) -> None:
    try:
        done = subprocess.run(
            command, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=_BUILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what} did not finish within {_BUILD_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        output = _ANSI.sub("", done.stderr + done.stdout).strip()[-_OUTPUT_TAIL:]
        raise BuildError(f"{what} failed (exit status {done.returncode}):\n{output}")


def _copy_resources(work: Path, out: Path, skip_suffixes: frozenset[str], skip_names: frozenset[str]) -> None:
    """Every file that is not source code goes along, as it would in the deployment package."""
    for path in _files(work):
        if path.suffix in skip_suffixes or path.name in skip_names:
            continue
        destination = out / path.relative_to(work)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination, follow_symlinks=False)


def _build_go(work: Path, out: Path, env: Mapping[str, str]) -> None:
    go = _tool("go", env, "a Go function (provided runtime with go.mod)")
    if not any("package main" in path.read_text(errors="replace") for path in work.glob("*.go")):
        raise BuildError("go.mod is there but the code directory has no `package main` to build into a bootstrap")
    build_env = {**env, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    _run(
        [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "bootstrap"), "."], work, build_env, "go build"
    )
    _copy_resources(work, out, frozenset({".go"}), frozenset({"go.mod", "go.sum"}))


def _build_maven(work: Path, out: Path, env: Mapping[str, str]) -> None:
    if shutil.which("mvn", path=env.get("PATH")) is None and any(_sources(work, ".java")):
        # No Maven, but plain sources: javac can still build a function that only needs aws-lambda-java-core.
        _build_javac(work, out, env)
        return
    mvn = _tool("mvn", env, "a Java function with a pom.xml")
    _run(
        [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-DskipTests",
            "package",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            "-DoutputDirectory=target/lambda-lib",
        ],
        work,
        env,
        "mvn package",
    )
    classes = work / "target" / "classes"
    if not classes.is_dir():
        raise BuildError("mvn package produced no target/classes: is the pom.xml's packaging `jar`?")
    shutil.copytree(classes, out, dirs_exist_ok=True)
    libs = work / "target" / "lambda-lib"
    if libs.is_dir() and any(libs.iterdir()):
        shutil.copytree(libs, out / "lib", dirs_exist_ok=True)


def _build_javac(work: Path, out: Path, env: Mapping[str, str]) -> None:
    javac = _tool("javac", env, "a Java function (a JDK)")
    classpath = [str(jar) for jar in sorted((work / "lib").glob("*.jar"))]
    classpath += [str(jar) for jar in sorted(_java_core_jars(env))]
    sources = sorted(str(path) for path in _sources(work, ".java"))
    _run(
        [javac, "-encoding", "UTF-8", "-d", str(out), "-cp", os.pathsep.join(classpath), *sources],
        work,
        env,
        "javac",
    )
    # Resources beside the sources (src/main/resources in a Maven layout) sit at the classpath root.
    resources = work / "src" / "main" / "resources"
    if resources.is_dir():
        shutil.copytree(resources, out, dirs_exist_ok=True)
    if (work / "lib").is_dir():
        shutil.copytree(work / "lib", out / "lib", dirs_exist_ok=True)


def _java_core_jars(env: Mapping[str, str]) -> list[Path]:
    """``aws-lambda-java-core`` (RequestHandler, Context): from the Java runtime client's jars."""
    runtimes = Path(env.get("LAMBDALET_RUNTIMES_DIR") or Path(__file__).resolve().parent.parent / "runtime-images")
    fetch = runtimes / "java" / "fetch-ric.sh"
    if not fetch.is_file():
        raise BuildError(f"cannot find {fetch} to fetch aws-lambda-java-core for javac")
    done = subprocess.run(
        ["bash", str(fetch)], env=dict(env), capture_output=True, text=True, timeout=_BUILD_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"fetching aws-lambda-java-core failed:\n{done.stderr.strip()[-_OUTPUT_TAIL:]}")
    folder = Path(done.stdout.strip())
    jars = list(folder.glob("aws-lambda-java-core-*.jar"))
    if not jars:
        raise BuildError(f"no aws-lambda-java-core jar in {folder}")
    return jars
