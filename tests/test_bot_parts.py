"""The bot's pure parts: bars and embeds, files within the upload limit, finding links, and
`python -m bot` refusing to start without a usable token."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from discord.ext import commands

from bot.__main__ import token_problem
from bot.errors import unwrap, user_message
from bot.formatting import BAR_WIDTH, classification_embed, fit_upload, probability_bar
from bot.sources import links_in
from inference.errors import Busy, InvalidImage, WeightsMissing
from inference.pipeline import Prediction

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- bars and embeds ------------------------------------------------------------------------------


def test_bars_have_a_fixed_width_and_grow_with_the_probability():
    bars = [probability_bar(p) for p in (0, 0.4, 3, 25, 50, 99.9, 100, 140, -5)]
    assert all(len(bar) == BAR_WIDTH for bar in bars)
    assert bars[0] == "░" * BAR_WIDTH and bars[-1] == bars[0]  # clamped below
    assert bars[6] == "█" * BAR_WIDTH and bars[7] == bars[6]  # clamped above
    assert probability_bar(50) == "█" * (BAR_WIDTH // 2) + "░" * (BAR_WIDTH // 2)
    filled = [BAR_WIDTH - bar.count("░") for bar in bars[:7]]
    assert filled == sorted(filled) and filled[2] == 1  # 3 % still shows a sliver


def test_classification_embed_reads_at_a_glance_and_hides_spoilers():
    predictions = [Prediction("golden retriever", 91.25), Prediction("tennis ball", 3.5)]
    embed = classification_embed(predictions, source="bobby.jpg", model="efficientnet_lite0")
    rows = embed.description.strip("`\n").splitlines()
    assert rows[0].endswith("91.2 %  golden retriever") or rows[0].endswith("91.3 %  golden retriever")
    assert rows[1].split()[-2:] == ["tennis", "ball"]
    assert embed.title == "What's in bobby.jpg?" and "efficientnet_lite0" in embed.footer.text

    hidden = classification_embed(predictions, source="x.jpg", model="m", spoiler=True)
    assert all(line.startswith("||") and line.endswith("||") for line in hidden.description.splitlines())
    assert not hidden.fields  # no "best guess" outside the spoiler


# --- files within the upload limit ----------------------------------------------------------------


def _noise_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_png_that_fits_is_sent_as_it_is():
    png = _noise_png(64, 48)
    encoded = fit_upload(png, limit=len(png))
    assert encoded.extension == "png" and encoded.data == png


@pytest.mark.parametrize("limit", [400_000, 60_000])
def test_a_png_too_large_for_the_limit_becomes_a_jpeg_that_fits(limit):
    png = _noise_png(900, 600)  # noise: ~1.6 MB as PNG, hard to compress
    encoded = fit_upload(png, limit=limit)
    assert encoded.extension == "jpg" and len(encoded.data) <= limit
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert image.format == "JPEG"
        assert abs(image.width / image.height - 1.5) < 0.01  # scaled, not cropped
        if limit == 60_000:
            assert image.width < 900  # re-encoding alone was not enough: it was scaled down


# --- links in messages ----------------------------------------------------------------------------


def test_links_are_found_with_their_spoiler_marks_and_without_prose_around_them():
    text = (
        "look (https://a.example/dog.jpg), and ||https://b.example/secret.png|| "
        "or <https://c.example/x?y=1>. Again: https://a.example/dog.jpg! "
        "http://d.example/w_(1).jpg"
    )
    assert links_in(text) == [
        ("https://a.example/dog.jpg", False),
        ("https://b.example/secret.png", True),
        ("https://c.example/x?y=1", False),
        ("http://d.example/w_(1).jpg", False),
    ]
    assert links_in("no links here, just www.example.com") == []


# --- errors in words --------------------------------------------------------------------------------


def test_errors_become_one_short_line_and_setup_details_stay_in_the_log():
    assert user_message(Busy("queue full", retry_after=2.2)) == "I'm busy right now — try again in ~3 s."
    assert user_message(InvalidImage("That file is empty.")) == "That file is empty."
    missing = WeightsMissing("weights file horse2zebra_0.4.0.pth is missing: it goes at /srv/bot/weights/x.pth")
    assert "/srv" not in user_message(missing) and "/models" in user_message(missing)
    assert unwrap(commands.CommandInvokeError(missing)) is missing  # as a command raises it
    assert user_message(RuntimeError("boom")) is None  # internal: logged, answered generically


# --- python -m bot --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (None, "not set"),
        ("   ", "not set"),
        ("Bot MTAxMjM0NTY3ODkwMTIzNDU2Nzg5.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB", 'starts with "Bot "'),
        ("hunter2", "does not look like a bot token"),
    ],
)
def test_token_problems_are_explained(token, problem):
    assert problem in token_problem(token)


def test_a_well_formed_token_passes_the_local_check():
    assert token_problem("MTAxMjM0NTY3ODkwMTIzNDU2Nzg5.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB") is None


@pytest.mark.parametrize("token", ["", "not-a-real-token-value-xyz"])
def test_python_m_bot_without_a_usable_token_explains_and_exits_non_zero(tmp_path, token):
    environment = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    environment |= {"PYTHONPATH": str(REPO_ROOT), "DISCORD_TOKEN": token}
    # Run where there is no .env, so only the environment counts.
    done = subprocess.run(
        [sys.executable, "-m", "bot"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "DISCORD_TOKEN" in done.stderr and "developers/applications" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if token:
        assert token not in done.stderr + done.stdout  # the token is never echoed


def test_procfile_runs_the_bot_as_a_worker():
    assert (REPO_ROOT / "Procfile").read_text().strip() == "worker: python -m bot"


# --- what the answers say (issue 12: spoilers, skipped images, upload limit, help) ---------------


def test_spoilered_names_and_links_stay_hidden_and_links_are_not_previewed():
    from bot.formatting import caption_message, source_text, zebra_message

    assert source_text("dog.jpg") == "dog.jpg"
    assert source_text("dog.jpg", spoiler=True) == "||dog.jpg||"
    assert source_text("https://a.example/x.png", link=True) == "<https://a.example/x.png>"
    assert source_text("https://a.example/x.png", spoiler=True, link=True) == "||<https://a.example/x.png>||"
    assert caption_message("a dog", source="s.jpg", spoiler=True) == "📝 ||s.jpg||: ||a dog||"
    assert zebra_message("https://a.example/h.jpg", spoiler=True, link=True) == "🦓 ||<https://a.example/h.jpg>||, zebra-fied"
    hidden = classification_embed([Prediction("dog", 90.0)], source="secret.jpg", model="m", spoiler=True)
    assert "secret" not in hidden.title and hidden.description.splitlines()[0] == "||secret.jpg||"


def test_skipped_images_are_named():
    from bot.formatting import skipped_message

    assert skipped_message(["c.jpg", "||d.jpg||"], 2) == "I answer up to 2 images per message; skipped: c.jpg, ||d.jpg||."


def test_an_interactions_upload_limit_is_the_one_discord_sent_with_it():
    from types import SimpleNamespace

    from bot.formatting import DEFAULT_UPLOAD_LIMIT, upload_limit

    guild = SimpleNamespace(filesize_limit=10 * 2**20)
    interaction = SimpleNamespace(filesize_limit=25 * 2**20)
    assert upload_limit(guild, interaction) == 25 * 2**20  # not the guild's alone
    assert upload_limit(guild) == 10 * 2**20
    assert upload_limit(None, interaction) == 25 * 2**20  # a DM
    assert upload_limit(None) == DEFAULT_UPLOAD_LIMIT


def test_help_without_the_content_intent_offers_slash_commands_only():
    from bot.cogs.vision import usage
    from bot.formatting import help_embed

    assert "`!command`" in help_embed("!").description
    assert "!" not in help_embed("!", prefix_commands=False).description
    assert "`!zebra`" in usage("zebra", "!") and "!" not in usage("zebra", "!", prefix_commands=False)
