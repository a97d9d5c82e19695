"""Download of Multi30k (task 1, raw text) when ``data.download=multi30k`` and its files are missing.

Files come from the public Multi30k repository (``data/task1/raw``) and are checked against known sha256
sums before they are moved into place, so a truncated or altered download never reaches training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from nmt.config import DataConfig
from nmt.data.sources import DataError, resolve_gz, split_prefix
from nmt.files import temp_file_beside

log = logging.getLogger(__name__)

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"
MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
}
# The same files decompressed, as gunzip leaves them: a folder of these is Multi30k too.
MULTI30K_TEXT_SHA256 = {
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.fr": "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.fr": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
    "test_2016_flickr.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "test_2016_flickr.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test_2016_flickr.fr": "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
}
MULTI30K_LANGUAGES = sorted({name.split(".")[-2] for name in MULTI30K_SHA256})
TIMEOUT_S = 60
CHUNK = 1 << 16


class DownloadError(DataError):
    """Multi30k could not be downloaded or failed its checksum."""


class OfflineError(DownloadError):
    """The download server could not be reached or the transfer broke off."""


def missing_multi30k_files(cfg: DataConfig) -> list[str]:
    """Names of the Multi30k files this config needs that are in neither plain nor gzipped form in DIR."""
    folder = Path(cfg.dir)
    missing = []
    for split in ("train", "valid", "test"):
        for lang in (cfg.src_lang, cfg.tgt_lang):
            plain = f"{split_prefix(cfg, split)}.{lang}"
            if f"{plain}.gz" in MULTI30K_SHA256 and not resolve_gz(folder / plain).exists():
                missing.append(f"{plain}.gz")
    return missing


def _foreign_files(folder: Path) -> list[str]:
    """Files of ``folder`` that are not Multi30k's own, gzipped or not, as their SHA-256 says (dot
    files, folders such as the encoding cache, and README or LICENSE files aside)."""
    if not folder.is_dir():
        return []
    foreign = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper().startswith(("README", "LICENSE")) or path.is_dir():
            continue
        expected = MULTI30K_SHA256.get(path.name) or MULTI30K_TEXT_SHA256.get(path.name)
        if expected is None or _sha256(path) != expected:
            foreign.append(path.name)
    return foreign


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_multi30k(cfg: DataConfig) -> list[Path]:
    """Download the missing Multi30k files the config needs into ``cfg.dir``; returns what was downloaded.

    Only into a folder that is new, empty or holds Multi30k's files alone: a folder with other files
    is the user's own corpus, and is never filled up with Multi30k's (a warning says what is missing)."""
    names = missing_multi30k_files(cfg)
    if not names:
        return []
    folder = Path(cfg.dir)
    foreign = _foreign_files(folder)
    if foreign:  # the user's own corpus: what it lacks is theirs to add, not Multi30k's to fill in
        log.warning(
            "data.dir=%s holds files that are not Multi30k's (%s): nothing is downloaded into it, though %s "
            "%s missing (for Multi30k, give data.dir an empty or new folder)",
            cfg.dir,
            ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else ""),
            ", ".join(names),
            "is" if len(names) == 1 else "are",
        )
        return []
    train = split_prefix(cfg, "train")
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in MULTI30K_LANGUAGES and not resolve_gz(folder / f"{train}.{lang}").exists():
            # Before anything is downloaded: the other language's files alone would not make a corpus.
            raise DownloadError(
                f"Multi30k can be downloaded in {', '.join(MULTI30K_LANGUAGES)}, not {lang!r}; put the "
                f"{lang} files in data.dir={cfg.dir!r} or choose another data.src_lang/data.tgt_lang."
            )
    log.info("downloading Multi30k (%s) into %s", ", ".join(names), folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"could not create data.dir={cfg.dir!r} to download Multi30k into ({e}).") from e
    try:
        return [download_file(MULTI30K_URL + name, folder / name, MULTI30K_SHA256[name]) for name in names]
    except OfflineError as e:
        raise DownloadError(
            f"{e}. Download the files it needs by hand ({', '.join(names)}, from {MULTI30K_URL}; gzipped or "
            f"not) into {folder.resolve()}, or set data.dir to a folder that holds them."
        ) from e
    finally:
        _remove_if_empty(created)  # a mistyped data.dir is not left behind by a failed download


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that a failed download created and left empty."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:  # not empty (something was downloaded), or not ours to remove: stop here
            return


def download_file(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` into ``dest`` (temp file, checksum, then atomic rename) with a progress bar."""
    try:
        fd, tmp = temp_file_beside(dest, ".part")
    except OSError as e:
        raise DownloadError(f"could not write into {dest.parent} to download Multi30k ({e}).") from e
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _fetch(url, out, dest.name)
        # The file's errors, while writing or closing it (the network's are OfflineError).
        except (_WriteFailed, OSError) as e:
            error = e.__cause__ if isinstance(e, _WriteFailed) else e
            raise DownloadError(
                f"could not write {dest} ({getattr(error, 'strerror', None) or error}); make room in "
                f"{dest.parent} or set data.dir to a folder with space for Multi30k (about 2 MB)."
            ) from error
        if digest != sha256:
            raise DownloadError(
                f"downloaded {dest.name} from {url} has sha256 {digest}, expected {sha256}; the file was "
                f"discarded. Retry, or put the Multi30k files in a folder and set data.dir=PATH."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


class _WriteFailed(Exception):
    """Writing the downloaded bytes failed (a full disk, a quota): not the network's doing."""


def _write(out, data: bytes) -> None:
    try:
        out.write(data)
    except OSError as e:
        raise _WriteFailed from e


def _fetch(url: str, out, name: str) -> str:
    """Stream ``url`` into the open file ``out``; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    _write(out, chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:  # the network's: the file's are _WriteFailed
        reason = getattr(e, "reason", None) or e
        raise OfflineError(f"could not download Multi30k ({name}: {reason})") from e
    return digest.hexdigest()
