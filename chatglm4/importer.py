"""Bulk import of books into the catalogue:

    python serveapi.py import FILE [--database-url URL]

FILE is `.csv` (a header row naming any of title, author, subjects, year, isbn, description; title
required; subjects in one cell separated by ';' or '|') or `.jsonl` (one object a line with the fields
of protocol.NewBook; subjects a list or a ';'-separated string). An `id` column or field is accepted
and ignored: the catalogue numbers its books itself.

The file is streamed twice. The first pass validates every line, so a malformed one (named by file
and line number) stops the import before anything is written; the second inserts in batches with
insert-or-ignore on the title, so importing the same file again adds nothing."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from tqdm import tqdm

from .catalogue import Catalogue, CatalogueUnavailable, load_seed_titles
from .config import GatewayConfig
from .protocol import NewBook

log = logging.getLogger(__name__)

FIELDS = ("title", "author", "subjects", "year", "isbn", "description")
# Exports of another catalogue carry ids; this catalogue gives its own.
IGNORED_FIELDS = ("id",)
FORMATS = (".csv", ".jsonl")
_SUBJECT_SEPARATORS = (";", "|")


@dataclass(frozen=True)
class ImportReport:
    path: str
    lines: int  # book records read (header and blank lines not counted)
    added: int  # books inserted
    present: int  # records whose title was already in the catalogue (or earlier in the file)


class ImportFileError(ValueError):
    """A line of the file cannot be imported; nothing has been written."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        super().__init__(f"{path}, line {line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


# -- reading ----------------------------------------------------------------------------------


def _decoded(path: Path, fh: BinaryIO) -> Iterator[str]:
    """The file's lines as text; a line that is not UTF-8 is an error naming that line."""
    for number, raw in enumerate(fh, start=1):
        try:
            # utf-8-sig on the first line drops the BOM spreadsheet programs write.
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ImportFileError(path, number, "not UTF-8 text") from None


def _split_subjects(value: str) -> list[str]:
    for separator in _SUBJECT_SEPARATORS[1:]:
        value = value.replace(separator, _SUBJECT_SEPARATORS[0])
    return [s.strip() for s in value.split(_SUBJECT_SEPARATORS[0]) if s.strip()]


def _csv_header(path: Path, reader: csv.DictReader) -> list[str]:
    names = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    if not any(names):
        raise ImportFileError(path, 1, f"a header row is required (columns: {', '.join(FIELDS)})")
    unknown = [n for n in names if n not in FIELDS + IGNORED_FIELDS]
    if unknown:
        raise ImportFileError(path, 1, f"unknown column {unknown[0]!r} (known: {', '.join(FIELDS)})")
    if "title" not in names:
        raise ImportFileError(path, 1, "the header has no title column")
    if len(set(names)) != len(names):
        raise ImportFileError(path, 1, "a column is named twice in the header")
    return names


def _csv_fields(path: Path, line: int, row: dict[str | None, Any]) -> dict[str, Any]:
    if None in row:  # DictReader files the surplus cells of a long row under None
        raise ImportFileError(path, line, "more cells than the header has columns")
    # An empty cell means "not given"; DictReader fills the cells of a short row with None.
    cells = {k: v.strip() for k, v in row.items() if k in FIELDS and v and v.strip()}
    if "subjects" in cells:
        cells["subjects"] = _split_subjects(cells["subjects"])
    if "year" in cells:
        try:
            cells["year"] = int(cells["year"])
        except ValueError:
            raise ImportFileError(path, line, f"year: {cells['year']!r} is not a whole number") from None
    return cells


def _csv_records(path: Path, fh: BinaryIO) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(_decoded(path, fh))
    reader.fieldnames = _csv_header(path, reader)
    for row in reader:
        if None not in row and not any(v and v.strip() for v in row.values()):
            continue  # a row of empty cells is a blank line a spreadsheet left behind
        # line_num is where the record ends; a quoted cell may span lines.
        yield reader.line_num, _csv_fields(path, reader.line_num, row)


def _jsonl_records(path: Path, fh: BinaryIO) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(_decoded(path, fh), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ImportFileError(path, number, f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ImportFileError(path, number, f"expected a JSON object, got {type(record).__name__}")
        for name in IGNORED_FIELDS:
            record.pop(name, None)
        if isinstance(record.get("subjects"), str):
            record["subjects"] = _split_subjects(record["subjects"])
        yield number, record


def _describe(error: ValidationError) -> str:
    """pydantic's errors as one short line: 'year: Input should be a valid integer'."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            message = f"unknown field (known: {', '.join(FIELDS)})"
        elif item["type"] == "missing":
            message = "required"
        else:
            message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def read_books(path: str | os.PathLike) -> Iterator[tuple[int, NewBook]]:
    """(line number, book) for every record of the file, streamed; ImportFileError at the first
    malformed one, ValueError for a file that is neither .csv nor .jsonl."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")
    records = _csv_records if suffix == ".csv" else _jsonl_records
    with open(path, "rb") as fh:
        for line, fields in records(path, fh):
            try:
                # Strict: a year of "1999" or a title of 42 in JSON is a mistake, not something to guess.
                yield line, NewBook.model_validate(fields, strict=True)
            except ValidationError as error:
                raise ImportFileError(path, line, _describe(error)) from None


# -- importing --------------------------------------------------------------------------------


def _bar(progress: bool, **kwargs: Any) -> tqdm:
    return tqdm(file=sys.stderr, disable=not progress, unit=" books", **kwargs)


def check_file(path: str | os.PathLike, *, progress: bool = False) -> int:
    """The number of book records in the file once every one of them is valid."""
    count = 0
    # leave=False: the bar is wiped at the end, so an error line after it stands alone.
    with _bar(progress, desc="checking", leave=False) as bar:
        for _ in read_books(path):
            count += 1
            bar.update()
    return count


def import_file(catalogue: Catalogue, path: str | os.PathLike, *, batch: int = 2000,
                progress: bool = True) -> ImportReport:
    """Imports every book of the file, or none when a line is malformed (ImportFileError)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    total = check_file(path, progress=progress)
    added = 0
    pending: list[NewBook] = []
    with _bar(progress, desc="importing", total=total) as bar:
        for _, book in read_books(path):
            pending.append(book)
            if len(pending) >= batch:
                added += catalogue.insert_new(pending)
                bar.update(len(pending))
                pending = []
        added += catalogue.insert_new(pending)
        bar.update(len(pending))
    log.info("imported %s: %d records, %d added", path, total, added)
    return ImportReport(path=str(path), lines=total, added=added, present=total - added)


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serveapi.py import",
        description="Bulk-import books from a .csv (header: title, author, subjects, year, isbn, "
                    "description) or .jsonl file into the catalogue; idempotent.")
    parser.add_argument("file", help="the .csv or .jsonl file")
    parser.add_argument("--database-url", default=None,
                        help="SQLAlchemy URL of the catalogue (env DATABASE_URL; default "
                             f"{GatewayConfig.database_url})")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"import: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """The import command: 0 on success, 1 when the file or the database fails, 2 for usage errors."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # argparse has printed the usage and its message
        return 0 if stop.code in (0, None) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.file)
    if path.suffix.lower() not in FORMATS:
        return _fail(f"{path}: unsupported file type; use .csv or .jsonl", 2)
    if not path.is_file():
        return _fail(f"{path}: no such file", 2)
    url = args.database_url or os.environ.get("DATABASE_URL") or GatewayConfig.database_url
    try:
        # Seeds go only into a brand-new table, as when the gateway creates it.
        catalogue = Catalogue(url, seed_titles=load_seed_titles())
    except (ValueError, sa_exc.ArgumentError) as error:
        return _fail(f"database URL: {error}", 2)
    began = time.perf_counter()
    try:
        catalogue.init_schema()
        report = import_file(catalogue, path)
    except (ImportFileError, CatalogueUnavailable) as error:
        return _fail(f"{error}; nothing was imported" if isinstance(error, ImportFileError) else str(error), 1)
    except OSError as error:
        return _fail(f"cannot read {path}: {error.strerror or error}", 1)
    finally:
        catalogue.dispose()
    print(f"imported {path}: {report.lines} books read, {report.added} added, "
          f"{report.present} already present ({time.perf_counter() - began:.1f} s)")
    return 0
