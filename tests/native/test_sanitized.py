"""The short run of ``make fuzz-native``: the C loops and the module, built with ASan and
UBSan, each fed 20,000 random inputs (the long run feeds a million)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import require_command

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "cellvpn" / "native"
SANITIZE = [
    "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
]  # fmt: skip
INPUTS = "20000"


def test_the_c_loops_under_the_sanitizers(tmp_path: Path) -> None:
    gcc = require_command("gcc", "gcc")
    driver = tmp_path / "fuzz_frames"
    subprocess.run([gcc, *SANITIZE, str(NATIVE / "fuzz_frames.c"), "-o", str(driver)], check=True)
    done = subprocess.run([str(driver), INPUTS, "11"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "20000 inputs" in done.stdout and "0 findings" in done.stdout
    assert "pump 5000 with" in done.stdout


def test_the_module_under_the_sanitizers(tmp_path: Path) -> None:
    gcc = require_command("gcc", "gcc")
    module = tmp_path / "_fastpath.so"
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [gcc, *SANITIZE, "-fPIC", "-shared", f"-I{include}", str(NATIVE / "_fastpath.c"), "-o",
         str(module)],
        check=True,
    )  # fmt: skip
    runtime = [
        subprocess.run(
            [gcc, f"-print-file-name={lib}"], capture_output=True, text=True
        ).stdout.strip()
        for lib in ("libasan.so", "libubsan.so")
    ]
    env = {**os.environ, "LD_PRELOAD": " ".join(runtime), "ASAN_OPTIONS": "detect_leaks=0"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.native.sanitized", str(module), "--inputs", INPUTS,
         "--seed", "11"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "20,000 inputs" in done.stdout and "0 findings" in done.stdout
    assert "pump 5,000" in done.stdout
