"""One settings object for the whole project, read once from the environment and `.env`.

Nothing here is global: `Settings.from_env()` builds a frozen dataclass that the caller passes
down (to the bot, to the inference service, to the CLI).  Every field has an environment
variable of the same name in upper case (`command_prefix` ← `COMMAND_PREFIX`), except the token,
which is `DISCORD_TOKEN`.  Values in the real environment win over values in `.env`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from dotenv import dotenv_values


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def default_weights_dir() -> Path:
    return Path(platformdirs.user_cache_dir("discord-vision-bot")) / "weights"


def default_bot_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("discord-vision-bot"))


@dataclass(frozen=True)
class Settings:
    # --- Discord ---------------------------------------------------------------------------
    #: The bot token.  `repr=False` keeps it out of logs and tracebacks that print settings.
    discord_token: str | None = field(default=None, repr=False)
    command_prefix: str = "!"
    #: Channel ids the bot answers in; empty means everywhere it can read.
    allowed_channels: frozenset[int] = frozenset()
    #: At most this many attachments of one message are answered.
    max_images_per_message: int = 3
    #: Seconds a user waits between two heavy commands (zebra, caption); 0 turns it off.
    heavy_command_cooldown_s: float = 10.0
    #: Image URLs: https only unless this is set.
    allow_http_urls: bool = False
    url_timeout_s: float = 10.0
    #: Bytes the bot downloads at once across every user (a link counts as `max_image_bytes`
    #: until read); images are downloaded only after the queue has taken them.
    max_download_bytes_in_flight: int = 100 * 1024 * 1024
    #: On shutdown, seconds the answers in progress may take before their users are told the
    #: bot is restarting.
    shutdown_grace_s: float = 30.0
    #: The bot's own files (the hash of the last synced command tree: the bot syncs its
    #: commands with Discord at start-up only when they changed since).
    bot_data_dir: Path = field(default_factory=default_bot_data_dir)
    #: The SQLite file of the per-server settings that `/config` changes (created on first
    #: start); unset: `servers.sqlite3` in `bot_data_dir` (so a bot given a data directory of
    #: its own, a test's, keeps its database there too).
    database_path: Path | None = None
    #: Sharding (discord.py's `AutoShardedBot`): the total number of shards (0: one process,
    #: no sharding) and the ones this process runs (empty: all of them).
    shard_count: int = 0
    shard_ids: frozenset[int] = frozenset()

    # --- Models ----------------------------------------------------------------------------
    classifier: str = "efficientnet_lite0"
    zebra_model: str = "horse2zebra"
    #: Short side of the image the CycleGAN generator works at.
    zebra_size: int = 256
    #: Longest side of the image the captioner's encoder sees.
    caption_size: int = 512
    #: Beam width of the captioner: 2 is what the book's eval.py runs; 1 is its greedy sampler.
    caption_beam: int = 2
    #: Where downloaded weights live.
    weights_dir: Path = field(default_factory=default_weights_dir)
    #: Download missing weights on first use (otherwise: a clear error naming the command).
    auto_download: bool = False
    #: Trust Torch Hub repositories named as `hub:OWNER/REPO:ENTRY` (they run their own code).
    trust_hub_repos: bool = False

    # --- Images ----------------------------------------------------------------------------
    #: Largest file accepted, in bytes.
    max_image_bytes: int = 25 * 1024 * 1024
    #: Largest image decoded, in pixels (imgproxy's max source resolution), checked on the header.
    max_image_pixels: int = 50_000_000
    #: The long side may be at most this many times the short side (1×20000 is refused).
    max_image_aspect_ratio: float = 50.0
    #: JPEGs with more scans are refused before decoding: each scan is a pass over the image.
    max_jpeg_scans: int = 100
    #: Per worker: memory its decoding may hold at once, in MB (what decoding and converting to
    #: RGB costs, estimated from the header).  An image that alone would need more is refused
    #: before decoding; images of a batch decode side by side only while they fit together.
    #: 0: no limit.  A worker's memory ceiling counts this on top of its model's needs.
    decode_memory_mb: int = 256

    # --- Runtime and backend ---------------------------------------------------------------
    #: "auto": ONNX Runtime for each model whose export passes its parity check, PyTorch
    #: elsewhere; "onnx" or "torch" to force one (see `inference.runtime`).
    inference_runtime: str = "auto"
    #: "local": worker processes on this machine; "ray": Ray Serve deployments.
    inference_backend: str = "local"
    #: An existing Ray cluster to use ("auto" or "ray://host:10001"); empty: the service
    #: starts a local Ray instance that it owns and stops on close.
    ray_address: str = ""
    #: Replicas of each task's Serve deployment: autoscaled between these two.
    ray_min_replicas: int = 1
    ray_max_replicas: int = 1

    # --- Worker queue ----------------------------------------------------------------------
    #: "auto" picks CUDA when present, else the CPU; or any torch device string.
    device: str = "auto"
    #: Cores the workers share: the service grants each batch a part of them, so that all the
    #: tasks' threads together never exceed this; 0 means every core this process may use.
    cpu_cores: int = 0
    #: Largest model batch, for the tasks that batch (`inference.tasks`: classify on the CPU).
    max_batch_size: int = 8
    max_batch_wait_ms: float = 5.0
    #: Per task: requests waiting (not yet on the model, reserved ones included) before new
    #: ones get `Busy`.  A zebra backlog never makes classify busy.
    classify_queue_size: int = 64
    zebra_queue_size: int = 16
    caption_queue_size: int = 16
    #: Serve each task's queue in turns between users, so one user's images never hold
    #: everyone else's back; off: strictly first come, first served.
    queue_turns: bool = True
    #: Requests one user may have waiting or running (or reserved) at once.
    max_pending_per_user: int = 3
    request_timeout_s: float = 120.0
    #: Seconds a worker may take to start and load its model (a first download included)
    #: before it is killed and the requests waiting for it fail.
    model_load_timeout_s: float = 300.0
    #: Per task: the worker's resident memory ceiling in MB; the service kills and restarts a
    #: worker past it.  None ("auto", the default): what the loaded model was measured to need
    #: at its largest input, plus DECODE_MEMORY_MB, plus headroom
    #: (`inference.service.ceilings`); 0: none; a number: that many MB.
    classify_max_memory_mb: int | None = None
    zebra_max_memory_mb: int | None = None
    caption_max_memory_mb: int | None = None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        **overrides: Any,
    ) -> Settings:
        """Read settings from `env_file` (if it exists) overlaid by `environ` (default: os.environ)."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        for variable, replacement in RETIRED_VARIABLES.items():
            if (values.get(variable) or "").strip():
                raise SettingsError(f"{variable} is no longer read: {replacement}")

        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = "DISCORD_TOKEN" if f.name == "discord_token" else f.name.upper()
            raw = values.get(variable)
            if raw is None or raw.strip() == "":
                continue
            kwargs[f.name] = _parse(variable, raw.strip(), f.type)
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def database_file(self) -> Path:
        """`DATABASE_PATH`, or `servers.sqlite3` in `bot_data_dir` when it is unset."""
        return self.database_path if self.database_path is not None else self.bot_data_dir / "servers.sqlite3"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.shard_ids and not all(0 <= shard < self.shard_count for shard in self.shard_ids):
            raise SettingsError(
                f"SHARD_IDS={','.join(map(str, sorted(self.shard_ids)))} must be shards of SHARD_COUNT={self.shard_count} (0 to {self.shard_count - 1})"
            )
        if not self.max_image_aspect_ratio >= 1:  # also refuses NaN
            raise SettingsError(
                f"MAX_IMAGE_ASPECT_RATIO={self.max_image_aspect_ratio:g} would refuse every image; it must be at least 1"
            )
        for name, allowed in (("inference_runtime", RUNTIMES), ("inference_backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name.upper()}={getattr(self, name)!r} must be one of: {', '.join(allowed)}")
        if self.cpu_cores < 0:
            raise SettingsError(f"CPU_CORES={self.cpu_cores} must be 0 (every core) or more")
        for name in ("decode_memory_mb", "classify_max_memory_mb", "zebra_max_memory_mb", "caption_max_memory_mb"):
            if (getattr(self, name) or 0) < 0:
                raise SettingsError(f"{name.upper()}={getattr(self, name)} must be 0 (no limit) or more")
        for name in ("max_jpeg_scans", "classify_queue_size", "zebra_queue_size", "caption_queue_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.upper()}={getattr(self, name)} must be at least 1")


#: The values of INFERENCE_RUNTIME and INFERENCE_BACKEND.
RUNTIMES = ("auto", "onnx", "torch")
BACKENDS = ("local", "ray")

#: Variables an earlier version read, and what to set instead: an `.env` that still sets one is
#: told so, rather than having it silently ignored.
RETIRED_VARIABLES = {
    "MAX_QUEUE_SIZE": "each task has its own queue limit now: set CLASSIFY_QUEUE_SIZE, ZEBRA_QUEUE_SIZE "
    "and CAPTION_QUEUE_SIZE instead (defaults 64, 16, 16).",
    "TORCH_THREADS": "the workers share one core budget now: set CPU_CORES instead (0, the default: every "
    "core this process may use); each batch gets its share of it.",
}


def _parse(variable: str, raw: str, type_name: Any) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            lowered = raw.lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "int | None":  # a number, or "auto" for the computed default
            return None if raw.lower() == "auto" else int(raw)
        if kind == "float":
            return float(raw)
        if kind in ("Path", "Path | None"):
            return Path(raw).expanduser()
        if kind == "frozenset[int]":
            return frozenset(int(part) for part in raw.replace(",", " ").split())
        return raw
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not a valid {kind}") from None
