"""Turning a user's INPUT (an image, a folder, or a text file of paths) into a list of image paths."""

from __future__ import annotations

from pathlib import Path

from samkit.errors import InputError
from samkit.image import IMAGE_SUFFIXES


def list_images(spec: str | Path) -> list[Path]:
    """Image paths for `spec`: an image file, a folder (recursive, common image suffixes, sorted) or a
    `.txt` file with one path per line (relative paths are relative to the list file). Raises InputError
    when nothing is found."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {path}")
        return found
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        found = [
            (p if p.is_absolute() else path.parent / p)
            for p in map(Path, lines)
            if str(p) and not str(p).startswith("#")
        ]
        if not found:
            raise InputError(f"list file {path} names no images")
        return found
    if path.is_file():
        return [path]
    raise InputError(f"input not found: {path} (give an image, a folder or a .txt list of paths)")
