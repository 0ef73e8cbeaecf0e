"""The long run's engine on tiny targets: it finds a planted bug behind comparisons that
random draws almost never pass, keeps mutants inside the shape of what was drawn, counts
inputs and exceptions, and prints and writes its tallies (also when stopped early)."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from . import engine

HERE = str(Path(__file__).resolve())


@given(data=st.binary(min_size=8, max_size=8), step=st.tuples(st.just("send"), st.integers(0, 9)))
def planted(data: bytes, step: tuple[str, int]) -> None:
    """A bug only four exact bytes reach: one in 2**32 for a random draw."""
    assert step[0] == "send" and 0 <= step[1] <= 9 and len(data) == 8, "a mutant out of shape"
    # one line per comparison, so that each one passed is an edge of its own
    if data[0] == 0x46:  # noqa: SIM102
        if data[1] == 0x55:  # noqa: SIM102
            if data[2] == 0x5A:  # noqa: SIM102
                if data[3] == 0x5A:
                    raise ZeroDivisionError("planted")


@given(data=st.binary(max_size=20))
def sound(data: bytes) -> None:
    """Never fails."""


def test_engine_finds_a_planted_bug_by_coverage(tmp_path: Path) -> None:
    """Each comparison passed is a new edge; the corpus keeps it and the next is a byte
    away: the bug is found in a few seconds, counted, saved and replayable."""
    out = io.StringIO()
    run = engine.Engine(seed=7, findings=tmp_path, out=out, trace=1.0)
    target = engine.target_of(planted, cover=(HERE,))
    tally = run.run_one(target, 2_000_000, seconds=60, until_found=True)
    assert tally.escaped >= 1, f"not found in {tally.inputs} inputs"
    assert tally.inputs < 2_000_000 and tally.findings
    saved = Path(tally.findings[0])
    assert "ZeroDivisionError: planted" in saved.with_suffix(".txt").read_text()
    assert "planted" in out.getvalue()
    assert "a mutant out of shape" not in out.getvalue()


def test_mutants_keep_the_shape_of_the_seeds() -> None:
    """Bytes stay within the lengths seen, integers within the range seen, tags and types
    where they were."""
    shape = engine.Shape()
    shape.learn({"d": b"abcdefgh", "s": ("send", 3), "l": [1, 2]})
    shape.learn({"d": b"12345678", "s": ("send", 9), "l": [5]})
    mutator = engine.Mutator(shape, random.Random(1))
    value = {"d": b"abcdefgh", "s": ("send", 3), "l": [1, 2]}
    for _ in range(5000):
        value = mutator.mutate(value)
        assert isinstance(value["d"], bytes) and len(value["d"]) == 8
        assert value["s"][0] == "send" and 3 <= value["s"][1] <= 9
        assert 1 <= len(value["l"]) <= 2 and all(1 <= v <= 5 for v in value["l"])


def test_engine_counts_and_prints_each_target(tmp_path: Path) -> None:
    """Inputs, exceptions and pace per target, the total, and the same in the tally file."""
    out = io.StringIO()
    tally_file = tmp_path / "tally.json"
    run = engine.Engine(seed=1, findings=tmp_path, tally_file=tally_file, out=out)
    tallies = run.run([engine.target_of(sound, cover=(HERE,))], 3000)
    run.summary()
    assert tallies["sound"].inputs == 3000 and tallies["sound"].escaped == 0
    assert tallies["sound"].done
    text = out.getvalue()
    assert "sound" in text and "3,000 inputs" in text and "0 exceptions" in text and "/s" in text
    written = json.loads(tally_file.read_text())["targets"]["sound"]
    assert written["inputs"] == 3000 and written["escaped"] == 0 and written["done"]


def test_sigterm_prints_the_counts_reached(tmp_path: Path) -> None:
    """A run stopped by SIGTERM prints each target's partial count and says it stopped."""
    tally_file = tmp_path / "tally.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fuzz.engine",
            "-k",
            "tun_read",
            "--inputs",
            "1000000000",
            "--tally",
            str(tally_file),
            "--findings",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(HERE).parents[2],
    )
    try:
        assert proc.stdout is not None
        assert "cellvpn fuzz engine" in proc.stdout.readline()
        for _ in range(100):
            if tally_file.exists():
                break
            subprocess.run(["sleep", "0.2"], check=True)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "test_tun_read_segments_or_offload_error" in out and "partial" in out
    assert "stopped early" in out
    written = json.loads(tally_file.read_text())["targets"]
    assert written["test_tun_read_segments_or_offload_error"]["inputs"] > 0
