"""The adapter library file (``library.yml``), validated with pydantic.

Relative paths are resolved from the library file's folder, so the file can
be indexed from anywhere; the collection stores absolute paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import yaml

from mergekit_tada.errors import TadaError

MAX_ROWS = 2000  # rows embedded per adapter (the paper's setting)


class LibraryEntry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str
    samples: str
    text_fields: list[str] = ["text"]
    hint: str = ""  # a task hint put before each row's text ("" = none)


class Library(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    base_model: str
    adapters: list[LibraryEntry] = pydantic.Field(min_length=1)
    max_rows: int = pydantic.Field(MAX_ROWS, ge=1)

    @pydantic.field_validator("adapters")
    @classmethod
    def _unique(cls, entries: list[LibraryEntry]) -> list[LibraryEntry]:
        names = [e.name for e in entries]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"adapter names must be unique: {', '.join(duplicated)}")
        return entries


def load_library(path: str | os.PathLike) -> Library:
    """The library with every path made absolute (relative to the file's folder)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise TadaError(f"{path}: cannot read the library ({error})") from None
    try:
        library = Library.model_validate(data)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}"
            for e in error.errors()
        )
        raise TadaError(f"{path}: invalid library: {problems}") from None
    root = path.resolve().parent

    def absolute(p: str) -> str:
        return str((root / os.path.expanduser(p)).resolve())

    return library.model_copy(
        update={
            "base_model": absolute(library.base_model),
            "adapters": [
                e.model_copy(
                    update={"path": absolute(e.path), "samples": absolute(e.samples)}
                )
                for e in library.adapters
            ],
        }
    )
