"""Settings from the environment and `.env`: parsing, retired variables, values that make no sense."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Settings, SettingsError


def test_values_come_from_the_environment_over_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ZEBRA_QUEUE_SIZE=5\nCLASSIFY_QUEUE_SIZE=7\nQUEUE_TURNS=off\n")
    settings = Settings.from_env({"CLASSIFY_QUEUE_SIZE": "9"}, env_file=env_file)
    assert (settings.classify_queue_size, settings.zebra_queue_size, settings.queue_turns) == (9, 5, False)


def test_a_retired_variable_is_named_with_its_replacement(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_QUEUE_SIZE=64\n")
    with pytest.raises(SettingsError, match=r"MAX_QUEUE_SIZE is no longer read: .*CLASSIFY_QUEUE_SIZE, ZEBRA_QUEUE_SIZE"):
        Settings.from_env({}, env_file=env_file)
    assert Settings.from_env({"MAX_QUEUE_SIZE": " "}, env_file=None).classify_queue_size == 64  # empty: not set


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAX_IMAGE_ASPECT_RATIO", "0.5", "would refuse every image"),
        ("MAX_IMAGE_ASPECT_RATIO", "nan", "would refuse every image"),
        ("MAX_JPEG_SCANS", "0", "MAX_JPEG_SCANS=0 must be at least 1"),
        ("ZEBRA_QUEUE_SIZE", "0", "ZEBRA_QUEUE_SIZE=0 must be at least 1"),
        ("DECODE_MEMORY_MB", "-1", "DECODE_MEMORY_MB=-1 must be 0"),
        ("CAPTION_MAX_MEMORY_MB", "-5", "CAPTION_MAX_MEMORY_MB=-5 must be 0"),
        ("ZEBRA_MAX_MEMORY_MB", "lots", "ZEBRA_MAX_MEMORY_MB='lots' is not a valid int"),
    ],
)
def test_values_that_would_refuse_everything_are_refused_at_start(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({variable: value}, env_file=None)


def test_a_memory_ceiling_is_a_number_of_megabytes_or_auto() -> None:
    settings = Settings.from_env({"ZEBRA_MAX_MEMORY_MB": "900", "CAPTION_MAX_MEMORY_MB": "AUTO"}, env_file=None)
    assert (settings.classify_max_memory_mb, settings.zebra_max_memory_mb, settings.caption_max_memory_mb) == (None, 900, None)
    assert Settings.from_env({"CLASSIFY_MAX_MEMORY_MB": "0"}, env_file=None).classify_max_memory_mb == 0  # none


def test_an_unbounded_aspect_ratio_is_allowed() -> None:
    assert Settings.from_env({"MAX_IMAGE_ASPECT_RATIO": "inf"}, env_file=None).max_image_aspect_ratio == float("inf")


def test_the_bots_download_budget_and_shutdown_grace_are_settings() -> None:
    from bot import create_bot

    settings = Settings.from_env({"MAX_DOWNLOAD_BYTES_IN_FLIGHT": "5000000", "SHUTDOWN_GRACE_S": "2.5"}, env_file=None)
    assert (settings.max_download_bytes_in_flight, settings.shutdown_grace_s) == (5_000_000, 2.5)
    assert create_bot(settings).downloads.limit == 5_000_000


def test_shard_ids_must_be_shards_of_the_count() -> None:
    assert Settings(shard_count=4, shard_ids=frozenset({0, 3})).shard_ids == {0, 3}
    with pytest.raises(SettingsError, match="SHARD_IDS=4 must be shards of SHARD_COUNT=4"):
        Settings(shard_count=4, shard_ids=frozenset({4}))
    with pytest.raises(SettingsError, match="SHARD_COUNT=0"):
        Settings.from_env({"SHARD_IDS": "0"}, env_file=None)
