"""`python -m inference …`: the models from a terminal, no Discord needed.

    python -m inference classify IMAGE [--model NAME] [--top K] [--json]
    python -m inference zebra IMAGE --output OUT [--model NAME] [--weights FILE] [--size N]
    python -m inference caption IMAGE [--beam N] [--weights-dir DIR] [--json]
    python -m inference weights list | download NAME|all
    python -m inference bench [--task classify] [--requests 64] [--concurrency 16] [--json]

Errors are turned into words here, once: one line on stderr, a non-zero exit status.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from config import Settings, SettingsError
from inference import bench, weights
from inference.errors import InferenceError
from inference.images import ImageLimits, decode_image
from inference.registry import resolve_device

EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description="Run the vision models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="top-k ImageNet labels of a photo")
    classify.add_argument("image", type=Path)
    classify.add_argument("--model", help="efficientnet_lite0 (default), a torchvision name, or hub:OWNER/REPO:ENTRY")
    classify.add_argument("--top", type=int, default=5, help="how many labels (default 5)")
    classify.add_argument("--json", action="store_true", help="print one JSON object")
    classify.set_defaults(handler=run_classify)

    zebra = commands.add_parser("zebra", help="turn horses into zebras (CycleGAN)")
    zebra.add_argument("image", type=Path)
    zebra.add_argument("--output", "-o", type=Path, required=True, help="where to write the image")
    zebra.add_argument("--model", help="a CycleGAN generator of the catalogue (default horse2zebra)")
    zebra.add_argument("--weights", type=Path, help="a generator checkpoint to load instead")
    zebra.add_argument("--size", type=int, help="short side of the working resolution (default 256)")
    zebra.set_defaults(handler=run_zebra)

    caption = commands.add_parser("caption", help="describe a photo in a sentence")
    caption.add_argument("image", type=Path)
    caption.add_argument("--beam", type=int, help="beam width (1 = greedy; default from settings)")
    caption.add_argument(
        "--weights-dir", type=Path, help="a directory with fc-model.pth, fc-infos.pkl and resnet101.pth (or its halves)"
    )
    caption.add_argument("--json", action="store_true", help="print one JSON object")
    caption.set_defaults(handler=run_caption)

    weights.add_cli(commands)
    bench.add_cli(commands)
    return parser


def run_classify(args: argparse.Namespace, settings: Settings) -> int:
    from inference.models.classifier import ClassifierSource, load_classifier

    source = ClassifierSource(auto_download=settings.auto_download, trust_hub_repos=settings.trust_hub_repos)
    pipeline = load_classifier(args.model or settings.classifier, resolve_device(settings.device), source)
    image = _read_image(args.image, settings, pipeline.draft_size)
    predictions = pipeline.classify(image, top=max(1, args.top))
    if args.json:
        print(
            json.dumps(
                {
                    "model": pipeline.name,
                    "predictions": [{"label": p.label, "probability": p.probability} for p in predictions],
                }
            )
        )
    else:
        for prediction in predictions:
            print(f"{prediction.probability:6.2f} %  {prediction.label}")
    return 0


def run_zebra(args: argparse.Namespace, settings: Settings) -> int:
    from inference.models import cyclegan

    device = resolve_device(settings.device)
    size = args.size or settings.zebra_size
    if args.weights is not None:
        pipeline = cyclegan.ZebraPipeline.from_checkpoint(args.weights, size=size, device=device)
    else:
        changes = {"zebra_size": size} | ({"zebra_model": args.model} if args.model else {})
        pipeline = cyclegan.load_from_settings(settings.replace(**changes), device)
    image = _read_image(args.image, settings, pipeline.draft_size)
    png = pipeline.run([pipeline.preprocess(image)], [{}])[0]
    _write_image(png, args.output)
    print(f"wrote {args.output}")
    return 0


def run_caption(args: argparse.Namespace, settings: Settings) -> int:
    from inference.models import captioner

    device = resolve_device(settings.device)
    beam = args.beam or settings.caption_beam
    if args.weights_dir is not None:
        pipeline = captioner.CaptionPipeline.from_dir(args.weights_dir, size=settings.caption_size, beam=beam, device=device)
    else:
        pipeline = captioner.load_from_settings(settings.replace(caption_beam=beam), device)
    image = _read_image(args.image, settings, pipeline.draft_size)
    sentence = pipeline.run([pipeline.preprocess(image)], [{"beam": beam}])[0]
    print(json.dumps({"caption": sentence}) if args.json else sentence)
    return 0


def _read_image(path: Path, settings: Settings, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InferenceError(f"Cannot read {path}: {error.strerror or error}.") from None
    return decode_image(data, ImageLimits.from_settings(settings), draft_size=draft_size)


def _write_image(png: bytes, output: Path) -> None:
    """PNG bytes → the file; another extension (.jpg, .webp) gets that format."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() in ("", ".png"):
        output.write_bytes(png)
        return
    try:
        Image.open(io.BytesIO(png)).save(output)
    except (ValueError, KeyError):
        raise InferenceError(f"Cannot write {output}: unknown image extension {output.suffix!r}.") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return args.handler(args, settings)
    except (InferenceError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
