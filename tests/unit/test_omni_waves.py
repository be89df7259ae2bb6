"""The omni engine's record of vllm-omni's waves and the planning of a failed wave's retries
(`engine/omni_waves.py`): pure, no vllm-omni."""

from __future__ import annotations

import pytest

from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
    EngineRequestError,
    GenerationCancelled,
)
from vllm_omni_images.engine.omni_waves import (
    RETRY_KEY_TAG,
    ScheduledWave,
    TryOutcome,
    WaveLog,
    retry_alone,
    retry_halves,
    retry_key,
    try_outcome,
)

OOM = TryOutcome.OUT_OF_MEMORY
FAILED = TryOutcome.FAILED
ENDED = TryOutcome.ENDED


def failed_wave(request_ids: str, out_of_memory: str) -> ScheduledWave[str]:
    """A wave of one-letter ids, of which those in `out_of_memory` ran out of memory (reported
    in that order)."""
    wave: ScheduledWave[str] = ScheduledWave(tuple(request_ids), set(request_ids))
    for request_id in out_of_memory:
        wave.report(request_id, OOM, "request")
    return wave


def wave_failed_by(owners: dict[str, str]) -> ScheduledWave[str]:
    """A wave of one-letter ids (in the dict's order), each failed and owned as given."""
    wave: ScheduledWave[str] = ScheduledWave(tuple(owners), set(owners))
    for request_id in reversed(owners):  # reported in any order
        wave.report(request_id, FAILED, owners[request_id])
    return wave


def test_a_wave_holds_the_watched_requests_and_settles_with_the_last_outcome() -> None:
    settled: list[ScheduledWave[str]] = []
    log: WaveLog[str] = WaveLog(settled.append)
    for request_id in ("a", "b"):
        log.watch(request_id)
    log.record(["a", "warm-up", "b"])  # an id never watched is in the wave, not reported
    wave = log.end("a", OOM, "first")
    assert wave is not None and wave.request_ids == ("a", "warm-up", "b")
    assert not wave.report("a", OOM)  # once only
    assert settled == []
    assert log.end("b", ENDED, "second") is wave
    assert settled == [wave]
    assert wave.out_of_memory == ["a"] and wave.owners == {"a": "first", "b": "second"}
    assert len(log) == 0


def test_a_wave_with_nothing_to_retry_is_not_settled() -> None:
    settled: list[ScheduledWave[str]] = []
    log: WaveLog[str] = WaveLog(settled.append)
    log.watch("a")
    log.record(["a"])
    log.end("a", ENDED, "request")
    assert settled == []


def test_a_request_keeps_the_last_wave_it_ran_in_and_none_once_ended() -> None:
    log: WaveLog[str] = WaveLog()
    log.watch("a")
    log.record(["a"])  # step batching: a wave per step
    log.record(["a", "b"])
    wave = log.end("a", ENDED, "request")
    assert wave is not None and wave.request_ids == ("a", "b") and wave.unreported == set()
    log.record(["a"])  # scheduled after it ended (withdrawn): not watched any more
    assert log.end("a", ENDED, "request") is None
    log.watch("c")
    assert log.end("c", FAILED, "request") is None  # never scheduled


def test_a_request_that_runs_on_settles_the_wave_it_survived() -> None:
    """Step batching: `b` failed on its own in a step that `a` ran on from (vllm-omni fails a
    request whose preparation failed, alone): `a`'s next wave settles the one `b` waits on."""
    settled: list[ScheduledWave[str]] = []
    log: WaveLog[str] = WaveLog(settled.append)
    log.watch("a")
    log.watch("b")
    log.record(["a", "b"])
    wave = log.end("b", FAILED, "bad")
    assert settled == []
    log.record(["a"])
    assert settled == [wave]
    assert wave is not None and wave.failed == ["b"] and retry_alone(wave) == []
    assert log.end("a", ENDED, "good") is not wave


def test_the_out_of_memory_requests_are_retried_in_halves_in_the_waves_order() -> None:
    assert retry_halves(failed_wave("abcd", "dbca")) == [("a", "b"), ("c", "d")]
    assert retry_halves(failed_wave("abcde", "abcde")) == [("a", "b", "c"), ("d", "e")]
    assert retry_halves(failed_wave("ab", "ba")) == [("a",), ("b",)]


def test_a_wave_of_one_image_is_not_retried_and_a_lone_survivor_runs_alone() -> None:
    assert retry_halves(failed_wave("a", "a")) == []  # it did not fit, even alone
    assert retry_halves(failed_wave("abc", "b")) == [("b",)]  # a and c were withdrawn
    assert retry_halves(failed_wave("abc", "")) == []


def test_the_failed_requests_of_a_wave_are_retried_each_alone_in_the_waves_order() -> None:
    # Images a and c are one request's (n=2): they run again together, alone.
    wave = wave_failed_by({"a": "first", "b": "second", "c": "first", "d": "third"})
    assert retry_alone(wave) == [("a", "c"), ("b",), ("d",)]
    assert retry_alone(wave_failed_by({"a": "one", "b": "one"})) == []  # failed alone already
    assert retry_alone(failed_wave("ab", "ab")) == []  # out of memory: halves instead


def test_each_group_has_a_key_of_its_own() -> None:
    first, second = retry_halves(failed_wave("abcd", "abcd"))
    assert retry_key(first) != retry_key(second)
    assert retry_key(first)[0] == RETRY_KEY_TAG


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (EngineOutOfMemoryError("CUDA out of memory"), OOM),
        (EngineError("TextEncodeInput must be ..."), FAILED),
        (EngineRequestError("a guardrail refused it"), FAILED),
        (EngineDiedError("the worker died"), ENDED),
        (EngineHungError(1.0), ENDED),
        (EngineClosedError(), ENDED),
        (GenerationCancelled(), ENDED),
    ],
)
def test_only_an_error_that_may_be_one_requests_is_retried_alone(
    error: Exception, outcome: TryOutcome
) -> None:
    assert try_outcome(error) is outcome
