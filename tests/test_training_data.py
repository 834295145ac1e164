"""NSMC for real users: the download path (against a local HTTP server, never the internet), the cache, the
checksums, strict reading, and the training command's one-line failures."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
from helpers import free_port
from tiny_model import NSMC_DIR

from core.errors import UserError
from core.training import train
from core.training.data import Source, nsmc_files, read_nsmc

HEADER = "id\tdocument\tlabel\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HTTP server on loopback serving NSMC files (the shared ones, cut to 2,000 rows, or a synthetic set)."""
    root = tmp_path_factory.mktemp("www")
    for name in ("ratings_train.txt", "ratings_test.txt"):
        source = NSMC_DIR / name
        lines = (source.read_text(encoding="utf-8").splitlines(keepends=True)[1:2001] if source.exists()
                 else [f"{i}\t리뷰 {i} 정말 {'좋다' if i % 2 else '별로'}\t{i % 2}\n" for i in range(2000)])
        (root / name).write_text(HEADER + "".join(lines), encoding="utf-8")
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    sources = {split: Source(name, base + name, hashlib.sha256((root / name).read_bytes()).hexdigest())
               for split, name in (("train", "ratings_train.txt"), ("test", "ratings_test.txt"))}
    yield sources, hits, root
    server.shutdown()


def test_download_checks_and_caches(served, tmp_path):
    sources, hits, root = served
    hits.clear()
    files = nsmc_files(None, tmp_path / "cache", sources)
    assert files["train"].read_bytes() == (root / "ratings_train.txt").read_bytes()
    assert len(read_nsmc(files["test"])) == 2000
    assert sorted(hits) == ["/ratings_test.txt", "/ratings_train.txt"]
    nsmc_files(None, tmp_path / "cache", sources)  # the verified cache is used, nothing fetched again
    assert len(hits) == 2


def test_checksum_mismatch_is_refused_and_nothing_is_kept(served, tmp_path):
    sources, _, _ = served
    bad = {"train": Source("ratings_train.txt", sources["train"].url, "0" * 64)}
    with pytest.raises(UserError, match="SHA-256") as err:
        nsmc_files(None, tmp_path / "cache", bad)
    assert "ratings_train.txt" in str(err.value) and "--data-dir" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_source_is_one_clear_error(tmp_path):
    port = free_port()  # closed once the block ends: connection refused
    gone = {"train": Source("ratings_train.txt", f"http://127.0.0.1:{port}/ratings_train.txt", "")}
    with pytest.raises(UserError, match="--data-dir"):
        nsmc_files(None, tmp_path / "cache", gone)


def test_data_dir_missing_file_names_it(tmp_path):
    (tmp_path / "ratings_train.txt").write_text(HEADER + "1\t좋다\t1\n", encoding="utf-8")
    with pytest.raises(UserError, match="ratings_test.txt"):
        nsmc_files(str(tmp_path))


@pytest.mark.parametrize("content, where", [
    ("id,document,label\n1,좋다,1\n", "첫 줄"),
    (HEADER + "1\t좋다\t1\n2\t별로\tmaybe\n", ":3:"),
    (HEADER, "한 줄도"),
])
def test_malformed_file_is_one_line_naming_the_file(tmp_path, content, where):
    path = tmp_path / "ratings_train.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=where) as err:
        read_nsmc(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_empty_documents_are_skipped_like_the_official_files(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text(HEADER + "1\t\t1\n2\t좋다\t1\n", encoding="utf-8")
    assert read_nsmc(path) == [("좋다", 1)]


def test_train_without_the_hub_fails_fast_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    data = tmp_path / "data"
    data.mkdir()
    for name in ("ratings_train.txt", "ratings_test.txt"):
        (data / name).write_text(HEADER + "1\t좋다\t1\n2\t별로\t0\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--pretrained", "someone/kogpt2-like", "--data-dir", str(data), "--out", str(out)])
    message = str(exit_.value.code)
    assert "--pretrained" in message and "\n" not in message
    assert not out.exists()


def test_train_with_missing_data_dir_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--from-scratch", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "ratings_train.txt" in str(exit_.value.code) and not (tmp_path / "o").exists()
