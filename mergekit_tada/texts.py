"""Unlabeled text from a user's file: one reader for every method that needs data.

Calibration prompts (``tada``), each adapter's unlabeled text (``tara``,
learned gates) and a library's samples (retrieval) come in the same forms:
``.txt`` (one text per line), ``.jsonl`` (one JSON object per line), ``.json``
(a JSON list of objects or of strings) or a folder written by ``datasets``'
``save_to_disk``; extensions in any case. Rows are built from ``fields``
(joined by ``separator``); empty rows are skipped. Every error names the
file, the line where there is one, and what the data is for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from mergekit_tada.errors import TadaError


def _row_text(row: object, fields: Sequence[str], separator: str) -> str | None:
    if not isinstance(row, dict):
        return None
    parts = []
    for field in fields:
        value = row.get(field)
        if isinstance(value, list | tuple):  # e.g. answer choices
            value = " | ".join(v for v in value if isinstance(v, str)) or None
        if isinstance(value, str):
            parts.append(value)
    return separator.join(parts) if parts else None


def read_texts(
    path: str | os.PathLike,
    what: str,
    fields: Sequence[str] = ("text",),
    separator: str = "\n",
    limit: int | None = None,
) -> list[str]:
    """The non-empty texts of a .txt, .jsonl or saved dataset (first ``limit``).

    ``what`` says what the data is for (``calibration``, ``models[0].data``)
    and starts every error message. A row whose ``fields`` are all missing is
    skipped; a file with no usable row is an error.
    """
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise TadaError(
            f"{what}: {path} does not exist (relative paths are resolved from "
            f"{os.getcwd()})"
        )
    texts: list[str | None] = []
    if os.path.isdir(path):
        texts = _dataset_texts(path, what, fields, separator)
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                content = fh.read()
        except UnicodeDecodeError as error:
            raise TadaError(
                f"{what}: {path} is not UTF-8 text (byte {error.start}); expected "
                ".txt (one text per line), .jsonl or a saved dataset folder"
            ) from None
        except OSError as error:
            raise TadaError(f"{what}: {path}: cannot read ({error.strerror})") from None
        if "\0" in content:
            raise TadaError(f"{what}: {path} is binary, not text")
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise TadaError(
                        f"{what}: {path}:{n}: invalid JSON ({error})"
                    ) from None
        elif suffix == ".json":
            try:
                rows = json.loads(content)
            except json.JSONDecodeError as error:
                raise TadaError(f"{what}: {path}: invalid JSON ({error})") from None
            if not isinstance(rows, list):
                raise TadaError(
                    f"{what}: {path}: expected a JSON list of objects or strings, "
                    f"got a {type(rows).__name__}"
                )
        else:
            rows = content.splitlines()
        texts = [
            r if isinstance(r, str) else _row_text(r, fields, separator) for r in rows
        ]
        if suffix in (".json", ".jsonl") and not any(texts):
            found = sorted({k for r in rows if isinstance(r, dict) for k in r})
            raise TadaError(
                f"{what}: {path} contains no usable text (fields: "
                f"{', '.join(fields)}; the file's fields: {', '.join(found) or 'none'})"
            )
    usable = [t for t in (t.strip() for t in texts if t) if t]
    if not usable:
        raise TadaError(
            f"{what}: {path} contains no usable text"
            + (f" (fields: {', '.join(fields)})" if fields != ("text",) else "")
        )
    return usable[:limit] if limit is not None else usable


def _dataset_texts(
    path: str, what: str, fields: Sequence[str], separator: str
) -> list[str | None]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise TadaError(
            f"{what}: {path} is a folder; reading a dataset saved with "
            "save_to_disk needs the 'datasets' package"
        ) from None
    try:
        data = load_from_disk(path)
    except Exception as error:
        raise TadaError(f"{what}: {path}: not a saved dataset ({error})") from None
    if hasattr(data, "keys") and not hasattr(data, "column_names"):  # DatasetDict
        data = data[next(iter(data.keys()))]
    missing = [f for f in fields if f not in data.column_names]
    if len(missing) == len(fields):
        raise TadaError(
            f"{what}: dataset {path} has no {', '.join(repr(f) for f in fields)} "
            f"column (columns: {', '.join(data.column_names)})"
        )
    return [_row_text(row, fields, separator) for row in data]
