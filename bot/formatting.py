"""How answers look: the classification embed with bars, captions, zebra files within the
upload limit, queue positions, help and model status.  Pure functions of their inputs."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import discord
from PIL import Image

from inference.pipeline import Prediction
from inference.service import ModelState, ServiceStats, TaskStats
from inference.tasks import TASK_SPECS

#: What Discord lets a bot upload where nothing says otherwise (DMs, unboosted servers).
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
BAR_WIDTH = 16
EMBED_COLOUR = discord.Colour.blurple()
_FULL, _EMPTY = "█", "░"
_EIGHTHS = " ▏▎▍▌▋▊▉"
_STATE_ICONS = {"ready": "🟢", "loading": "🟡", "idle": "⚪", "unavailable": "🔴"}


def probability_bar(percent: float, width: int = BAR_WIDTH) -> str:
    """A fixed-width bar for 0–100 %, in eighths of a character so small differences show."""
    percent = min(max(percent, 0.0), 100.0)
    eighths = round(percent / 100 * width * 8)
    full, part = divmod(eighths, 8)
    bar = _FULL * full + (_EIGHTHS[part] if part else "")
    return bar + _EMPTY * (width - len(bar))


def source_text(source: str, *, spoiler: bool = False, link: bool = False) -> str:
    """How an answer names its image: the file name or the link, clipped; a link inside `<>`
    so that Discord does not preview it again; behind `||` when it came as a spoiler."""
    text = _short(source)
    if link:
        text = f"<{text}>"
    return f"||{text}||" if spoiler else text


def classification_embed(
    predictions: Sequence[Prediction], *, source: str, model: str, spoiler: bool = False
) -> discord.Embed:
    """Top predictions as aligned bars in a code block (hidden behind a spoiler if asked).

    Embed titles cannot hold a spoiler: a spoilered image's name goes into the description,
    behind `||`, and the title stays generic."""
    if spoiler:
        lines = [f"||{_short(source)}||"] + [f"||{p.label} — {p.probability:.1f} %||" for p in predictions]
        description = "\n".join(lines)
        title = "What's in this spoilered image?"
    else:
        name_width = max((len(p.label) for p in predictions), default=0)
        rows = [
            f"{probability_bar(p.probability)} {p.probability:5.1f} %  {p.label:<{name_width}}"
            for p in predictions
        ]
        description = "```\n" + "\n".join(rows) + "\n```"
        title = f"What's in {_short(source)}?"
    embed = discord.Embed(title=title, description=description, colour=EMBED_COLOUR)
    if predictions and not spoiler:
        best = predictions[0]
        embed.add_field(name="Best guess", value=f"**{best.label}** ({best.probability:.1f} %)")
    embed.set_footer(text=f"ImageNet classifier: {model}")
    return embed


def caption_message(caption: str, *, source: str, spoiler: bool = False, link: bool = False) -> str:
    text = caption.strip() or "(the captioner had nothing to say)"
    if spoiler:
        text = f"||{text}||"
    return f"📝 {source_text(source, spoiler=spoiler, link=link)}: {text}"


def zebra_message(source: str, *, spoiler: bool = False, link: bool = False) -> str:
    return f"🦓 {source_text(source, spoiler=spoiler, link=link)}, zebra-fied"


def skipped_message(labels: Sequence[str], limit: int) -> str:
    """Images beyond the per-message limit: named (as `source_text` shows them), not dropped."""
    images = "image" if limit == 1 else "images"
    return f"I answer up to {limit} {images} per message; skipped: {', '.join(labels)}."


def queue_message(ahead: int, wait_s: float | None = None) -> str:
    """A waiting request's place in line and, once the model's speed is known, its wait."""
    if ahead <= 0:
        place = "yours is next"
    else:
        place = f"{'1 request' if ahead == 1 else f'{ahead} requests'} ahead of yours"
    wait = f", {wait_text(wait_s)} to wait" if wait_s is not None else ""
    return f"⏳ You're in line: {place}{wait}. This message will show the result."


def wait_text(seconds: float) -> str:
    """A wait in round figures ("about 5 s", "about 2 min"): a reply updated as the line moves
    changes (and costs an edit) only when the figure shown does."""
    if seconds < 10:
        return f"about {max(1, math.ceil(seconds))} s"
    if seconds < 60:
        return f"about {5 * math.ceil(seconds / 5)} s"
    return f"about {math.ceil(seconds / 60)} min"


def _short(text: str, limit: int = 80) -> str:
    return _clip(text, limit)


# --- files within the upload limit ------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    extension: str  # "png" or "jpg"


def fit_upload(png: bytes, limit: int) -> EncodedImage:
    """`png` as is when it fits in `limit` bytes; otherwise JPEG, scaled down until it fits.

    CPU work on a whole image: call it in a thread, not on the event loop.
    """
    if len(png) <= limit:
        return EncodedImage(png, "png")
    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    scale = 1.0
    for _attempt in range(8):
        resized = image if scale == 1.0 else image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.LANCZOS,
        )
        buffer = io.BytesIO()
        resized.save(buffer, format="JPEG", quality=88, optimize=True)
        if buffer.tell() <= limit:
            return EncodedImage(buffer.getvalue(), "jpg")
        # JPEG size grows about with the pixel count: shrink both sides by the square root of
        # how much too large it is, with a margin so this rarely takes more than two tries.
        scale *= min(0.9, math.sqrt(limit / buffer.tell()) * 0.95)
    raise ValueError(f"cannot encode the image within {limit} bytes")


def upload_limit(guild: discord.Guild | None, interaction: discord.Interaction | None = None) -> int:
    """The most bytes one upload may have: for an interaction's answer, what Discord sent
    with the interaction (it knows the channel, DMs and boosts); else the guild's limit."""
    if interaction is not None:
        limit = getattr(interaction, "filesize_limit", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT


def image_file(encoded: EncodedImage, *, stem: str, spoiler: bool) -> discord.File:
    # discord.py prefixes SPOILER_ to the name when spoiler=True; that is what Discord reads.
    return discord.File(io.BytesIO(encoded.data), filename=f"{stem}.{encoded.extension}", spoiler=spoiler)


# --- help and models -------------------------------------------------------------------------


def help_embed(prefix: str, *, prefix_commands: bool = True) -> discord.Embed:
    """`prefix_commands=False` (no message-content intent: the bot cannot read `!commands`)
    leaves the prefix form out."""
    if prefix_commands:
        how = (
            "Give me a photo: **attach it**, paste an **image link**, or **reply** to a message "
            f"that has one, then use a command — as `{prefix}command` or `/command`. "
        )
    else:
        how = "Use a command as `/command`, with the photo **attached** or its **link**. "
    embed = discord.Embed(
        title="What I can do",
        description=how + "Or right-click (long-press) a message with an image → **Apps**.",
        colour=EMBED_COLOUR,
    )
    for spec in TASK_SPECS.values():  # one line per task, in the words of `inference.tasks`
        embed.add_field(name=spec.name, value=spec.description, inline=False)
    embed.add_field(name="style", value="Repaint a photo in a style of the CycleGAN zoo (monet, vangogh, …).", inline=False)
    embed.add_field(name="models", value="Which models are loaded, and what is missing.", inline=False)
    embed.add_field(name="status", value="Each model's state, its queue and how fast it answers.", inline=False)
    embed.add_field(name="config", value="This server's settings (members with Manage Server may change them).", inline=False)
    embed.add_field(name="help", value="This message.", inline=False)
    embed.set_footer(text="Images marked as spoilers come back as spoilers.")
    return embed


def models_embed(states: Sequence[ModelState]) -> discord.Embed:
    """Per task (as the service reports it): the model, its state, where it runs, and for
    missing weights the files and the command that gets them."""
    embed = discord.Embed(title="Models", colour=EMBED_COLOUR)
    for state in states:
        where = " on ".join(part for part in (state.runtime, state.device) if part)
        lines = [f"{_STATE_ICONS.get(state.state, '•')} `{state.model}` — {state.state}" + (f" ({where})" if where else "")]
        if state.error:
            lines.append(state.error)
        if state.missing:
            lines.append(f"Missing: {', '.join(m.file for m in state.missing)}")
            for command in dict.fromkeys(m.command for m in state.missing):  # each command once
                lines.append(f"Get it with `{command}` on the bot's machine.")
        embed.add_field(name=state.task, value=_clip("\n".join(lines), 1024), inline=False)
    embed.set_footer(text="Models load on first use; weights live in the bot's weights directory.")
    return embed


def state_label(state: ModelState) -> str:
    """loaded / loading / idle / missing weights / unavailable."""
    if state.missing:
        return "missing weights"
    return {"ready": "loaded"}.get(state.state, state.state)


def status_embed(states: Sequence[ModelState], stats: ServiceStats, versions: str) -> discord.Embed:
    """Per task: its state, model, runtime and device; requests waiting and running; the
    median and 95th percentile of its last answers.  `versions` goes in the footer."""
    embed = discord.Embed(title="Status", colour=EMBED_COLOUR)
    for state in states:
        counts = stats.tasks.get(state.task) or TaskStats(state.task)
        label = state_label(state)
        icon = _STATE_ICONS.get("unavailable" if state.missing else state.state, "•")
        where = " on ".join(part for part in (state.runtime, state.device or "device not known yet") if part)
        times = (
            f"p50 {_ms(counts.p50_ms)} · p95 {_ms(counts.p95_ms)}" if counts.done else "no answers yet"
        )
        cores = f" · {counts.threads} of {stats.cpu_cores} cores" if counts.threads and stats.cpu_cores else ""
        lines = [
            f"{icon} {label} · `{state.model}` · {where}",
            f"waiting {counts.waiting} · running {counts.running}{cores} · {times}",
        ]
        embed.add_field(name=state.task, value=_clip("\n".join(lines), 1024), inline=False)
    embed.set_footer(text=versions)
    return embed


def _ms(milliseconds: float) -> str:
    return f"{milliseconds / 1000:.1f} s" if milliseconds >= 1000 else f"{milliseconds:.0f} ms"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
