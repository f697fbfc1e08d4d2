"""`python -m inference …`: the models from a terminal, no Discord needed.

    python -m inference classify IMAGE [--model NAME] [--top K] [--json]
    python -m inference zebra IMAGE --output OUT [--model NAME] [--weights FILE] [--size N]
    python -m inference caption IMAGE [--beam N] [--weights-dir DIR] [--json]
    python -m inference weights list | download NAME|all
    python -m inference bench [--task classify] [--requests 64] [--concurrency 16] [--json]
    python -m inference memory [--weights-dir DIR] [--runtime torch] [--burst 4] [--json]

Errors are turned into words here, once: one line on stderr, a non-zero exit status.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from config import Settings, SettingsError
from inference import bench, memory
from inference.catalogue import CATALOGUE, ModelWeights
from inference.errors import InferenceError, ModelUnavailable
from inference.images import ImageLimits, decode_image
from inference.registry import ModelEntry, get_model, resolve_device
from inference.runtime.loader import LoadedPipeline, load_for_worker
from inference.tasks import get_task
from inference.weights import WeightsStore
from inference.worker.resources import worker_threads

EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description="Run the vision models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="top-k ImageNet labels of a photo")
    classify.add_argument("image", type=Path)
    classify.add_argument("--model", help="efficientnet_lite0 (default), a torchvision name, or hub:OWNER/REPO:ENTRY")
    top = get_task("classify").option("top")
    classify.add_argument("--top", type=int, default=top.default, help=f"how many labels (default {top.default})")
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

    add_weights_cli(commands)
    bench.add_cli(commands)
    memory.add_cli(commands)
    return parser


def run_classify(args: argparse.Namespace, settings: Settings) -> int:
    data = _read_input(args.image, settings)  # a bad input fails before the model loads
    loaded = _load("classify", args.model or settings.classifier, settings)
    pipeline = loaded.pipeline
    image = _decode(data, settings, pipeline.draft_size)
    predictions = pipeline.run([pipeline.preprocess(image)], [{"top": max(1, args.top)}])[0]
    if args.json:
        print(
            json.dumps(
                {
                    "model": pipeline.name,
                    "runtime": loaded.runtime,
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

    # Both ends are checked before the model is loaded and run, not after.
    data = _read_input(args.image, settings)
    check_output(args.output)
    device = resolve_device(settings.device)
    size = args.size or settings.zebra_size
    if args.weights is not None:
        pipeline = cyclegan.ZebraPipeline.from_checkpoint(args.weights, size=size, device=device)
    else:
        pipeline = _load("zebra", args.model or settings.zebra_model, settings.replace(zebra_size=size)).pipeline
    image = _decode(data, settings, pipeline.draft_size)
    png = pipeline.run([pipeline.preprocess(image)], [{}])[0]
    _write_image(png, args.output)
    print(f"wrote {args.output}")
    return 0


def run_caption(args: argparse.Namespace, settings: Settings) -> int:
    from inference.models import captioner

    data = _read_input(args.image, settings)
    device = resolve_device(settings.device)
    beam = args.beam or settings.caption_beam
    if args.weights_dir is not None:  # files named by hand: read by the torch pipeline as they are
        pipeline = captioner.CaptionPipeline.from_dir(args.weights_dir, size=settings.caption_size, beam=beam, device=device)
        runtime = "torch"
    else:
        loaded = _load("caption", get_task("caption").default_model(settings), settings.replace(caption_beam=beam))
        pipeline, runtime = loaded.pipeline, loaded.runtime
    image = _decode(data, settings, pipeline.draft_size)
    sentence = pipeline.run([pipeline.preprocess(image)], [{"beam": beam}])[0]
    print(json.dumps({"caption": sentence, "runtime": runtime}) if args.json else sentence)


def _load(task: str, model_name: str, settings: Settings) -> LoadedPipeline:
    """The model in the runtime INFERENCE_RUNTIME picks, as a worker would load it (the first
    run of `auto` or `onnx` exports it once: a few seconds)."""
    return load_for_worker(task, model_name, settings, settings.device, worker_threads(settings.cpu_cores))
    return 0


# --- `python -m inference weights list|download` ----------------------------------------------


def add_weights_cli(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    *,
    catalogue: Mapping[str, ModelWeights] = CATALOGUE,
) -> argparse.ArgumentParser:
    """Register the `weights` subcommand; handlers are `handler(args, settings) -> int`."""
    weights = subparsers.add_parser(
        "weights",
        help="list or download model weights",
        description="List or download the weights of the models (the weights store, and torchvision's cache).",
    )
    weights.add_argument(
        "--weights-dir", type=Path, default=None,
        help="weights directory (default: WEIGHTS_DIR from the settings)",
    )
    commands = weights.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="every known weights file and whether it is here")
    listing.add_argument(
        "--verify", action="store_true", help="re-hash present files against their blob ids"
    )
    listing.set_defaults(handler=functools.partial(_list_handler, catalogue=catalogue))

    download = commands.add_parser("download", help="download the weights of models")
    download.add_argument("names", nargs="+", metavar="NAME|all", help="model names, or all")
    download.add_argument(
        "--force", action="store_true", help="download again files that are already present"
    )
    download.set_defaults(handler=functools.partial(_download_handler, catalogue=catalogue))
    return weights


def _store_for(
    args: argparse.Namespace, settings: Settings, catalogue: Mapping[str, ModelWeights]
) -> WeightsStore:
    root = args.weights_dir if args.weights_dir is not None else settings.weights_dir
    return WeightsStore(root, auto_download=True, progress=True, catalogue=catalogue)


def _list_handler(
    args: argparse.Namespace, settings: Settings, *, catalogue: Mapping[str, ModelWeights]
) -> int:
    store = _store_for(args, settings, catalogue)
    rows = [("MODEL", "ROLE", "FILE", "STATE", "SIZE", "BLOB ID", "PATH")]
    statuses = store.status(verify=args.verify)
    for model in statuses:
        for entry in model.files:
            size = tqdm.format_sizeof(entry.size, "B", 1024) if entry.size is not None else "-"
            rows.append(
                (model.name, entry.role, entry.file.relpath, entry.state, size,
                 entry.file.integrity, str(entry.path))
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print(f"weights directory: {store.root}")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    corrupt = [f for m in statuses for f in m.files if f.verified is False]
    for entry in corrupt:
        print(f"{entry.path}: {entry.note}", file=sys.stderr)
    return 1 if corrupt else 0


def _download_handler(
    args: argparse.Namespace, settings: Settings, *, catalogue: Mapping[str, ModelWeights]
) -> int:
    store = _store_for(args, settings, catalogue)
    names = list(catalogue) if "all" in args.names else list(dict.fromkeys(args.names))
    # Names outside the store whose registry entry fetches its own weights (a torchvision
    # classifier: torchvision keeps its own cache and hash check).
    elsewhere = {name: _entry_with_downloader(name) for name in names if name not in catalogue}
    for name in names:
        if elsewhere.get(name) is None:
            store.model(name)  # unknown names fail before anything is downloaded
    failures: list[tuple[str, ModelUnavailable]] = []
    for name in names:
        try:
            entry = elsewhere.get(name)
            if entry is not None:
                paths = entry.download(progress=True)
            else:
                paths = store.download_model(name) if args.force else store.ensure_model(name)
        except ModelUnavailable as error:
            failures.append((name, error))
            continue
        for role, path in paths.items():
            print(f"{name} {role}: {path}")
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        summary = "; ".join(f"{name}: {error}" for name, error in failures)
        raise ModelUnavailable(f"{len(failures)} of {len(names)} downloads failed: {summary}")
    return 0


def _entry_with_downloader(name: str) -> ModelEntry | None:
    try:
        entry = get_model(name)
    except ModelUnavailable:
        return None
    return entry if entry.downloader else None


def _read_input(path: Path, settings: Settings) -> bytes:
    return read_input(path, ImageLimits.from_settings(settings).max_bytes)


def _decode(data: bytes, settings: Settings, draft_size: tuple[int, int] | None) -> Image.Image:
    return decode_image(data, ImageLimits.from_settings(settings), draft_size=draft_size)


def read_input(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most `max_bytes` of them, or `InferenceError`.

    Opened without blocking and checked on the open descriptor: a FIFO would otherwise wait for a
    writer forever, and a device such as /dev/zero never ends.  Only regular files are read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise InferenceError(f"Cannot read {path}: {error.strerror or error}.") from None
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise InferenceError(f"Cannot read {path}: {_file_kind(kind)}, not a regular file.")
        chunks, size = [], 0
        while size <= max_bytes:  # one byte more than allowed tells "too large" from "just fits"
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise InferenceError(f"Cannot read {path}: {error.strerror or error}.") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise InferenceError(f"{path} is larger than the {max_bytes / (1024 * 1024):.0f} MB I accept.")
    return data


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return f"it is {name}"
    return "it is a special file"


def check_output(output: Path) -> None:
    """Refuse an output path that cannot be written, before any model runs (and creates a
    missing folder for it).  Writing can still fail later; `_write_image` reports that too."""
    if output.exists() and not output.is_file():  # a directory, a FIFO, a device…
        raise InferenceError(f"Cannot write {output}: {_file_kind(output.stat().st_mode)}, not a regular file.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InferenceError(f"Cannot create the folder of {output}: {error.strerror or error}.") from None
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise InferenceError(f"Cannot write {output}: permission denied.")
    suffix = output.suffix.lower()
    if suffix not in ("", ".png") and suffix not in Image.registered_extensions():
        raise InferenceError(f"Cannot write {output}: unknown image extension {output.suffix!r}.")


def _write_image(png: bytes, output: Path) -> None:
    """PNG bytes → the file; another extension (.jpg, .webp) gets that format."""
    check_output(output)
    try:
        if output.suffix.lower() in ("", ".png"):
            output.write_bytes(png)
            return
        Image.open(io.BytesIO(png)).save(output)
    except (ValueError, KeyError):
        raise InferenceError(f"Cannot write {output}: unknown image extension {output.suffix!r}.") from None
    except OSError as error:
        raise InferenceError(f"Cannot write {output}: {error.strerror or error}.") from None


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
