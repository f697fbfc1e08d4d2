"""Command sync with Discord only when the commands changed since the last sync.

Syncing the global tree is rate-limited by Discord (a few hundred a day) and slow to spread,
so the bot does not do it at every start: it hashes the payloads it would send and syncs only
when the hash differs from the one recorded after the last sync (`BOT_DATA_DIR`).  New or
changed commands still appear without a manual step; the owner-only `sync` command
(`bot.cogs.admin`) forces one, for a tree changed behind the bot's back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from discord import app_commands

log = logging.getLogger(__name__)

HASH_FILE = "command-tree.sha256"


def tree_hash(tree: app_commands.CommandTree, application_id: int | None) -> str:
    """A hash of what `tree.sync()` would send for the global commands, per application (one
    data directory may serve a test bot and the real one)."""
    payloads = [command.to_dict(tree) for command in tree.get_commands()]
    payloads.sort(key=lambda payload: (payload.get("type", 1), payload["name"]))
    blob = json.dumps({"application": application_id, "commands": payloads}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _hash_path(data_dir: Path) -> Path:
    return data_dir / HASH_FILE


def last_synced(data_dir: Path) -> str | None:
    try:
        return _hash_path(data_dir).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None  # never synced, or unreadable: sync (the safe side)


def record_sync(data_dir: Path, digest: str) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = _hash_path(data_dir).with_suffix(".tmp")
        temporary.write_text(digest + "\n", encoding="ascii")
        temporary.replace(_hash_path(data_dir))  # atomic: a crash never leaves half a hash
    except OSError as error:
        # Not fatal: the next start syncs again, which is what a missing record means.
        log.warning("could not record the command sync in %s: %s", data_dir, error)


async def sync_commands(tree: app_commands.CommandTree, application_id: int | None, data_dir: Path) -> int:
    """Sync the global tree and record its hash; the number of commands synced."""
    synced = await tree.sync()
    record_sync(data_dir, tree_hash(tree, application_id))
    return len(synced)


async def sync_if_changed(tree: app_commands.CommandTree, application_id: int | None, data_dir: Path) -> bool:
    """Sync when the commands differ from the last sync recorded in `data_dir`; whether it did."""
    if last_synced(data_dir) == tree_hash(tree, application_id):
        log.info("application commands unchanged since the last sync: not syncing")
        return False
    count = await sync_commands(tree, application_id, data_dir)
    log.info("synced %d application commands (they changed since the last sync)", count)
    return True
