"""SeqTracker: the receiver's seq_id check (replays dropped, gaps counted)."""

from __future__ import annotations

from cellvpn.wire.channel import SeqTracker


def test_starts_empty() -> None:
    """A new tracker has accepted nothing and counted nothing."""
    seq = SeqTracker()
    assert (seq.last, seq.replays, seq.gaps, seq.missing) == (-1, 0, 0, 0)


def test_in_order_accepted() -> None:
    """Consecutive values from 0 are all accepted with no gaps or replays."""
    seq = SeqTracker()
    assert all(seq.accept(i) for i in range(100))
    assert (seq.last, seq.replays, seq.gaps, seq.missing) == (99, 0, 0, 0)


def test_repeated_value_is_a_replay() -> None:
    """The same value twice: the second is dropped and counted as a replay."""
    seq = SeqTracker()
    assert seq.accept(0)
    assert seq.accept(1)
    assert not seq.accept(1)
    assert seq.replays == 1
    assert seq.last == 1
    assert seq.accept(2)


def test_lower_value_is_a_replay() -> None:
    """A value below the last accepted one is dropped and counted as a replay."""
    seq = SeqTracker()
    for i in range(5):
        seq.accept(i)
    assert not seq.accept(0)
    assert not seq.accept(3)
    assert seq.replays == 2
    assert seq.last == 4
    assert (seq.gaps, seq.missing) == (0, 0)


def test_gap_accepted_and_counted() -> None:
    """A value that skips ahead is accepted; the gap and the missing values are counted."""
    seq = SeqTracker()
    assert seq.accept(0)
    assert seq.accept(5)
    assert (seq.last, seq.gaps, seq.missing, seq.replays) == (5, 1, 4, 0)
    assert seq.accept(6)
    assert seq.accept(8)
    assert (seq.last, seq.gaps, seq.missing) == (8, 2, 5)


def test_late_packet_after_gap_is_a_replay() -> None:
    """A value from inside a gap that arrives late is dropped as a replay."""
    seq = SeqTracker()
    seq.accept(0)
    seq.accept(3)
    assert not seq.accept(2)
    assert (seq.replays, seq.gaps, seq.missing) == (1, 1, 2)


def test_first_value_above_zero_is_a_gap() -> None:
    """A stream whose first value is above 0 counts the values before it as missing."""
    seq = SeqTracker()
    assert seq.accept(3)
    assert (seq.last, seq.gaps, seq.missing) == (3, 1, 3)


def test_large_values() -> None:
    """Values near 2**64 are compared like any other."""
    seq = SeqTracker()
    seq.accept(2**64 - 3)
    assert seq.accept(2**64 - 2)
    assert not seq.accept(2**64 - 3)
    assert seq.accept(2**64 - 1)
    assert seq.last == 2**64 - 1
