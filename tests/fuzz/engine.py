"""The long fuzz run's engine: the fuzz targets' own strategies and oracles, without
hypothesis' cost per input.

Hypothesis spends nearly all of a fuzz target's time drawing its input (0.5 ms for a
10-byte header and a packet, 25 ms for a server session's script, against 0.01 ms and
16 ms to run them), and keeps what it drew for its shrinker. This engine draws only a seed
corpus with the same strategies, then makes each new input by mutating drawn values
where they lie in the structure: the bytes of a packet body (flips, inserts, cuts,
splices with the bytes found at the same place in other inputs), an integer within the
range seen at its place, a list's items dropped, repeated, swapped or taken from another
input, any value swapped for one drawn at the same place. So a mutant has the shape the
target expects (a step is still a step, a 10-byte header stays 10 bytes) and its bytes
are hostile. A small share of the time still goes to fresh draws, so the corpus does not
narrow.

It is coverage-guided on a sample: an input run under ``sys.settrace`` (cellvpn's own
code only) that reaches a new edge between two lines joins the corpus. Tracing costs
several times the run, so after a warm-up only as many inputs are traced as keep the
overhead near a quarter (on Python 3.11 there is no cheaper hook).

The oracle is the target's own body: it raises for an exception that left a handler, a
traceback in the log or a broken invariant. Each such input counts as an unexpected
exception; the first of each kind is saved (pickled input and traceback) for replay with
``--replay``. Tallies (inputs, exceptions, pace, corpus, edges) are printed per target as
it ends, written as JSON to ``--tally`` as the run goes, and printed for all targets on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import strategies as st
from hypothesis.control import BuildContext
from hypothesis.errors import UnsatisfiedAssumption
from hypothesis.internal.conjecture.data import ConjectureData

#: Fast targets first, so that the most targets finish when a run is stopped early.
MODULES = (
    "tests.fuzz.test_offload",
    "tests.fuzz.test_decoders",
    "tests.fuzz.test_stream",
    "tests.fuzz.test_client_stream",
    "tests.fuzz.test_server_session",
)
CELLVPN = str(Path(__file__).resolve().parents[2] / "cellvpn") + os.sep
#: values kept per place in the structure, to mutate towards
POOL = 48
CORPUS = 4096
#: share of the time that may go to fresh hypothesis draws, and to tracing
DRAW_SHARE = 0.1
TRACE_SHARE = 0.25
INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 2**31, 2**32 - 1)

Path_ = tuple[Any, ...]


def _shape_key(value: Any) -> type:
    return memoryview if isinstance(value, memoryview) else type(value)


class Shape:
    """What the seeds look like at each place: the values drawn there (by type), and the
    range of integers and of lengths seen; mutants stay inside it."""

    def __init__(self) -> None:
        self.pools: dict[tuple[Path_, type], list[Any]] = {}
        self.bounds: dict[tuple[Path_, type], list[int]] = {}

    def learn(self, value: Any, path: Path_ = ()) -> None:
        kind = _shape_key(value)
        key = (path, kind)
        pool = self.pools.setdefault(key, [])
        if len(pool) < POOL:
            pool.append(value)
        else:
            pool[random.randrange(POOL)] = value
        measure: int | None = None
        if kind in (bytes, bytearray, memoryview, list):
            measure = len(value)
        elif kind is int:
            measure = value
        if measure is not None:
            b = self.bounds.get(key)
            if b is None:
                self.bounds[key] = [measure, measure]
            else:
                b[0], b[1] = min(b[0], measure), max(b[1], measure)
        if kind is dict:
            for k, v in value.items():
                self.learn(v, (*path, k))
        elif kind is tuple:
            tag = _tag(value)
            for i, v in enumerate(value):
                self.learn(v, (*path, (tag, i)))
        elif kind is list:
            for v in value:
                self.learn(v, (*path, "*"))


def _tag(value: tuple[Any, ...]) -> str | None:
    """A tuple that starts with a string is a tagged step (``("send", ...)``): its other
    items are told apart by the tag, since each tag has its own layout."""
    return value[0] if value and isinstance(value[0], str) else None


class Mutator:
    """Structure-aware mutation of drawn values, inside what ``Shape`` learned."""

    def __init__(self, shape: Shape, rnd: random.Random) -> None:
        self.shape = shape
        self.rnd = rnd

    def pick(self, path: Path_, value: Any) -> Any:
        pool = self.shape.pools.get((path, _shape_key(value)))
        return self.rnd.choice(pool) if pool else value

    def mutate(self, value: Any, path: Path_ = ()) -> Any:
        rnd = self.rnd
        kind = _shape_key(value)
        if kind is dict:
            key = rnd.choice(list(value))
            out = dict(value)
            out[key] = self.mutate(value[key], (*path, key))
            return out
        if kind is tuple:
            tag = _tag(value)
            places = range(1 if tag is not None else 0, len(value))
            if not places or rnd.random() < 0.1:
                return self.pick(path, value)
            i = rnd.choice(places)
            items = list(value)
            items[i] = self.mutate(value[i], (*path, (tag, i)))
            return tuple(items)
        if kind is list:
            return self._list(value, path)
        if kind in (bytes, bytearray, memoryview):
            data = self._bytes(bytes(value), path, kind)
            if kind is memoryview:
                return memoryview(b"\0" + data)[1:]
            return bytearray(data) if kind is bytearray else data
        if kind is bool:
            return not value if rnd.random() < 0.5 else self.pick(path, value)
        if kind is int:
            return self._int(value, path)
        return self.pick(path, value)

    def _int(self, value: int, path: Path_) -> int:
        rnd = self.rnd
        lo, hi = self.shape.bounds.get((path, int), (value, value))
        how = rnd.randrange(6)
        if how == 0 or lo == hi:
            return int(self.pick(path, value))
        if how == 1:
            new = value + rnd.choice((-1, 1)) * rnd.randint(1, 16)
        elif how == 2:
            new = rnd.choice((lo, hi))
        elif how == 3:
            new = rnd.choice(INTERESTING)
        elif how == 4:
            new = value ^ (1 << rnd.randrange(max(1, hi.bit_length())))
        else:
            new = rnd.randint(lo, hi)
        return min(max(new, lo), hi)

    def _list(self, value: list[Any], path: Path_) -> list[Any]:
        rnd = self.rnd
        lo, hi = self.shape.bounds.get((path, list), (len(value), len(value)))
        item_path = (*path, "*")
        out = list(value)
        how = rnd.randrange(8)
        if how == 0:
            return list(self.pick(path, value))
        if how == 1 and len(out) > lo:
            del out[rnd.randrange(len(out))]
        elif how == 2 and out and len(out) < hi:
            i = rnd.randrange(len(out))
            out.insert(i, out[i])
        elif how == 3 and len(out) < hi:
            pool = self.shape.pools.get(
                (item_path, _shape_key(out[0])) if out else (item_path, object)
            ) or [v for (p, _k), vs in self.shape.pools.items() if p == item_path for v in vs]
            if pool:
                out.insert(rnd.randrange(len(out) + 1), rnd.choice(pool))
        elif how == 4 and len(out) > 1:
            i, j = rnd.randrange(len(out)), rnd.randrange(len(out))
            out[i], out[j] = out[j], out[i]
        elif out:
            i = rnd.randrange(len(out))
            out[i] = self.mutate(out[i], item_path)
        return out

    def _bytes(self, data: bytes, path: Path_, kind: type) -> bytes:
        rnd = self.rnd
        lo, hi = self.shape.bounds.get((path, kind), (len(data), len(data)))
        out = bytearray(data)
        how = rnd.randrange(10)
        n = len(out)
        if how == 0:
            return bytes(self.pick(path, data))
        if how == 1 and n:
            out[rnd.randrange(n)] ^= 1 << rnd.randrange(8)
        elif how == 2 and n:
            out[rnd.randrange(n)] = rnd.choice((0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)))
        elif how == 3 and n >= 2:
            at = rnd.randrange(n - 1)
            width = 4 if n - at >= 4 and rnd.random() < 0.5 else 2
            v = rnd.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            out[at : at + width] = v.to_bytes(width, rnd.choice(("big", "little")))
        elif how == 4:
            at = rnd.randrange(n + 1)
            out[at:at] = rnd.randbytes(rnd.randint(1, 8))
        elif how == 5 and n:
            at = rnd.randrange(n)
            del out[at : at + rnd.randint(1, 16)]
        elif how == 6 and n:
            at = rnd.randrange(n)
            out[at:at] = out[at : at + rnd.randint(1, 64)]
        elif how in (7, 8):
            other = bytes(self.pick(path, data))
            if other:
                a = rnd.randrange(len(other))
                chunk = other[a : a + rnd.randint(1, 64)]
                at = rnd.randrange(n + 1)
                if how == 7:
                    out[at : at + len(chunk)] = chunk
                else:
                    out[at:at] = chunk
        else:
            other = bytes(self.pick(path, data))
            cut = rnd.randint(0, n)
            out = out[:cut] + other[rnd.randint(0, len(other)) :]
        if len(out) > hi:
            del out[hi:]
        if len(out) < lo:
            out += bytes(lo - len(out))
        return bytes(out)


class Edges:
    """Edges between consecutive lines of cellvpn's code that an input ran through."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.seen: set[int] = set()
        self._last = 0
        self._new: set[int] = set()

    def run(self, fn: Callable[[], None]) -> int:
        """``fn()`` under the tracer; the number of edges it reached first."""
        self._new = set()
        self._last = 0
        seen, new, prefixes = self.seen, self._new, self.prefixes

        def local(frame: FrameType, event: str, arg: object) -> Any:
            if event == "line":
                here = hash((frame.f_code, frame.f_lineno))
                edge = here ^ (self._last >> 1)
                self._last = here
                if edge not in seen:
                    seen.add(edge)
                    new.add(edge)
            return local

        def called(frame: FrameType, event: str, arg: object) -> Any:
            if frame.f_code.co_filename.startswith(prefixes):
                return local
            return None

        sys.settrace(called)
        try:
            fn()
        finally:
            sys.settrace(None)
        return len(new)


