"""pip builds the C module from the project's own files, and a machine that cannot build it
still gets a cellvpn that works: a wheel built with no compiler is pure, installs, chooses the
Python loops (saying why) and passes the stream and frame tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wheel(out: Path, **env: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, env={**os.environ, **env}, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("*.whl")
    return built


def native_files(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return [n for n in z.namelist() if n.startswith("cellvpn/native/_fastpath.")]


def test_the_wheel_carries_the_module_built_from_the_sources(tmp_path: Path) -> None:
    whl = wheel(tmp_path)
    assert "-cp3" in whl.name and "linux" in whl.name  # a platform wheel
    assert [n for n in native_files(whl) if n.endswith(".so")], native_files(whl)


def test_a_machine_without_a_compiler_gets_a_working_pure_python_cellvpn(tmp_path: Path) -> None:
    whl = wheel(tmp_path / "wheel", CC="false")  # a compiler that always fails
    assert whl.name.endswith("-py3-none-any.whl")
    assert native_files(whl) == ["cellvpn/native/_fastpath.c"]
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(whl)],
        check=True, capture_output=True,
    )  # fmt: skip
    # the tests run from a copy, so that nothing is imported from the source tree
    work = tmp_path / "work"
    tests = work / "tests"
    shutil.copytree(
        ROOT / "tests", tests, ignore=shutil.ignore_patterns("integration", "fuzz", "native")
    )
    shutil.copy(ROOT / "pyproject.toml", work)
    (tests / "test_pure_install.py").write_text(
        "import pytest\n"
        "from cellvpn import native\n"
        "def test_it_runs_the_installed_pure_wheel():\n"
        f"    assert native.__file__.startswith({str(site)!r})\n"
        "    fast = native.load('auto')\n"
        "    assert not fast.native and 'not built' in fast.why\n"
        "    with pytest.raises(native.FastPathUnavailableError, match='cannot be loaded'):\n"
        "        native.load('on')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("CELLVPN_FASTPATH", None)
    env.pop("CELLVPN_REQUIRE_NETNS", None)  # the stream tests' C runs skip there, as they should
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/stream",
         "tests/wire/test_frame_reader.py", "tests/wire/test_golden.py",
         "tests/test_pure_install.py"],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
    assert "needs the C fast path module, which was not built" in done.stdout  # and says so
