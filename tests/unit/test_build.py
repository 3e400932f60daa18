"""Preparing code before an environment starts (lambdalet.build): which code is built, the content-hash
cache, and the reasons given when a toolchain is missing or a build fails. Toolchains are stand-in
scripts on an injected PATH; real Go and Java builds run in the integration runtime suite."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lambdalet.build import BuildError, build_kind, content_hash, prepare_code

FAKE_GO = """#!/bin/sh
# A stand-in for `go build -trimpath -ldflags ... -o OUT .`: records the call, writes OUT.
echo "$@" >> "{log}"
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then shift; printf '#!/bin/sh\\necho built\\n' > "$1"; chmod +x "$1"; fi
  shift
done
"""
FAILING_GO = """#!/bin/sh
echo "./main.go:3:1: syntax error: non-declaration statement outside function body" >&2
exit 1
"""


def _tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _go_code(root: Path) -> Path:
    code = root / "code"
    code.mkdir()
    (code / "go.mod").write_text("module example.com/hello\n\ngo 1.22\n")
    (code / "main.go").write_text("package main\n\nfunc main() {}\n")
    (code / "config.json").write_text('{"greeting": "hi"}\n')
    return code


def _env(tmp_path: Path, bin_dir: Path) -> dict[str, str]:
    return {"PATH": str(bin_dir), "LAMBDALET_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}


def test_interpreted_code_runs_as_is(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("def handler(e, c): return 1\n")
    for runtime in ("python3.12", "nodejs20.x", "ruby3.3", None):
        prepared = prepare_code(runtime, tmp_path, environ=_env(tmp_path, tmp_path / "bin"))
        assert prepared.directory == tmp_path
        assert not prepared.built


def test_missing_code_directory(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        prepare_code("python3.12", tmp_path / "nope")


def test_which_code_is_built(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    assert build_kind("provided.al2023", code) == "go"
    assert build_kind("provided.al2", code) == "go"
    assert build_kind("python3.12", code) is None
    (code / "bootstrap").write_text("#!/bin/sh\n")
    assert build_kind("provided.al2023", code) is None, "a ready bootstrap runs as is"
    java = tmp_path / "java"
    (java / "src" / "main" / "java" / "example").mkdir(parents=True)
    assert build_kind("java17", java) is None, "no sources: classes run as is"
    (java / "src" / "main" / "java" / "example" / "App.java").write_text("package example; class App {}\n")
    assert build_kind("java21", java) == "javac"
    (java / "pom.xml").write_text("<project/>\n")
    assert build_kind("java17", java) == "maven"


def test_go_is_built_into_bootstrap_and_cached(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    log = tmp_path / "go-calls.log"
    _tool(tmp_path / "bin", "go", FAKE_GO.format(log=log))
    env = _env(tmp_path, tmp_path / "bin")

    prepared = prepare_code("provided.al2023", code, environ=env)
    assert prepared.built
    assert prepared.directory.parent == tmp_path / "cache" / "builds"
    assert (prepared.directory / "bootstrap").read_text() == "#!/bin/sh\necho built\n"
    assert (prepared.directory / "config.json").is_file(), "non-source files travel with the binary"
    assert not (prepared.directory / "main.go").exists()
    assert not (code / "bootstrap").exists(), "the user's directory is never written to"

    again = prepare_code("provided.al2023", code, environ=env)
    assert again.directory == prepared.directory
    assert len(log.read_text().splitlines()) == 1, "the second call is a cache hit"

    (code / "main.go").write_text("package main\n\nfunc main() { println(1) }\n")
    changed = prepare_code("provided.al2023", code, environ=env)
    assert changed.directory != prepared.directory
    assert len(log.read_text().splitlines()) == 2


def test_missing_go_toolchain_says_so(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    with pytest.raises(BuildError, match=r"needs `go` on PATH"):
        prepare_code("provided.al2023", code, environ=_env(tmp_path, tmp_path / "empty-bin"))


def test_missing_jdk_says_so(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "App.java").write_text("class App {}\n")
    with pytest.raises(BuildError, match=r"needs `javac` on PATH"):
        prepare_code("java17", code, environ=_env(tmp_path, tmp_path / "empty-bin"))
    (code / "pom.xml").write_text("<project/>\n")
    with pytest.raises(BuildError, match=r"needs `mvn` on PATH"):
        prepare_code("java17", code, environ=_env(tmp_path, tmp_path / "empty-bin"))


def test_failed_build_reports_the_compiler_output(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    _tool(tmp_path / "bin", "go", FAILING_GO)
    with pytest.raises(BuildError, match="go build failed") as failure:
        prepare_code("provided.al2023", code, environ=_env(tmp_path, tmp_path / "bin"))
    assert "syntax error: non-declaration statement" in str(failure.value)
    assert not list((tmp_path / "cache" / "builds").iterdir()), "nothing half-built is left in the cache"


def test_go_module_without_main_package(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    (code / "main.go").write_text("package hello\n")
    _tool(tmp_path / "bin", "go", FAKE_GO.format(log=tmp_path / "log"))
    with pytest.raises(BuildError, match="no `package main`"):
        prepare_code("provided.al2023", code, environ=_env(tmp_path, tmp_path / "bin"))


def test_content_hash_follows_sources_only(tmp_path: Path) -> None:
    code = _go_code(tmp_path)
    first = content_hash("provided.al2023", code)
    assert content_hash("provided.al2023", code) == first
    assert content_hash("provided.al2", code) != first, "the runtime is part of the key"
    (code / "target").mkdir()
    (code / "target" / "output.bin").write_bytes(b"\0" * 10)
    (code / ".git").mkdir()
    (code / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert content_hash("provided.al2023", code) == first, "build output and VCS state are not sources"
    (code / "config.json").write_text('{"greeting": "hello"}\n')
    assert content_hash("provided.al2023", code) != first
