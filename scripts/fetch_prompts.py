#!/usr/bin/env python
"""Download the public benchmark prompt lists (MovieGen Video Bench, VBench) into ``prompts/``.

The lists are not stored in this repository; they are published with the Reward-Forcing and
Self-Forcing code. Each file is tried at the Reward-Forcing URL first and the Self-Forcing one
second, checked for the expected number of lines, and written atomically (a failed download never
leaves a truncated list that inference would silently use). Files already present with the right
line count are skipped unless ``--force``.

    python scripts/fetch_prompts.py [--dest prompts] [--force] [--list]
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from reward_forcing.file_io import atomic_write

# Raw-file bases of the two repositories (default branch).
SOURCES = (
    "https://raw.githubusercontent.com/JaydenLyh/Reward-Forcing/main/prompts",
    "https://raw.githubusercontent.com/guandeh17/Self-Forcing/main/prompts",
)
# relative path (under the repo's prompts/ and under --dest) -> expected number of lines
FILES = {
    "MovieGenVideoBench.txt": 1003,
    "MovieGenVideoBench_extended.txt": 1003,
    "vbench/all_dimension.txt": 946,
    "vbench/all_dimension_extended.txt": 946,
}
TIMEOUT_S = 30


def urls_for(relpath: str) -> list[str]:
    """Candidate URLs of one list, in the order they are tried."""
    return [f"{base}/{relpath}" for base in SOURCES]


def count_lines(text: str) -> int:
    """Lines as reward_forcing.data counts them: split on newlines only, final newline optional."""
    lines = text.split("\n")
    return len(lines) - (lines[-1] == "")


def download(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 -- fixed https URLs
        return response.read().decode("utf-8")


def fetch_one(relpath: str, expected_lines: int, dest: Path, force: bool = False) -> str:
    """Fetch one list into ``dest/relpath``; returns a one-line status. Raises RuntimeError on failure."""
    target = dest / relpath
    if target.is_file() and not force:
        n = count_lines(target.read_text(encoding="utf-8"))
        if n == expected_lines:
            return f"{relpath}: already present ({n} lines)"
    errors = []
    for url in urls_for(relpath):
        try:
            text = download(url)
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            continue
        n = count_lines(text)
        if n != expected_lines:
            errors.append(f"{url}: got {n} lines, expected {expected_lines}")
            continue
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write(text)
        return f"{relpath}: {n} lines from {url}"
    raise RuntimeError(f"could not download {relpath}:\n  " + "\n  ".join(errors))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download the MovieGen Video Bench and VBench prompt lists (+ LLM-extended versions).")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "prompts",
                        help="folder to write into (default: the repository's prompts/)")
    parser.add_argument("--force", action="store_true", help="download again even if the files are present")
    parser.add_argument("--list", action="store_true", help="print the files and URLs, download nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for relpath, n in FILES.items():
            print(f"{relpath} ({n} lines): " + " | ".join(urls_for(relpath)))
        return 0
    failures = 0
    for relpath, n in FILES.items():
        try:
            print(fetch_one(relpath, n, args.dest, force=args.force))
        except RuntimeError as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(FILES)} lists failed. Check your network connection (a proxy needs "
              f"HTTPS_PROXY), or download the files by hand from the URLs above into {args.dest}/.",
              file=sys.stderr)
        return 1
    print(f"Prompt lists are in {args.dest}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
