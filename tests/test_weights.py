"""inference.weights, the store: git blob ids, downloads (against 127.0.0.1 only), verification,
status; and the `weights` command of `inference.cli` that drives it.  The catalogue's own facts
are in tests/test_catalogue.py."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from inference.errors import ModelUnavailable, WeightsCorrupt, WeightsMissing
from inference.catalogue import CATALOGUE, ModelWeights, WeightsFile
from inference.cli import add_weights_cli as add_cli
from inference.weights import WeightsStore, git_blob_id
from tests.httpserver import LocalHTTPServer, closed_port

pytestmark = pytest.mark.timeout(60)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


GENERATOR = payload(300_000, 1)  # several 64 KiB writes and a few progress updates
MODEL = payload(5_000, 2)
INFOS = payload(700, 3)
PART_A = payload(200_000, 4)
PART_B = payload(123_457, 5)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would route 127.0.0.1 requests elsewhere.
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                     "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as running:
        yield running


def local_catalogue(base_url: str) -> dict[str, ModelWeights]:
    """The real catalogue's shapes (a single generator; a model with a joined file), local URLs."""
    return {
        "zebra": ModelWeights(
            name="zebra",
            files={"generator": WeightsFile("cyclegan/zebra.pth", f"{base_url}/g.pth",
                                            git_blob_id(GENERATOR))},
            description="test generator",
        ),
        "cap": ModelWeights(
            name="cap",
            files={
                "model": WeightsFile("captioner/m.pth", f"{base_url}/m.pth", git_blob_id(MODEL)),
                "infos": WeightsFile("captioner/i.pkl", f"{base_url}/i.pkl", git_blob_id(INFOS)),
                "encoder": WeightsFile(
                    "captioner/enc.pth", None, None,
                    parts=(
                        WeightsFile("captioner/enc_a.pth", f"{base_url}/a.pth",
                                    git_blob_id(PART_A)),
                        WeightsFile("captioner/enc_b.pth", f"{base_url}/b.pth",
                                    git_blob_id(PART_B)),
                    ),
                ),
            },
            description="test captioner",
        ),
        "zoo": ModelWeights(
            name="zoo",
            files={"generator": WeightsFile("cyclegan/zoo.pth", f"{base_url}/zoo.pth", None)},
            description="test zoo generator, no published id",
        ),
    }


def serve_all(server: LocalHTTPServer) -> None:
    for path, body in [("/g.pth", GENERATOR), ("/m.pth", MODEL), ("/i.pkl", INFOS),
                       ("/a.pth", PART_A), ("/b.pth", PART_B), ("/zoo.pth", GENERATOR)]:
        server.serve(path, body)


