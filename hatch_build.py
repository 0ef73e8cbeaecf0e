"""Builds cellvpn's C fast path (``cellvpn/native/_fastpath.c``) while pip builds the wheel.

With the compiler missing or failing, the wheel is built without it and cellvpn runs its pure
Python loops (``fastpath = auto``), saying so in the log and the status: a machine without a
compiler still gets a working VPN. ``CC`` chooses the compiler, as for any extension.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("cellvpn/native/_fastpath.c")
HEADERS = [Path("cellvpn/native/frames.h")]
FLAGS = ["-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-fno-strict-aliasing"]


def module_name() -> str:
    return "_fastpath" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def compile_module(root: Path, target: Path) -> str | None:
    """Compile the module to ``target``; None when it worked, else why not."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    cmd = [*cc, *FLAGS, f"-I{include}", str(root / SOURCE), "-o", str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as e:
        return f"{cmd[0]}: {e}"
    if done.returncode != 0:
        return f"{shlex.join(cmd)} failed:\n{done.stderr.strip()}"
    return None


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds the compiled module to the wheel, or leaves the wheel pure with a warning."""

    _built: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        name = module_name()
        if version == "editable":
            # the editable install imports from the source tree: the module goes next to its
            # source (and is ignored by git)
            target = root / SOURCE.parent / name
        else:
            self._built = Path(tempfile.mkdtemp(prefix="cellvpn-native-"))
            target = self._built / name
        why = compile_module(root, target)
        if why is not None:
            print(
                f"cellvpn: the C fast path was not built, the Python one will run: {why}",
                file=sys.stderr,
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(target)] = f"{SOURCE.parent}/{name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._built is not None:
            shutil.rmtree(self._built, ignore_errors=True)