@dataclass
class Tally:
    """One target's run: inputs, exceptions that got out, and how it went."""

    inputs: int = 0
    escaped: int = 0
    seconds: float = 0.0
    corpus: int = 0
    edges: int = 0
    draws: int = 0
    traced: int = 0
    #: inputs that failed only on a server scene kept from earlier inputs (``harness.Reuse``)
    after_reuse: int = 0
    done: bool = False
    findings: list[str] = field(default_factory=list)

    @property
    def pace(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


@dataclass
class Target:
    """A fuzz target: its name, the body that checks one input (its keyword arguments) and
    the strategy its arguments are drawn from."""

    name: str
    body: Callable[..., None]
    strategy: st.SearchStrategy[dict[str, Any]]
    cover: tuple[str, ...] = (CELLVPN,)


def target_of(test: Any, cover: tuple[str, ...] = (CELLVPN,)) -> Target:
    """The target behind a ``@given`` test (under ``@harness.fuzz`` or not); its body is the
    test itself, without the harness' own count (``@counted``)."""
    handle = test.hypothesis
    body = handle.inner_test
    body = getattr(body, "__wrapped__", body)
    return Target(test.__name__, body, st.fixed_dictionaries(handle._given_kwargs), cover)


def discover(modules: Iterable[str] = MODULES) -> list[Target]:
    """Every fuzz target of ``modules``, in their order."""
    targets = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("test_") and hasattr(value, "hypothesis"):
                targets.append(target_of(value))
    return targets


def draw(target: Target, rnd: random.Random) -> dict[str, Any] | None:
    """One fresh input from the target's strategies (None if a filter rejected it)."""
    data = ConjectureData(random=rnd)
    try:
        with BuildContext(data, wrapped_test=target.body):
            return data.draw(target.strategy)
    except BaseException as e:
        if type(e).__module__.startswith("hypothesis"):
            return None
        raise


class Stop(Exception):
    pass


class Engine:
    """Runs targets one after another, each up to ``inputs`` inputs or ``seconds``."""

    def __init__(
        self,
        *,
        seed: int,
        findings: Path,
        tally_file: Path | None = None,
        out: Any = None,
        trace: float | None = None,
    ) -> None:
        self.rnd = random.Random(seed)
        self.seed = seed
        self.findings = findings
        self.tally_file = tally_file
        self.out = out or sys.stdout
        self.tallies: dict[str, Tally] = {}
        self.stopping = False
        #: a fixed share of inputs to trace (tests); None: adapt to ``TRACE_SHARE``
        self.trace = trace
        self._written = 0.0

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(
        self, targets: list[Target], inputs: int, seconds: float | None = None
    ) -> dict[str, Tally]:
        for target in targets:
            self.tallies.setdefault(target.name, Tally())
        for target in targets:
            if self.stopping:
                break
            self.run_one(target, inputs, seconds)
            self.line(target.name, self.tallies[target.name])
        self.write_tally()
        return self.tallies

    def run_one(
        self,
        target: Target,
        inputs: int,
        seconds: float | None = None,
        *,
        until_found: bool = False,
    ) -> Tally:
        from tests.fuzz.harness import Reuse

        tally = self.tallies.setdefault(target.name, Tally())
        reuse_before = Reuse.only_after_reuse - tally.after_reuse
        rnd = self.rnd
        shape = Shape()
        mutator = Mutator(shape, rnd)
        edges = Edges(target.cover)
        corpus: list[dict[str, Any]] = []
        recent: list[dict[str, Any]] = []
        start = time.perf_counter()
        draw_time = 0.0
        traced_time = plain_time = 0.0
        traced_n = plain_n = 0
        share = 0.5 if self.trace is None else self.trace  # until both paces are known
        seen_kinds: set[tuple[str, str]] = set()

        def one(kwargs: dict[str, Any], trace: bool) -> int:
            nonlocal traced_time, plain_time, traced_n, plain_n
            t0 = time.perf_counter()
            new = 0
            try:
                if trace:
                    new = edges.run(lambda: target.body(**kwargs))
                else:
                    target.body(**kwargs)
            except UnsatisfiedAssumption:
                pass
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:
                tally.escaped += 1
                self.finding(target, kwargs, e, seen_kinds, tally)
            took = time.perf_counter() - t0
            if trace:
                traced_time += took
                traced_n += 1
            else:
                plain_time += took
                plain_n += 1
            tally.inputs += 1
            return new

        while tally.inputs < inputs and not self.stopping:
            if until_found and tally.escaped:
                break
            elapsed = time.perf_counter() - start
            if seconds is not None and elapsed >= seconds:
                break
            fresh = not corpus or draw_time < DRAW_SHARE * elapsed
            if fresh:
                t0 = time.perf_counter()
                kwargs = draw(target, rnd)
                draw_time += time.perf_counter() - t0
                tally.draws += 1
                if kwargs is None:
                    continue
                shape.learn(kwargs)
            else:
                parent = rnd.choice(recent) if recent and rnd.random() < 0.5 else None
                kwargs = parent or rnd.choice(corpus)
                for _ in range(1 + min(int(rnd.expovariate(1.0)), 4)):
                    kwargs = mutator.mutate(kwargs)
            trace = fresh or rnd.random() < share
            new = one(kwargs, trace)
            if fresh or new:
                if len(corpus) >= CORPUS:
                    corpus[rnd.randrange(CORPUS)] = kwargs
                else:
                    corpus.append(kwargs)
                if new and not fresh:
                    recent.append(kwargs)
                    del recent[:-64]
            if self.trace is None and min(traced_n, plain_n) >= 20 and tally.inputs % 100 == 0:
                cost = traced_time / traced_n - plain_time / plain_n
                plain = plain_time / plain_n
                share = 1.0 if cost <= 0 else min(1.0, max(0.01, TRACE_SHARE * plain / cost))
            if tally.inputs % 256 == 0:
                tally.after_reuse = Reuse.only_after_reuse - reuse_before
                tally.seconds = time.perf_counter() - start
                tally.corpus, tally.edges, tally.traced = len(corpus), len(edges.seen), traced_n
                self.maybe_write()
        tally.after_reuse = Reuse.only_after_reuse - reuse_before
        tally.seconds = time.perf_counter() - start
        tally.corpus, tally.edges, tally.traced = len(corpus), len(edges.seen), traced_n
        tally.done = tally.inputs >= inputs
        return tally

    def finding(
        self,
        target: Target,
        kwargs: dict[str, Any],
        error: BaseException,
        seen: set[tuple[str, str]],
        tally: Tally,
    ) -> None:
        """Keep the first input of each kind of failure (exception type and where it rose)."""
        tb = traceback.extract_tb(error.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        kind = (type(error).__name__, where)
        if kind in seen:
            return
        seen.add(kind)
        self.findings.mkdir(parents=True, exist_ok=True)
        stem = self.findings / f"{target.name}-{len(tally.findings)}"
        text = "".join(traceback.format_exception(error))
        stem.with_suffix(".txt").write_text(f"{target.name}\n{kwargs!r}\n\n{text}")
        try:
            stem.with_suffix(".pickle").write_bytes(pickle.dumps((target.name, _plain(kwargs))))
        except Exception as e:  # an input that does not pickle still has its repr above
            stem.with_suffix(".pickle").write_text(f"not pickled: {e}")
        tally.findings.append(str(stem))
        print(
            f"{target.name}: {type(error).__name__} at {where}, input in {stem}.txt",
            file=self.out,
            flush=True,
        )

    def maybe_write(self) -> None:
        now = time.monotonic()
        if now - self._written >= 10:
            self._written = now
            self.write_tally()

    def write_tally(self) -> None:
        if self.tally_file is None:
            return
        data = {
            "seed": self.seed,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "targets": {
                n: {**asdict(t), "pace": round(t.pace, 1)} for n, t in self.tallies.items()
            },
        }
        tmp = self.tally_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.tally_file)

    def line(self, name: str, t: Tally) -> None:
        verdict = "FAILED" if t.escaped else ("ok" if t.done else "partial")
        print(
            f"{name:<46} {t.inputs:>11,} inputs {t.escaped:>4} exceptions {t.seconds:>9.1f} s"
            f" {t.pace:>8.0f}/s  corpus {t.corpus:>4}  edges {t.edges:>5}"
            + (f"  {t.after_reuse} only after reuse" if t.after_reuse else "")
            + f"  {verdict}",
            file=self.out,
            flush=True,
        )

    def summary(self) -> None:
        print(f"cellvpn fuzz engine (seed {self.seed})", file=self.out)
        for name, t in self.tallies.items():
            self.line(name, t)
        total = sum(t.inputs for t in self.tallies.values())
        escaped = sum(t.escaped for t in self.tallies.values())
        print(f"{'all targets':<46} {total:>11,} inputs {escaped:>4} exceptions", file=self.out)
        sys.stdout.flush()


def _plain(value: Any) -> Any:
    """``value`` with memoryviews as bytes, so that it pickles."""
    if isinstance(value, memoryview):
        return ("memoryview", bytes(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "memoryview":
        return memoryview(b"\0" + value[1])[1:]
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_unplain(v) for v in value)
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def replay(path: Path) -> None:
    """Run a saved finding again, with its traceback."""
    name, kwargs = pickle.loads(path.read_bytes())
    by_name = {t.name: t for t in discover()}
    by_name[name].body(**_unplain(kwargs))
    print(f"{name}: the saved input passes now")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.engine", description=__doc__)
    parser.add_argument("--inputs", type=lambda s: int(s.replace("_", "").replace(",", "")))
    parser.add_argument("--seconds", type=float, help="at most this long per target")
    parser.add_argument("-k", action="append", default=[], help="targets whose name has this")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tally", type=Path, help="JSON tallies, rewritten as the run goes")
    parser.add_argument("--findings", type=Path, default=Path("/tmp/cellvpn-fuzz-findings"))
    parser.add_argument(
        "--reuse", type=int, default=50, help="inputs one server scene serves (0: one each)"
    )
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--replay", type=Path, help="run one saved finding again")
    args = parser.parse_args(argv)
    if args.replay:
        replay(args.replay)
        return 0
    from tests.fuzz.harness import Reuse, examples_from_env

    Reuse.inputs = args.reuse

    inputs = args.inputs or examples_from_env()
    targets = [t for t in discover() if not args.k or any(k in t.name for k in args.k)]
    if args.list:
        for t in targets:
            print(t.name)
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    engine = Engine(seed=seed, findings=args.findings, tally_file=args.tally)
    signal.signal(signal.SIGTERM, engine.stop)
    signal.signal(signal.SIGINT, engine.stop)
    print(
        f"cellvpn fuzz engine: {len(targets)} targets, up to {inputs:,} inputs each, seed {seed}",
        flush=True,
    )
    engine.run(targets, inputs, args.seconds)
    engine.summary()
    if engine.stopping:
        print("stopped early: the counts above are those reached", flush=True)
    return 1 if any(t.escaped for t in engine.tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
