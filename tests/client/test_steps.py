"""The steps of a start, as ``vpn_client start`` shows them."""

from __future__ import annotations

from twisted.internet.task import Clock

from cellvpn.client.steps import StartStep, StartSteps


def test_an_attempt_keeps_its_steps_with_their_times_and_a_new_one_starts_afresh() -> None:
    clock = Clock()
    steps = StartSteps(clock.seconds)
    steps.step(StartStep.TLS)  # nothing begun: nothing kept
    assert steps.describe() == [] and steps.current is None
    clock.advance(100)
    steps.begin("192.0.2.1:8089")
    clock.advance(0.002)
    steps.step(StartStep.TLS)
    steps.step(StartStep.TLS)  # a repeat is not kept
    clock.advance(0.0031)
    steps.step(StartStep.FAILED, "failed: no answer")
    assert steps.describe() == [
        {"step": "connecting", "text": "connecting to 192.0.2.1:8089 (TCP)", "after_ms": 0.0},
        {"step": "tls", "text": "TLS handshake", "after_ms": 2.0},
        {"step": "failed", "text": "failed: no answer", "after_ms": 5.1},
    ]
    assert steps.current is StartStep.FAILED and steps.attempt == 1
    steps.begin("192.0.2.1:8089")
    assert [s["step"] for s in steps.describe()] == ["connecting"] and steps.attempt == 2
