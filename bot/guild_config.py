"""Per-server settings (`/config`), kept in SQLite through aiosqlite, read once and cached.

Each server may set its own `channels`, `cooldown`, `max_images` and `classifier`; what it has
not set comes from the bot's settings (`.env`).  `GuildConfig` is what a server has set (None:
not set), `ServerSettings` what applies there, every value filled in.

The file (`DATABASE_PATH`) is created on the bot's first start.  Its `schema_version` table holds
the version of the tables; `MIGRATIONS[n]` brings a file from version n to n + 1, in one
transaction with the version's update, so a later change of the tables is one more entry there.
A file newer than this code is refused rather than misread.

Settings are rows `(guild_id, name, value)`, the value as text (`encode`/`parse`): a setting
added later needs no new column, and a server that has set nothing has no row.  Every row is
read when the store opens; the bot then answers from the cache, and a change is written before
the cache is updated, so the cache never says what the file does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from config import Settings

log = logging.getLogger(__name__)

#: The settings a server may change, in the order `/config` shows them.
SETTING_NAMES: tuple[str, ...] = ("channels", "cooldown", "max_images", "classifier")
#: What each one is, for `/config` and the README.
DESCRIPTIONS: Mapping[str, str] = {
    "channels": "where the bot answers: channel mentions or ids, or `all`",
    "cooldown": "seconds between two heavy commands (zebra, style, caption) of one member",
    "max_images": "images answered per message (1–10)",
    "classifier": "the model `classify` uses",
}
#: The value that removes a server's own setting, so that the bot's setting applies again.
RESET = "default"
#: Limits of the values a server may set.
MAX_IMAGES_RANGE = (1, 10)
MAX_COOLDOWN_S = 3600.0

#: The tables of each schema version, one script per step (version n → n + 1).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE guild_setting (
            guild_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (guild_id, name)
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_CHANNEL = re.compile(r"<#(\d{1,20})>|(\d{1,20})")


class InvalidSetting(ValueError):
    """A `/config` name or value that cannot be used; `str(error)` is one line for the user."""


class DatabaseError(RuntimeError):
    """The database file cannot be used (newer than this code, or broken)."""


@dataclass(frozen=True)
class ServerSettings:
    """What applies in one server: its own settings over the bot's (same names as `Settings`)."""

    #: Channel ids the bot answers in; empty: every channel.
    allowed_channels: frozenset[int]
    heavy_command_cooldown_s: float
    max_images_per_message: int
    classifier: str


@dataclass(frozen=True)
class GuildConfig:
    """What one server has set; None: not set, the bot's setting applies."""

    #: Channel ids; empty: every channel (`all`).
    channels: frozenset[int] | None = None
    cooldown: float | None = None
    max_images: int | None = None
    classifier: str | None = None

    def resolve(self, settings: Settings) -> ServerSettings:
        def pick(own: Any, default: Any) -> Any:
            return default if own is None else own

        return ServerSettings(
            allowed_channels=pick(self.channels, settings.allowed_channels),
            heavy_command_cooldown_s=pick(self.cooldown, settings.heavy_command_cooldown_s),
            max_images_per_message=pick(self.max_images, settings.max_images_per_message),
            classifier=pick(self.classifier, settings.classifier),
        )

    def value(self, name: str) -> Any:
        return getattr(self, name)


@dataclass(frozen=True)
class Choices:
    """What a value may name in one server: its channels, the classifiers the service can load."""

    channel_ids: frozenset[int]
    classifiers: Sequence[str]


def check_name(name: str) -> str:
    known = name.strip().lower().replace("-", "_")
    if known not in SETTING_NAMES:
        raise InvalidSetting(f"Unknown setting `{name[:40]}`: use {', '.join(f'`{n}`' for n in SETTING_NAMES)}.")
    return known


def parse(name: str, raw: str, choices: Choices) -> Any:
    """A value typed by a member → the setting's value (`InvalidSetting`: one line saying why)."""
    text = raw.strip()
    if name == "channels":
        if text.lower() == "all":
            return frozenset()
        ids = frozenset(int(a or b) for a, b in _CHANNEL.findall(text))
        if not ids or _CHANNEL.sub("", text).replace(",", " ").strip():
            raise InvalidSetting("`channels` takes channel mentions or ids (#bots, 1234…), or `all`.")
        unknown = sorted(ids - choices.channel_ids)
        if unknown:
            raise InvalidSetting(f"Unknown channel {unknown[0]}: name channels of this server.")
        return ids
    if name == "cooldown":
        try:
            seconds = float(text.removesuffix("s").strip())
        except ValueError:
            seconds = math.nan
        if not 0 <= seconds <= MAX_COOLDOWN_S:  # also refuses NaN and infinities
            raise InvalidSetting(f"`cooldown` takes seconds from 0 to {MAX_COOLDOWN_S:g}, not `{text[:20]}`.")
        return seconds
    if name == "max_images":
        low, high = MAX_IMAGES_RANGE
        if not text.isdigit() or not low <= int(text) <= high:
            raise InvalidSetting(f"`max_images` takes a whole number from {low} to {high}, not `{text[:20]}`.")
        return int(text)
    if name == "classifier":
        if text not in choices.classifiers:
            raise InvalidSetting(f"Unknown classifier `{text[:60]}`: use {', '.join(f'`{c}`' for c in choices.classifiers)}.")
        return text
    raise InvalidSetting(f"Unknown setting `{name}`.")


