"""NSMC-format reviews: where they come from (a local copy or NSMC's public home), and reading them strictly.

Without `--data-dir`, the official files are downloaded once into a cache directory, with a progress bar, and
checked against their published SHA-256 before use; a partial or altered download is never used.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

HEADER = "id\tdocument\tlabel"
GET_IT = ("NSMC 형식(id<TAB>document<TAB>label, 1=긍정)의 파일이 필요합니다. --data-dir 없이 실행하면 "
          "https://github.com/e9t/nsmc 에서 내려받습니다. (NSMC-format file needed; run without --data-dir to download "
          "it from github.com/e9t/nsmc, or pass --data-dir with ratings_train.txt and ratings_test.txt)")


@dataclass(frozen=True)
class Source:
    name: str  # file name in the data directory and the cache
    url: str
    sha256: str  # "" = not checked (a source a test or a user supplies without a known digest)
    size: int = 0


_BASE = "https://raw.githubusercontent.com/e9t/nsmc/master/"
# Digests and sizes as published for the official files (Hugging Face datasets' `nsmc` record of these URLs).
NSMC_SOURCES = {
    "train": Source("ratings_train.txt", _BASE + "ratings_train.txt",
                    "e03b7d14e9e41be8d464a28057cd25d7396c53e67aa7fd5f7e552c59b0ee2940", 14_628_807),
    "test": Source("ratings_test.txt", _BASE + "ratings_test.txt",
                   "8ac9f64052f11dbf6ae0acb5e038f03d90a76f0eda7820cfb3a92d02edfcebda", 4_893_335),
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kogpt2-sentiment-bot" / "nsmc"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nsmc_files(data_dir: str | None, cache_dir: Path | None = None,
               sources: dict[str, Source] = NSMC_SOURCES) -> dict[str, Path]:
    """{"train": path, "test": path}: the files in `data_dir`, or the verified downloads in the cache."""
    if data_dir:
        files = {split: Path(data_dir) / source.name for split, source in sources.items()}
        for path in files.values():
            if not path.is_file():
                raise UserError(f"데이터 파일이 없습니다: {path}. {GET_IT}")
        return files
    cache = cache_dir or default_cache_dir()
    return {split: fetch(source, cache) for split, source in sources.items()}


def fetch(source: Source, cache: Path) -> Path:
    """The cached copy of `source`, downloaded (and checked) first if it is not there yet."""
    target = cache / source.name
    if target.is_file() and (not source.sha256 or sha256_of(target) == source.sha256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        _download(source, partial)
        if source.sha256 and (got := sha256_of(partial)) != source.sha256:
            raise UserError(f"{source.url} 내려받은 파일의 SHA-256이 다릅니다 ({got[:12]}…, 기대값 "
                            f"{source.sha256[:12]}…). 다시 시도하거나 --data-dir로 확인된 사본을 지정하세요. "
                            f"(checksum mismatch for {source.name}; try again or pass --data-dir)")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download(source: Source, dest: Path) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(source.url, timeout=30) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or source.size or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=source.name, file=sys.stderr,
                      disable=None) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{source.url}에서 내려받지 못했습니다: {reason}. 네트워크를 확인하거나 --data-dir로 로컬 "
                        f"사본을 지정하세요. (download failed; check the network or pass --data-dir)") from None


def read_nsmc(path: Path, limit: int | None = None) -> list[tuple[str, int]]:
    """(document, label) pairs from an NSMC-format TSV (`id<TAB>document<TAB>label`, 1 = positive).

    Rows with an empty document (the official files have a few) are skipped; anything else that does not fit the
    format, or a missing header, is an error naming the file, never silently dropped data.
    """
    rows: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            header = next(fh, "").rstrip("\r\n")
            if header != HEADER:
                raise UserError(f"{path}: 첫 줄이 '{HEADER}'가 아닙니다. {GET_IT}")
            for number, line in enumerate(fh, 2):
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 3 or parts[2] not in ("0", "1"):
                    raise UserError(f"{path}:{number}: NSMC 형식이 아닌 줄입니다 (id, document, label 0/1). {GET_IT}")
                if parts[1].strip():
                    rows.append((parts[1].strip(), int(parts[2])))
                    if limit is not None and len(rows) >= limit:
                        break
    except FileNotFoundError:
        raise UserError(f"데이터 파일이 없습니다: {path}. {GET_IT}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: UTF-8 텍스트가 아닙니다. {GET_IT}") from None
    if not rows:
        raise UserError(f"{path}: 리뷰가 한 줄도 없습니다. {GET_IT}")
    return rows