def files_in(directory: Path) -> list[str]:
    """Everything under the directory, temp files included (they start with a dot)."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --- git blob ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) + 17, 3 * (1 << 20)])
def test_git_blob_id_matches_git_hash_object(tmp_path: Path, size: int) -> None:
    data = payload(size, size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = subprocess.run(
        ["git", "hash-object", str(path)], check=True, capture_output=True, text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert git_blob_id(path) == expected
    assert git_blob_id(str(path)) == expected
    assert git_blob_id(data) == expected
    assert git_blob_id(memoryview(data)) == expected


def test_git_blob_id_of_empty_is_gits_well_known_id() -> None:
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


# --- downloads ----------------------------------------------------------------------------------


def test_download_verifies_and_shows_progress(
    server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, auto_download=True, catalogue=local_catalogue(server.base_url))
    file = store.catalogue["zebra"].files["generator"]
    path = store.ensure(file)
    assert path == tmp_path / "cyclegan" / "zebra.pth"
    assert path.read_bytes() == GENERATOR
    assert files_in(tmp_path) == ["cyclegan/zebra.pth"]  # no temp file left over
    progress = capsys.readouterr().err
    assert "zebra.pth" in progress and "100%" in progress

    # Present now: trusted as is, no second request.
    assert store.ensure(file) == path
    assert server.count("/g.pth") == 1


def test_download_without_progress_is_silent(
    server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    store.ensure_model("zebra")
    assert capsys.readouterr().err == ""


def test_download_follows_http_redirects(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.serve("/real/g.pth", GENERATOR)
    server.redirect("/g.pth", "/real/g.pth")
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    assert store.ensure_model("zebra")["generator"].read_bytes() == GENERATOR
    assert [p for _, p in server.requests] == ["/g.pth", "/real/g.pth"]


@pytest.mark.parametrize("scheme", ["file", "ftp"])  # urllib itself would follow ftp://
def test_redirect_to_a_non_http_url_is_refused(
    server: LocalHTTPServer, tmp_path: Path, scheme: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(GENERATOR)
    location = secret.as_uri() if scheme == "file" else f"ftp://127.0.0.1:{closed_port()}/g.pth"
    server.redirect("/g.pth", location)
    store = WeightsStore(tmp_path / "w", auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    with pytest.raises(WeightsMissing, match=r"HTTP 302 .*(not allowed|non-http\(s\) URL refused)"):
        store.ensure_model("zebra")
    assert files_in(tmp_path / "w") == []


def test_corrupt_download_is_refused_and_nothing_is_saved(
    server: LocalHTTPServer, tmp_path: Path
) -> None:
    wrong = bytearray(GENERATOR)
    wrong[1234] ^= 0xFF  # same length, one byte flipped
    server.serve("/g.pth", bytes(wrong))
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    with pytest.raises(WeightsCorrupt) as caught:
        store.ensure_model("zebra")
    message = str(caught.value)
    assert "cyclegan/zebra.pth" in message
    assert git_blob_id(GENERATOR) in message and git_blob_id(bytes(wrong)) in message
    assert files_in(tmp_path) == []


def test_corrupt_redownload_keeps_the_good_file(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.serve("/g.pth", GENERATOR)
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    path = store.ensure_model("zebra")["generator"]
    server.serve("/g.pth", b"tampered" + GENERATOR[8:])
    with pytest.raises(WeightsCorrupt):
        store.download_model("zebra")
    assert path.read_bytes() == GENERATOR
    assert files_in(tmp_path) == ["cyclegan/zebra.pth"]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"drop_after": 100_000}, id="server-closes-mid-body"),
        pytest.param({"drop_after": 100_000, "reset": True}, id="connection-reset"),
        pytest.param({"content_length": len(GENERATOR) + 5000}, id="content-length-lies"),
    ],
)
@pytest.mark.parametrize("model", ["zebra", "zoo"])  # with and without a published blob id
def test_interrupted_download_leaves_nothing_loadable(
    server: LocalHTTPServer, tmp_path: Path, options: dict[str, object], model: str
) -> None:
    server.serve("/g.pth", GENERATOR, **options)
    server.serve("/zoo.pth", GENERATOR, **options)
    catalogue = local_catalogue(server.base_url)
    store = WeightsStore(tmp_path, auto_download=True, progress=False, catalogue=catalogue,
                         timeout=5)
    with pytest.raises(WeightsMissing) as caught:
        store.ensure_model(model)
    message = str(caught.value)
    file = catalogue[model].files["generator"]
    assert "could not download" in message and file.url in message
    assert "bytes" in message  # says how far it got
    assert caught.value.path == str(store.path(file))
    assert files_in(tmp_path) == []


def test_stalled_download_times_out(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.serve("/g.pth", GENERATOR, body_delay_s=2.0)
    store = WeightsStore(tmp_path, auto_download=True, progress=False, timeout=0.3,
                         catalogue=local_catalogue(server.base_url))
    with pytest.raises(WeightsMissing, match="timed out"):
        store.ensure_model("zebra")
    assert files_in(tmp_path) == []


def test_http_error_names_file_url_path_and_command(server: LocalHTTPServer, tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))  # nothing served: 404
    with pytest.raises(WeightsMissing) as caught:
        store.ensure_model("zebra")
    message = str(caught.value)
    assert "HTTP 404" in message
    assert f"{server.base_url}/g.pth" in message
    assert str(tmp_path / "cyclegan" / "zebra.pth") in message
    assert "python -m inference weights download zebra" in message
    assert "\n" not in message


def test_offline_message_names_file_url_path_and_command(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}"
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(base_url))
    with pytest.raises(WeightsMissing) as caught:
        store.ensure_model("zebra")
    message = str(caught.value)
    assert "cyclegan/zebra.pth" in message
    assert f"{base_url}/g.pth" in message
    assert str(tmp_path / "cyclegan" / "zebra.pth") in message
    assert "python -m inference weights download zebra" in message
    assert "refused" in message.lower()
    assert caught.value.url == f"{base_url}/g.pth"
    assert list(tmp_path.iterdir()) == []  # not even a directory


def test_without_auto_download_the_network_is_never_touched(
    server: LocalHTTPServer, tmp_path: Path
) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, catalogue=local_catalogue(server.base_url))
    with pytest.raises(WeightsMissing) as caught:
        store.ensure_model("zebra")
    message = str(caught.value)
    assert "missing" in message
    assert str(tmp_path / "cyclegan" / "zebra.pth") in message
    assert "`python -m inference weights download zebra`" in message
    assert f"{server.base_url}/g.pth" in message

    with pytest.raises(WeightsMissing) as caught:
        store.ensure(store.catalogue["cap"].files["encoder"])
    message = str(caught.value)  # the joined file: where its parts go by hand
    assert str(tmp_path / "captioner" / "enc_a.pth") in message
    assert str(tmp_path / "captioner" / "enc_b.pth") in message
    assert "python -m inference weights download cap" in message
    assert server.request_count == 0


def test_a_present_file_is_trusted_until_verified(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, catalogue=local_catalogue(server.base_url))
    path = store.path(store.catalogue["zebra"].files["generator"])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the published bytes")
    assert store.ensure_model("zebra") == {"generator": path}  # no hashing at load time
    (zebra,) = [m for m in store.status(verify=True) if m.name == "zebra"]
    assert zebra.files[0].verified is False and zebra.files[0].state == "CORRUPT"
    assert git_blob_id(b"not the published bytes") in zebra.files[0].note
    assert server.request_count == 0


# --- joined files -------------------------------------------------------------------------------


def test_parts_are_verified_then_joined_in_order(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    paths = store.ensure_model("cap")
    assert paths == {
        "model": tmp_path / "captioner" / "m.pth",
        "infos": tmp_path / "captioner" / "i.pkl",
        "encoder": tmp_path / "captioner" / "enc.pth",
    }
    assert paths["encoder"].read_bytes() == PART_A + PART_B
    assert paths["model"].read_bytes() == MODEL and paths["infos"].read_bytes() == INFOS
    # Parts are deleted once joined; no temp files anywhere.
    assert files_in(tmp_path) == ["captioner/enc.pth", "captioner/i.pkl", "captioner/m.pth"]
    assert [p for _, p in server.requests] == ["/m.pth", "/i.pkl", "/a.pth", "/b.pth"]


def test_a_corrupt_part_stops_the_join(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    server.serve("/b.pth", PART_B[:-1] + b"\0")
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    encoder = store.catalogue["cap"].files["encoder"]
    with pytest.raises(WeightsCorrupt, match="captioner/enc_b.pth") as caught:
        store.ensure(encoder)
    assert git_blob_id(PART_B) in str(caught.value)
    # The good part stays (verified) for the next try; no joined file, no temp files.
    assert files_in(tmp_path) == ["captioner/enc_a.pth"]

    server.serve("/b.pth", PART_B)
    assert store.ensure(encoder).read_bytes() == PART_A + PART_B
    assert server.count("/a.pth") == 1  # the verified part was not fetched again


def test_parts_placed_by_hand_are_joined_offline(server: LocalHTTPServer, tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, catalogue=local_catalogue(server.base_url))  # no downloads
    a, b = store.catalogue["cap"].files["encoder"].parts
    store.path(a).parent.mkdir(parents=True)
    store.path(a).write_bytes(PART_A)
    store.path(b).write_bytes(PART_B)
    joined = store.ensure(store.catalogue["cap"].files["encoder"])
    assert joined.read_bytes() == PART_A + PART_B
    assert server.request_count == 0


def test_a_bad_part_placed_by_hand_is_refused(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, catalogue=local_catalogue("http://127.0.0.1:9"))
    encoder = store.catalogue["cap"].files["encoder"]
    a, b = encoder.parts
    store.path(a).parent.mkdir(parents=True)
    store.path(a).write_bytes(PART_B)  # swapped
    store.path(b).write_bytes(PART_A)
    with pytest.raises(WeightsCorrupt, match="enc_a.pth"):
        store.ensure(encoder)
    assert not store.path(encoder).exists()


# --- models and status --------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path, catalogue=local_catalogue("http://127.0.0.1:9"))
    with pytest.raises(ModelUnavailable, match="'nope'.*cap, zebra, zoo"):
        store.ensure_model("nope")
    with pytest.raises(ModelUnavailable):
        WeightsStore(tmp_path).ensure_model("horse2zebra_typo")


def test_status_lists_present_and_missing(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    store = WeightsStore(tmp_path, auto_download=True, progress=False,
                         catalogue=local_catalogue(server.base_url))
    store.ensure_model("zebra")
    store.ensure_model("zoo")
    statuses = {s.name: s for s in store.status(verify=True)}
    assert list(statuses) == ["zebra", "cap", "zoo"]
    zebra = statuses["zebra"].files[0]
    assert (zebra.present, zebra.size, zebra.verified, zebra.state) == (
        True, len(GENERATOR), True, "verified")
    assert zebra.path == tmp_path / "cyclegan" / "zebra.pth"
    assert statuses["zebra"].complete
    cap = {f.role: f for f in statuses["cap"].files}
    assert not statuses["cap"].complete
    assert all(f.state == "missing" and f.size is None for f in cap.values())
    assert cap["encoder"].file.urls == (f"{server.base_url}/a.pth", f"{server.base_url}/b.pth")
    zoo = statuses["zoo"].files[0]
    assert zoo.present and zoo.verified is None and "no published blob id" in zoo.note


def test_store_from_settings_uses_its_directory_and_auto_download(tmp_path: Path) -> None:
    settings = Settings(weights_dir=tmp_path, auto_download=True)
    store = WeightsStore.from_settings(settings, progress=False)
    assert (store.root, store.auto_download, store.progress) == (tmp_path, True, False)
    assert store.path(CATALOGUE["fc"].files["encoder"]) == tmp_path / "captioner" / "resnet101.pth"


# --- CLI ----------------------------------------------------------------------------------------


def run_cli(argv: list[str], catalogue: dict[str, ModelWeights]) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference")
    add_cli(parser.add_subparsers(dest="command", required=True), catalogue=catalogue)
    args = parser.parse_args(argv)
    return args.handler(args, Settings(weights_dir=Path("/nonexistent/weights")))


def test_cli_list_and_download(
    server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_all(server)
    catalogue = local_catalogue(server.base_url)
    weights_dir = ["weights", "--weights-dir", str(tmp_path)]

    assert run_cli([*weights_dir, "list"], catalogue) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:4]) for line in out.splitlines()}
    assert ("zebra", "generator", "cyclegan/zebra.pth", "missing") in rows
    assert ("cap", "encoder", "captioner/enc.pth", "missing") in rows
    assert "none published" in out and "git blob id" in out and "parts' blob ids" in out

    assert run_cli([*weights_dir, "download", "zebra", "cap"], catalogue) == 0
    captured = capsys.readouterr()
    assert "100%" in captured.err  # progress bars
    assert str(tmp_path / "captioner" / "enc.pth") in captured.out
    assert (tmp_path / "captioner" / "enc.pth").read_bytes() == PART_A + PART_B

    assert run_cli([*weights_dir, "list", "--verify"], catalogue) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:4] == ["zebra", "generator", "cyclegan/zebra.pth", "verified"]
               for line in out.splitlines())
    assert str(tmp_path / "captioner" / "enc.pth") in out

    # Already present: `download` does not fetch again unless --force.
    before = server.count("/g.pth")
    assert run_cli([*weights_dir, "download", "zebra"], catalogue) == 0
    assert server.count("/g.pth") == before
    assert run_cli([*weights_dir, "download", "--force", "zebra"], catalogue) == 0
    assert server.count("/g.pth") == before + 1


def test_cli_list_verify_fails_on_a_corrupt_file(
    server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_all(server)
    catalogue = local_catalogue(server.base_url)
    weights_dir = ["weights", "--weights-dir", str(tmp_path)]
    assert run_cli([*weights_dir, "download", "zebra"], catalogue) == 0
    path = tmp_path / "cyclegan" / "zebra.pth"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the blob id can tell
    path.write_bytes(bytes(damaged))
    capsys.readouterr()

    assert run_cli([*weights_dir, "list"], catalogue) == 0  # unverified, a present file is trusted
    assert run_cli([*weights_dir, "list", "--verify"], catalogue) == 1
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()]
    assert ["zebra", "generator", "cyclegan/zebra.pth", "present"] in [row[:4] for row in rows]
    assert ["zebra", "generator", "cyclegan/zebra.pth", "CORRUPT"] in [row[:4] for row in rows]
    assert f"{path}: blob id {git_blob_id(bytes(damaged))}, expected {git_blob_id(GENERATOR)}" in captured.err


def test_cli_download_all_reports_failures(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    server.remove("/zoo.pth")
    catalogue = local_catalogue(server.base_url)
    with pytest.raises(WeightsMissing, match="zoo.pth.*HTTP 404"):
        run_cli(["weights", "--weights-dir", str(tmp_path), "download", "all"], catalogue)
    # The others were still downloaded.
    assert (tmp_path / "cyclegan" / "zebra.pth").is_file()
    assert (tmp_path / "captioner" / "enc.pth").is_file()


def test_cli_unknown_name_fails_before_downloading(server: LocalHTTPServer, tmp_path: Path) -> None:
    serve_all(server)
    with pytest.raises(ModelUnavailable, match="known: cap, zebra, zoo"):
        run_cli(["weights", "--weights-dir", str(tmp_path), "download", "zebra", "nope"],
                local_catalogue(server.base_url))
    assert server.request_count == 0


def test_cli_uses_the_settings_weights_dir(
    server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"), catalogue=local_catalogue(server.base_url))
    args = parser.parse_args(["weights", "list"])
    assert args.handler(args, Settings(weights_dir=tmp_path / "from-settings")) == 0
    assert str(tmp_path / "from-settings" / "cyclegan" / "zebra.pth") in capsys.readouterr().out


def test_cli_list_of_the_real_catalogue_runs_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["weights", "--weights-dir", str(tmp_path), "list"])
    assert args.handler(args, Settings()) == 0
    out = capsys.readouterr().out
    for name in CATALOGUE:
        assert f"\n{name} " in out
    assert os.listdir(tmp_path) == []  # listing creates nothing