def encode(name: str, value: Any) -> str:
    """A value as the database keeps it (`parse` reads it back)."""
    if name == "channels":
        return " ".join(str(channel) for channel in sorted(value)) or "all"
    return str(value)


def show(name: str, value: Any) -> str:
    """A value as `/config` shows it."""
    if name == "channels":
        return " ".join(f"<#{channel}>" for channel in sorted(value)) or "all channels"
    if name == "cooldown":
        return f"{value:g} s"
    if name == "classifier":
        return f"`{value}`"
    return str(value)


def _decode(name: str, text: str) -> Any:
    """A stored value: trusted to be one `parse` accepted then (channels and classifiers are
    not checked again: a deleted channel is simply never seen)."""
    if name == "channels":
        return frozenset() if text == "all" else frozenset(int(part) for part in text.split())
    return {"cooldown": float, "max_images": int, "classifier": str}[name](text)


class GuildConfigStore:
    """The servers' settings: an aiosqlite connection and the cache of every row."""

    def __init__(self, connection: aiosqlite.Connection, path: Path, configs: dict[int, GuildConfig]) -> None:
        self._connection = connection
        self.path = path
        self._configs = configs
        #: One change at a time: a write and its cache update stay in order.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> GuildConfigStore:
        """Open (creating the file and its tables, or migrating them) and read every row."""
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        # Autocommit mode: the migrations and each change run in transactions of their own.
        connection = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _migrate(connection, path)
            configs = await _read_all(connection)
        except BaseException:
            await connection.close()
            raise
        log.info("server settings: %s (%d server(s) with settings of their own)", path, len(configs))
        return cls(connection, path, configs)

    def get(self, guild_id: int | None) -> GuildConfig:
        """A server's settings, from the cache (no I/O); a DM or an unknown server: none."""
        return self._configs.get(guild_id, GuildConfig()) if guild_id is not None else GuildConfig()

    async def set(self, guild_id: int, name: str, value: Any) -> GuildConfig:
        """Set one of a server's settings (`value` None: remove it, the bot's applies again)."""
        name = check_name(name)
        async with self._lock:
            if value is None:
                await self._connection.execute(
                    "DELETE FROM guild_setting WHERE guild_id = ? AND name = ?", (guild_id, name)
                )
            else:
                await self._connection.execute(
                    "INSERT INTO guild_setting (guild_id, name, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (guild_id, name) DO UPDATE SET value = excluded.value",
                    (guild_id, name, encode(name, value)),
                )
            config = dataclasses.replace(self.get(guild_id), **{name: value})
            self._configs[guild_id] = config
        return config

    async def close(self) -> None:
        await self._connection.close()


async def schema_version(connection: aiosqlite.Connection) -> int:
    """The file's version: 0 for a new file (the version table is created then)."""
    await connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    async with connection.execute("SELECT version FROM schema_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def _migrate(connection: aiosqlite.Connection, path: Path) -> None:
    version = await schema_version(connection)
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"{path} has schema version {version}; this bot knows up to {SCHEMA_VERSION}.")
    for step in range(version, SCHEMA_VERSION):
        await connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[step]:
                await connection.execute(statement)
            await connection.execute("DELETE FROM schema_version")
            await connection.execute("INSERT INTO schema_version (version) VALUES (?)", (step + 1,))
            await connection.execute("COMMIT")
        except BaseException:
            await connection.execute("ROLLBACK")
            raise
        log.info("server settings: %s migrated to schema version %d", path, step + 1)


async def _read_all(connection: aiosqlite.Connection) -> dict[int, GuildConfig]:
    values: dict[int, dict[str, Any]] = {}
    async with connection.execute("SELECT guild_id, name, value FROM guild_setting") as cursor:
        rows: Iterable[Any] = await cursor.fetchall()
    for guild_id, name, text in rows:
        try:
            values.setdefault(int(guild_id), {})[name] = _decode(name, text)
        except (KeyError, ValueError):  # edited by hand: that one row is skipped, not the bot
            log.warning("server settings: ignoring %s=%r of guild %s", name, text, guild_id)
    return {guild_id: GuildConfig(**own) for guild_id, own in values.items()}
