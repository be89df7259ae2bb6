"""The omni engine's record of vllm-omni's waves and the planning of an out-of-memory retry
(`engine/omni_waves.py`): pure, no vllm-omni."""

from __future__ import annotations

from vllm_omni_images.engine.omni_waves import (
    RETRY_KEY_TAG,
    ScheduledWave,
    WaveLog,
    retry_halves,
    retry_key,
)


def failed_wave(request_ids: str, out_of_memory: str) -> ScheduledWave:
    """A wave of one-letter ids, of which those in `out_of_memory` ran out of memory (reported
    in that order)."""
    wave = ScheduledWave(tuple(request_ids), set(request_ids))
    for request_id in out_of_memory:
        wave.report(request_id, out_of_memory=True)
    return wave


def test_a_wave_holds_the_watched_requests_and_is_complete_with_the_last_outcome() -> None:
    log = WaveLog()
    for request_id in ("a", "b"):
        log.watch(request_id)
    log.record(["a", "warm-up", "b"])  # an id never watched is in the wave, not reported
    wave = log.forget("a")
    assert wave is not None and wave.request_ids == ("a", "warm-up", "b")
    assert not wave.report("a", out_of_memory=True)
    assert not wave.report("a", out_of_memory=True)  # once only
    assert log.forget("b") is wave
    assert wave.report("b", out_of_memory=False)
    assert wave.out_of_memory == ["a"]
    assert len(log) == 0


def test_a_request_keeps_the_last_wave_it_ran_in_and_none_once_forgotten() -> None:
    log = WaveLog()
    log.watch("a")
    log.record(["a"])  # step batching: a wave per step
    log.record(["a", "b"])
    wave = log.forget("a")
    assert wave is not None and wave.request_ids == ("a", "b") and wave.unreported == {"a"}
    log.record(["a"])  # scheduled after it was forgotten (withdrawn): not watched any more
    assert log.forget("a") is None
    log.watch("c")
    assert log.forget("c") is None  # never scheduled


def test_the_out_of_memory_requests_are_retried_in_halves_in_the_waves_order() -> None:
    assert retry_halves(failed_wave("abcd", "dbca")) == [("a", "b"), ("c", "d")]
    assert retry_halves(failed_wave("abcde", "abcde")) == [("a", "b", "c"), ("d", "e")]
    assert retry_halves(failed_wave("ab", "ba")) == [("a",), ("b",)]


def test_a_wave_of_one_image_is_not_retried_and_a_lone_survivor_runs_alone() -> None:
    assert retry_halves(failed_wave("a", "a")) == []  # it did not fit, even alone
    assert retry_halves(failed_wave("abc", "b")) == [("b",)]  # a and c were withdrawn
    assert retry_halves(failed_wave("abc", "")) == []


def test_each_half_has_a_key_of_its_own() -> None:
    first, second = retry_halves(failed_wave("abcd", "abcd"))
    assert retry_key(first) != retry_key(second)
    assert retry_key(first)[0] == RETRY_KEY_TAG
