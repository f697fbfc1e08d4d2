"""The per-server settings store (`bot.guild_config`): a real SQLite file through aiosqlite.

Created on first open with its schema version; migrated from an older version table; refused
when newer than the code; read once into a cache; every change written before the cache says so,
and still there when the file is opened again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.guild_config import (
    SCHEMA_VERSION,
    Choices,
    DatabaseError,
    GuildConfig,
    GuildConfigStore,
    InvalidSetting,
    check_name,
    parse,
)
from config import Settings

GUILD = 111
OTHER_GUILD = 222


def rows(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(query).fetchall()


async def test_the_file_is_created_on_first_open_with_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "data" / "servers.sqlite3"  # its directory does not exist either
    store = await GuildConfigStore.open(path)
    try:
        assert path.is_file()
        assert rows(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        assert store.get(GUILD) == GuildConfig()  # nothing set: the bot's settings apply
        assert store.get(None) == GuildConfig()  # a DM
    finally:
        await store.close()


async def test_settings_survive_reopening_and_reset_removes_them(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    store = await GuildConfigStore.open(path)
    await store.set(GUILD, "channels", frozenset({5, 6}))
    await store.set(GUILD, "cooldown", 2.5)
    await store.set(GUILD, "max_images", 7)
    await store.set(GUILD, "classifier", "resnet18")
    await store.set(OTHER_GUILD, "channels", frozenset())  # all
    await store.set(OTHER_GUILD, "cooldown", 4.0)
    await store.set(OTHER_GUILD, "cooldown", None)  # back to the bot's
    await store.close()

    reopened = await GuildConfigStore.open(path)
    try:
        assert reopened.get(GUILD) == GuildConfig(frozenset({5, 6}), 2.5, 7, "resnet18")
        assert reopened.get(OTHER_GUILD) == GuildConfig(channels=frozenset())
        assert rows(path, "SELECT name, value FROM guild_setting WHERE guild_id = 222") == [("channels", "all")]
    finally:
        await reopened.close()


async def test_the_cache_answers_without_reading_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    store = await GuildConfigStore.open(path)
    try:
        await store.set(GUILD, "max_images", 2)
        # Changed behind the store's back: the store answers from what it read and wrote.
        with sqlite3.connect(path) as connection:
            connection.execute("UPDATE guild_setting SET value = '9'")
        assert store.get(GUILD).max_images == 2
    finally:
        await store.close()


async def test_a_file_with_an_older_version_table_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    with sqlite3.connect(path) as connection:  # what a bot of schema version 0 left: the table only
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (0)")
        connection.execute("CREATE TABLE notes (text TEXT)")
        connection.execute("INSERT INTO notes VALUES ('kept')")
    store = await GuildConfigStore.open(path)
    try:
        assert rows(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        assert rows(path, "SELECT text FROM notes") == [("kept",)]
        await store.set(GUILD, "cooldown", 3.0)
        assert rows(path, "SELECT guild_id, name, value FROM guild_setting") == [(GUILD, "cooldown", "3.0")]
    finally:
        await store.close()


async def test_a_file_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(DatabaseError, match="schema version"):
        await GuildConfigStore.open(path)


async def test_a_row_edited_by_hand_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    store = await GuildConfigStore.open(path)
    await store.set(GUILD, "max_images", 4)
    await store.close()
    with sqlite3.connect(path) as connection:
        connection.execute("INSERT INTO guild_setting VALUES (?, 'cooldown', 'soon')", (GUILD,))
        connection.execute("INSERT INTO guild_setting VALUES (?, 'colour', 'blue')", (GUILD,))
    reopened = await GuildConfigStore.open(path)
    try:
        assert reopened.get(GUILD) == GuildConfig(max_images=4)
    finally:
        await reopened.close()


def test_the_servers_settings_apply_over_the_bots() -> None:
    settings = Settings(allowed_channels=frozenset({1}), heavy_command_cooldown_s=10, max_images_per_message=3)
    assert GuildConfig().resolve(settings).allowed_channels == frozenset({1})
    applied = GuildConfig(channels=frozenset(), cooldown=0.0, max_images=8, classifier="x").resolve(settings)
    assert applied.allowed_channels == frozenset()  # `all`, whatever the bot's setting
    assert (applied.heavy_command_cooldown_s, applied.max_images_per_message, applied.classifier) == (0.0, 8, "x")


def test_values_are_checked_with_one_line_saying_why() -> None:
    choices = Choices(channel_ids=frozenset({10, 20}), classifiers=("efficientnet_lite0",))
    assert parse("channels", "<#10>, 20", choices) == frozenset({10, 20})
    assert parse("channels", "ALL", choices) == frozenset()
    assert parse("cooldown", "2.5s", choices) == 2.5
    assert parse("max_images", "10", choices) == 10
    assert parse("classifier", "efficientnet_lite0", choices) == "efficientnet_lite0"
    assert check_name("Max-Images") == "max_images"
    for name, raw, message in [
        ("channels", "<#30>", "Unknown channel 30"),
        ("channels", "#general", "channel mentions or ids"),
        ("cooldown", "nan", "from 0 to 3600"),
        ("cooldown", "-1", "from 0 to 3600"),
        ("max_images", "11", "from 1 to 10"),
        ("max_images", "2.5", "from 1 to 10"),
        ("classifier", "resnet18", "Unknown classifier `resnet18`"),
    ]:
        with pytest.raises(InvalidSetting, match=message):
            parse(name, raw, choices)
    with pytest.raises(InvalidSetting, match="Unknown setting `colour`"):
        check_name("colour")


def test_the_database_lives_in_the_bots_data_directory_unless_named(tmp_path: Path) -> None:
    assert Settings(bot_data_dir=tmp_path).database_file == tmp_path / "servers.sqlite3"
    moved = Settings(bot_data_dir=Path("/first")).replace(bot_data_dir=tmp_path)
    assert moved.database_file == tmp_path / "servers.sqlite3"  # follows the data directory
    named = Settings.from_env({"DATABASE_PATH": str(tmp_path / "x.db"), "BOT_DATA_DIR": "/elsewhere"}, env_file=None)
    assert named.database_file == tmp_path / "x.db"
