"""A worker's memory ceiling: the measured need + the decode budget + headroom, unless configured."""

from __future__ import annotations

from config import Settings
from inference.service.ceilings import HEADROOM_MIN_MB, memory_ceiling_mb
from inference.tasks import get_task

MB = 1024 * 1024
ZEBRA = get_task("zebra")


def test_the_ceiling_is_the_need_plus_the_decode_budget_plus_a_quarter() -> None:
    assert memory_ceiling_mb(ZEBRA, Settings(decode_memory_mb=256), 600 * MB) == 600 + 256 + 150


def test_a_small_need_still_gets_the_minimum_headroom() -> None:
    assert memory_ceiling_mb(ZEBRA, Settings(decode_memory_mb=32), 100 * MB) == 100 + 32 + HEADROOM_MIN_MB


def test_without_a_measured_need_or_with_unbounded_decoding_the_fixed_ceiling_applies() -> None:
    assert memory_ceiling_mb(ZEBRA, Settings(), None) == ZEBRA.fallback_memory_mb
    assert memory_ceiling_mb(ZEBRA, Settings(decode_memory_mb=0), 600 * MB) == ZEBRA.fallback_memory_mb


def test_a_configured_ceiling_is_used_as_it_is_and_zero_means_none() -> None:
    assert memory_ceiling_mb(ZEBRA, Settings(zebra_max_memory_mb=700), 600 * MB) == 700
    assert memory_ceiling_mb(ZEBRA, Settings(zebra_max_memory_mb=0), 600 * MB) == 0
    assert memory_ceiling_mb(get_task("caption"), Settings(zebra_max_memory_mb=700), 300 * MB) == 300 + 256 + 75
