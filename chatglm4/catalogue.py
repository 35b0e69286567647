"""The library catalogue behind one SQLAlchemy URL: SQLite by default, MySQL/MariaDB (pymysql) in
production, one Core 2.x code path for both. Values always travel as bound parameters; any failure to
reach or talk to the database surfaces as `CatalogueUnavailable`.

Beside the `book` table the catalogue keeps `book_change`, a log filled by triggers on `book`, so the
writes of every process - another gateway, the import command, SQL typed straight into the database -
can be followed with `change_cursor()` / `changes_since()` instead of reloading the whole table."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from sqlalchemy import (CHAR, BigInteger, Column, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, delete, event, func, insert, inspect, select,
                        text, update)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.schema import CreateColumn, CreateTable

from .protocol import Book, BookPatch, NewBook

log = logging.getLogger(__name__)

DEFAULT_SEED_PATH = Path(__file__).resolve().parent / "data" / "seed_books.txt"
MAX_TITLE_LENGTH = 255

# Keeps IN lists and VALUES batches well under SQLite's bound-parameter limit on old builds.
_CHUNK = 500
# Two writers racing on the same titles lose at most a few rounds; past this something else is wrong.
_ADD_ATTEMPTS = 5
# Schema creation racing another process on SQLite: a few short retries settle it.
_SCHEMA_ATTEMPTS = 5
# Old change-log rows are deleted this many at a time, so pruning never holds one huge transaction.
_PRUNE_CHUNK = 50_000
# Seconds a MySQL schema statement may run (ALTER TABLE copies the table).
_SCHEMA_TIMEOUT = 3600
_MYSQL_UNKNOWN_DATABASE = 1049
_MYSQL_DEADLOCK = 1213
# Table exists, duplicate column, duplicate key name, multiple primary key, trigger exists: what a
# concurrent init_schema that got there first leaves behind.
_MYSQL_ALREADY_EXISTS = {1050, 1060, 1061, 1068, 1359}
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_$]+")
# The id column's range (MySQL INT, SQLite INTEGER): ids outside it cannot exist, and binding them
# would be a driver error (SQLite overflows on Python ints past 64 bits).
_ID_RANGE = {"mysql": (-2 ** 31, 2 ** 31 - 1), "sqlite": (-2 ** 63, 2 ** 63 - 1)}
_SUBJECT_SEPARATORS = re.compile(r"[;|]")

_UTF8MB4 = {"charset": "utf8mb4", "collation": "utf8mb4_unicode_ci"}


def _varchar(length: int) -> String:
    # The charset is spelled out so columns added to an old latin1 table still hold Chinese.
    return String(length).with_variant(mysql.VARCHAR(length, **_UTF8MB4), "mysql", "mariadb")


def _text() -> Text:
    return Text().with_variant(mysql.TEXT(**_UTF8MB4), "mysql", "mariadb")


_metadata = MetaData()
book_table = Table(
    "book",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Binary collation on MySQL so uniqueness and lookups are exact, as on SQLite: under
    # utf8mb4_unicode_ci "Abc" = "abc" and a full-width colon equals an ASCII one.
    Column("title",
           String(MAX_TITLE_LENGTH).with_variant(
               mysql.VARCHAR(MAX_TITLE_LENGTH, charset="utf8mb4", collation="utf8mb4_bin"),
               "mysql", "mariadb"),
           nullable=False),
    Column("author", _varchar(255)),
    Column("subjects", _text()),  # a JSON array of strings; NULL when there are none
    Column("year", Integer),
    Column("isbn", _varchar(32)),
    Column("description", _text()),
    UniqueConstraint("title", name="uq_book_title"),
    # AUTOINCREMENT stops SQLite reusing the id of a deleted last row, which would let a
    # delete-then-add look like an update to anyone holding the old row.
    sqlite_autoincrement=True,
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_unicode_ci",
)

change_table = Table(
    "book_change",
    _metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("book_id", Integer, nullable=False),
    Column("op", CHAR(1), nullable=False),  # 'i', 'u' or 'd'
    # Without AUTOINCREMENT SQLite would hand out seqs again after pruning emptied the end of the log.
    sqlite_autoincrement=True,
    mysql_engine="InnoDB",
)

# MySQL only. InnoDB hands out auto-increment values at insert time but transactions commit in any
# order, so a reader could see seq 11 committed, move its cursor past 10 and never see 10. Every
# trigger (and every writer of ours, first thing) locks this one row, so writers to `book` take turns
# and seqs become visible in order. SQLite has a single writer already.
change_lock_table = Table(
    "book_change_lock",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("n", BigInteger, nullable=False),
    mysql_engine="InnoDB",
)

_SQLITE_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS book_change_ai AFTER INSERT ON book BEGIN "
    "INSERT INTO book_change (book_id, op) VALUES (NEW.id, 'i'); END",
    # An UPDATE that changes the id is a delete of the old id as far as a reader is concerned.
    "CREATE TRIGGER IF NOT EXISTS book_change_au AFTER UPDATE ON book BEGIN "
    "INSERT INTO book_change (book_id, op) SELECT OLD.id, 'd' WHERE OLD.id <> NEW.id; "
    "INSERT INTO book_change (book_id, op) VALUES (NEW.id, 'u'); END",
    "CREATE TRIGGER IF NOT EXISTS book_change_ad AFTER DELETE ON book BEGIN "
    "INSERT INTO book_change (book_id, op) VALUES (OLD.id, 'd'); END",
]
_MYSQL_TAKE_TURN = "UPDATE book_change_lock SET n = n + 1 WHERE id = 1;"
_MYSQL_TRIGGERS = {
    "book_change_ai": "CREATE TRIGGER book_change_ai AFTER INSERT ON book FOR EACH ROW BEGIN "
                      f"{_MYSQL_TAKE_TURN} "
                      "INSERT INTO book_change (book_id, op) VALUES (NEW.id, 'i'); END",
    "book_change_au": "CREATE TRIGGER book_change_au AFTER UPDATE ON book FOR EACH ROW BEGIN "
                      f"{_MYSQL_TAKE_TURN} "
                      "IF NEW.id <> OLD.id THEN "
                      "INSERT INTO book_change (book_id, op) VALUES (OLD.id, 'd'); END IF; "
                      "INSERT INTO book_change (book_id, op) VALUES (NEW.id, 'u'); END",
    "book_change_ad": "CREATE TRIGGER book_change_ad AFTER DELETE ON book FOR EACH ROW BEGIN "
                      f"{_MYSQL_TAKE_TURN} "
                      "INSERT INTO book_change (book_id, op) VALUES (OLD.id, 'd'); END",
}

T = TypeVar("T")


class CatalogueUnavailable(Exception):
    """The database cannot be reached or answered with an operational error."""


class TitleConflict(ValueError):
    """Another book already has this title."""

    def __init__(self, title: str):
        super().__init__(f"another book already has the title {title!r}")
        self.title = title


@dataclass(frozen=True)
class Changes:
    """What changed in the catalogue after a cursor (see Catalogue.changes_since)."""

    upserted: list[Book] = field(default_factory=list)  # current rows of books inserted or updated
    deleted: list[int] = field(default_factory=list)  # ids that no longer exist
    cursor: int = 0  # pass this to the next changes_since call
    # False when the log no longer reaches back to the cursor given: reload everything, then go on
    # from `cursor`.
    complete: bool = True


def load_seed_titles(path: str | os.PathLike | None = None) -> list[str]:
    """The non-empty, stripped lines of the seed file (default: data/seed_books.txt beside this module)."""
    seed_path = Path(path) if path is not None else DEFAULT_SEED_PATH
    with open(seed_path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh if line.strip()]


def _normalise(titles: Iterable[str]) -> list[str]:
    """The titles stripped, in order, duplicates kept; TypeError/ValueError for unusable ones."""
    if isinstance(titles, str):
        # A bare string would otherwise be added one character at a time.
        raise TypeError("titles must be a list of strings, not a string")
    stripped = []
    for raw in titles:
        if not isinstance(raw, str):
            raise TypeError(f"title must be a string, got {type(raw).__name__}")
        title = raw.strip()
        if not title:
            raise ValueError("title must not be empty")
        if len(title) > MAX_TITLE_LENGTH:
            raise ValueError(f"title longer than {MAX_TITLE_LENGTH} characters")
        stripped.append(title)
    return stripped


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _driver_code(error: sa_exc.DBAPIError) -> int | None:
    """The numeric server error code pymysql carries in args[0], if any."""
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _already_exists(error: sa_exc.DBAPIError) -> bool:
    """True for the error a DDL statement gets when a concurrent init_schema did the same first."""
    code = _driver_code(error)
    if code is not None:
        return code in _MYSQL_ALREADY_EXISTS
    message = str(error.orig).lower()
    return "duplicate column" in message or "already exists" in message


def _reason(error: BaseException) -> str:
    """A one-line cause without SQL, parameters or credentials."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", ())
    # pymysql puts (code, message); sqlite3 just the message.
    if len(args) >= 2 and isinstance(args[0], int):
        message = f"({args[0]}) {args[1]}"
    else:
        message = str(orig)
    message = " ".join(message.split())
    return message[:200] or type(orig).__name__


# -- rows <-> books ---------------------------------------------------------------------------


def _subjects_to_db(subjects: list[str]) -> str | None:
    return json.dumps(subjects, ensure_ascii=False) if subjects else None


def _subjects_from_db(value: Any) -> list[str]:
    """The stored JSON array; tolerant of NULL and of "a;b" typed straight into the database."""
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = _SUBJECT_SEPARATORS.split(str(value))
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, list):
        return []
    return [s for s in (str(item).strip() for item in parsed if item is not None) if s]


def _int_or_none(value: Any) -> int | None:
    # SQLite stores whatever raw SQL gives it; a year of 'abc' must not break every read.
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _book(row: Any) -> Book:
    return Book(id=int(row.id), title=row.title or "", author=row.author,
                subjects=_subjects_from_db(row.subjects), year=_int_or_none(row.year),
                isbn=row.isbn, description=row.description)


def _column_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validated book fields as column values (subjects as JSON text)."""
    values = dict(fields)
    if "subjects" in values:
        values["subjects"] = _subjects_to_db(values["subjects"] or [])
    return values


def _new_book_values(book: NewBook) -> dict[str, Any]:
    return _column_values(book.model_dump())


def _as_new_book(book: NewBook | Mapping[str, Any]) -> NewBook:
    return book if isinstance(book, NewBook) else NewBook.model_validate(book)


class Catalogue:
    """The book table behind one SQLAlchemy URL; every method is safe to call from many threads."""

    def __init__(self, url: str, *, seed_titles: list[str] | None = None):
        """Stores settings and builds the engine; touches neither network nor disk."""
        self._url: URL = make_url(url)
        backend = self._url.get_backend_name()
        if backend == "mariadb":
            backend = "mysql"
        if backend not in ("sqlite", "mysql"):
            raise ValueError(f"unsupported catalogue backend {backend!r}; use sqlite or mysql")
        if backend == "mysql" and not self._url.database:
            raise ValueError("the MySQL catalogue URL must name a database")
        self._backend = backend
        self._id_min, self._id_max = _ID_RANGE[backend]
        self._seed_titles = list(seed_titles) if seed_titles is not None else None
        self._engine = self._make_engine(self._url)

    # -- engine ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The dialect family in use: "sqlite" or "mysql" (MariaDB included)."""
        return self._backend

    def _is_memory(self) -> bool:
        return self._url.database in (None, "", ":memory:")

    def _make_engine(self, url: URL, *, one_off: bool = False, timeout: int = 10) -> Engine:
        if self._backend == "mysql":
            kwargs: dict = {
                "pool_pre_ping": True,
                "pool_recycle": 3600,
                "connect_args": {"connect_timeout": 5, "read_timeout": timeout, "write_timeout": timeout,
                                 "charset": "utf8mb4"},
            }
            if one_off:
                # Used once (to create the database, to upgrade the schema); a pool would only linger.
                kwargs["poolclass"] = NullPool
            return create_engine(url, **kwargs)

        kwargs = {"pool_pre_ping": True, "connect_args": {"check_same_thread": False}}
        if self._is_memory():
            # Each new in-memory connection is a fresh empty database; one shared connection
            # makes every thread see the same one.
            kwargs["poolclass"] = StaticPool
            return create_engine(url, **kwargs)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine

    def dispose(self) -> None:
        """Closes every pooled connection; the catalogue reconnects on next use."""
        self._engine.dispose()

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turns connection-level failures into CatalogueUnavailable."""
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as error:
            reason = _reason(error)
            log.warning("catalogue %s failed on %s: %s", action, self._backend, reason)
            raise CatalogueUnavailable(f"catalogue database unavailable ({action}): {reason}") from error

    def _id_in_range(self, book_id: int) -> bool:
        return self._id_min <= book_id <= self._id_max

    # -- schema ------------------------------------------------------------------------------

    def init_schema(self) -> None:
        """Creates or upgrades in place everything the catalogue needs; seeds only a new table.

        Idempotent, and safe while another process runs it too: each step checks first and takes
        "already exists" from a concurrent run as done."""
        with self._guard("init_schema"):
            for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
                try:
                    return self._init_schema_once()
                except sa_exc.OperationalError as error:
                    # SQLite answers a read lock that cannot become a write lock (two processes
                    # creating the schema at once) with "database is locked" at once, without
                    # waiting for busy_timeout: the loser steps back and looks again.
                    if self._backend != "sqlite" or "locked" not in str(error.orig) or attempt == _SCHEMA_ATTEMPTS:
                        raise
                    log.debug("init_schema found the database locked (attempt %d); retrying", attempt)
                    time.sleep(0.1 * attempt)

    def _init_schema_once(self) -> None:
        if self._backend == "sqlite":
            self._ensure_sqlite_folder()
        else:
            self._ensure_mysql_database()
        engine = self._schema_engine()
        try:
            if not self._create_book_table(engine):
                self._upgrade_book_table(engine)
            self._ensure_change_log(engine)
        finally:
            if engine is not self._engine:
                engine.dispose()

    def _schema_engine(self) -> Engine:
        """The engine for schema work: on MySQL one without the 10 s read timeout that keeps ordinary
        queries from hanging, since rebuilding a big old table for its new id column takes longer."""
        if self._backend == "sqlite":
            return self._engine
        return self._make_engine(self._url, one_off=True, timeout=_SCHEMA_TIMEOUT)

    def _ensure_sqlite_folder(self) -> None:
        if self._is_memory() or self._url.query.get("uri"):
            return
        parent = Path(self._url.database).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CatalogueUnavailable(
                f"catalogue database unavailable (init_schema): cannot create folder {parent}: "
                f"{error.strerror or error}") from error

    def _ensure_mysql_database(self) -> None:
        try:
            with self._engine.connect():
                return
        except sa_exc.OperationalError as error:
            if _driver_code(error) != _MYSQL_UNKNOWN_DATABASE:
                raise
        name = self._url.database
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"refusing to create database {name!r}: only [A-Za-z0-9_$] allowed")
        # URL.set() ignores None, so the server-level URL is rebuilt without the database.
        u = self._url
        server_url = URL.create(u.drivername, username=u.username, password=u.password,
                                host=u.host, port=u.port, query=u.query)
        server = self._make_engine(server_url, one_off=True)
        try:
            # Identifiers cannot be bound parameters; the name is whitelisted above and quoted.
            quoted = server.dialect.identifier_preparer.quote_identifier(name)
            with server.begin() as conn:
                conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {quoted} "
                                  "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
            log.info("created catalogue database %s", name)
        finally:
            server.dispose()

    def _create_book_table(self, engine: Engine) -> bool:
        """Creates and seeds the book table when there is none; False when it already existed."""
        seeds = list(dict.fromkeys(_normalise(self._seed_titles or [])))
        try:
            with engine.begin() as conn:
                if inspect(conn).has_table(book_table.name):
                    return False
                # IF NOT EXISTS: another process may create it between the check and here.
                conn.execute(CreateTable(book_table, if_not_exists=True))
                log.info("created catalogue table %s", book_table.name)
                for batch in _chunks(seeds):
                    conn.execute(insert(book_table), [{"title": t} for t in batch])
                if seeds:
                    log.info("seeded catalogue with %d titles", len(seeds))
        except sa_exc.IntegrityError:
            # A concurrent init_schema created and seeded the table first; its seed stands.
            log.info("catalogue table was seeded concurrently; keeping that seed")
        return True

    def _upgrade_book_table(self, engine: Engine) -> None:
        """Brings an existing book table (the original demo's `title char(255)`, or an (id, title)
        table) to today's shape in place: rows are kept, the table is never recreated."""
        self._add_missing_columns(engine)
        if self._backend == "mysql":
            self._convert_mysql_title(engine)
        self._ensure_title_index(engine)

    @staticmethod
    def _columns(engine: Engine, table: str) -> set[str]:
        with engine.connect() as conn:
            return {c["name"].lower() for c in inspect(conn).get_columns(table)}

    def _add_missing_columns(self, engine: Engine) -> None:
        # A concurrent upgrade may add some columns between our look and our ALTER: look again.
        for _ in range(3):
            present = self._columns(engine, book_table.name)
            if "title" not in present:
                raise CatalogueUnavailable("catalogue table book exists but has no title column")
            missing = [c for c in book_table.columns if c.name not in present]
            if not missing:
                return
            try:
                self._alter_add(engine, missing)
                log.info("upgraded table book: added %s", ", ".join(c.name for c in missing))
            except sa_exc.DBAPIError as error:
                if not _already_exists(error):
                    raise
                log.info("table book is being upgraded concurrently; looking again")

    def _alter_add(self, engine: Engine, columns: list[Column]) -> None:
        dialect = engine.dialect
        specs = []
        for column in columns:
            spec = str(CreateColumn(column).compile(dialect=dialect))
            if column.name == "id":
                if self._backend == "sqlite":
                    raise CatalogueUnavailable("catalogue table book has no id column, and SQLite "
                                               "cannot add a primary key in place")
                # FIRST and PRIMARY KEY: InnoDB numbers the existing rows in their stored order.
                spec += " PRIMARY KEY FIRST"
            specs.append(spec)
        with engine.begin() as conn:
            if self._backend == "mysql":
                # One ALTER: a single table rebuild however many columns are missing.
                conn.execute(text("ALTER TABLE book ADD COLUMN " + ", ADD COLUMN ".join(specs)))
            else:
                for spec in specs:  # SQLite adds one column per statement
                    conn.execute(text("ALTER TABLE book ADD COLUMN " + spec))

    def _convert_mysql_title(self, engine: Engine) -> None:
        """The demo's `title char(255)` (maybe latin1, case-insensitive) becomes VARCHAR(255)
        utf8mb4_bin NOT NULL, so uniqueness and lookups are exact."""
        with engine.connect() as conn:
            found = conn.execute(text(
                "SELECT DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, COLLATION_NAME, IS_NULLABLE "
                "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = :table AND COLUMN_NAME = 'title'"), {"table": book_table.name}).one()
            has_null = conn.execute(select(1).select_from(book_table)
                                    .where(book_table.c.title.is_(None)).limit(1)).first() is not None
        kind, length, collation, nullable = (found[0].lower(), found[1], found[2], found[3] == "YES")
        exact = kind == "varchar" and length == MAX_TITLE_LENGTH and collation == "utf8mb4_bin"
        # NOT NULL is wanted too, unless titleless rows exist: they stay, so the column stays nullable.
        if exact and (not nullable or has_null):
            return
        if kind not in ("char", "varchar") or (length or 0) > MAX_TITLE_LENGTH:
            log.warning("book.title is %s(%s); leaving it as it is", kind, length)
            return
        column = book_table.c.title
        if has_null:
            # Rows are never dropped; titleless rows keep the column nullable.
            log.warning("some books have no title; book.title stays nullable")
            column = Column("title", column.type, nullable=True)
        spec = str(CreateColumn(column).compile(dialect=engine.dialect))
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE book MODIFY COLUMN " + spec))
        log.info("upgraded book.title from %s(%s) %s to VARCHAR(255) utf8mb4_bin", kind, length, collation)

    @staticmethod
    def _title_is_unique(engine: Engine) -> bool:
        with engine.connect() as conn:
            inspector = inspect(conn)
            keys = [i["column_names"] for i in inspector.get_indexes(book_table.name) if i["unique"]]
            keys += [u["column_names"] for u in inspector.get_unique_constraints(book_table.name)]
        return any([c.lower() for c in key] == ["title"] for key in keys)

    def _ensure_title_index(self, engine: Engine) -> None:
        if self._title_is_unique(engine):
            return
        title = book_table.c.title
        with engine.connect() as conn:
            duplicate = conn.execute(select(title).group_by(title).having(func.count() > 1).limit(1)).first()
        if duplicate is not None:
            log.warning("book titles are not unique (e.g. %r): no unique index on title; adding a "
                        "title that exists twice keeps both rows", duplicate.title)
            return
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE UNIQUE INDEX uq_book_title ON book (title)"))
            log.info("added unique index on book.title")
        except sa_exc.IntegrityError:
            log.warning("a duplicate title arrived while indexing book.title; going on without the index")
        except sa_exc.DBAPIError as error:
            if not _already_exists(error):
                raise

    def _ensure_change_log(self, engine: Engine) -> None:
        with engine.begin() as conn:
            conn.execute(CreateTable(change_table, if_not_exists=True))
            if self._backend == "mysql":
                conn.execute(CreateTable(change_lock_table, if_not_exists=True))
                conn.execute(insert(change_lock_table).prefix_with("IGNORE").values(id=1, n=0))
        if self._backend == "sqlite":
            with engine.begin() as conn:
                for sql in _SQLITE_TRIGGERS:
                    conn.execute(text(sql))
            return
        self._ensure_mysql_triggers(engine)

    @staticmethod
    def _ensure_mysql_triggers(engine: Engine) -> None:
        with engine.connect() as conn:
            present = set(conn.execute(text(
                "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
                "WHERE TRIGGER_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = :table"),
                {"table": book_table.name}).scalars())
        for name, sql in _MYSQL_TRIGGERS.items():
            if name in present:
                continue
            try:
                with engine.begin() as conn:
                    conn.execute(text(sql))
                log.info("created trigger %s", name)
            except sa_exc.DBAPIError as error:
                if not _already_exists(error):
                    raise

    # -- reads -------------------------------------------------------------------------------

    def list(self, offset: int = 0, limit: int = 50) -> tuple[list[Book], int]:
        """One page of books ordered by id, and the total number of books."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        with self._guard("list"), self._engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(book_table)).scalar_one()
            rows = conn.execute(select(book_table).order_by(book_table.c.id)
                                .offset(offset).limit(limit)).all()
        return [_book(r) for r in rows], int(total)

    def iter_books(self, batch: int = 10_000) -> Iterator[list[Book]]:
        """Every book in id order, `batch` at a time, by keyset pagination: one short query per
        batch, so neither the table nor a long transaction is held."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        after: int | None = None
        while True:
            stmt = select(book_table).order_by(book_table.c.id).limit(batch)
            if after is not None:
                stmt = stmt.where(book_table.c.id > after)
            with self._guard("iter_books"), self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if rows:
                yield [_book(r) for r in rows]
            if len(rows) < batch:
                return
            after = int(rows[-1].id)

    def all(self) -> list[Book]:
        """Every book ordered by id."""
        return [book for batch in self.iter_books() for book in batch]

    def get_many(self, ids: Iterable[int]) -> list[Book]:
        """The books with these ids that exist, in the order given, each once."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        with self._guard("get_many"), self._engine.connect() as conn:
            found = self._books_by_id(conn, wanted)
        return [found[i] for i in wanted if i in found]

    def _books_by_id(self, conn: Connection, ids: Sequence[int]) -> dict[int, Book]:
        found: dict[int, Book] = {}
        for batch in _chunks([i for i in ids if self._id_in_range(i)]):
            rows = conn.execute(select(book_table).where(book_table.c.id.in_(batch)))
            found.update((int(r.id), _book(r)) for r in rows)
        return found

    def ping(self) -> None:
        """Returns when the database answers SELECT 1; raises CatalogueUnavailable otherwise."""
        with self._guard("ping"), self._engine.connect() as conn:
            conn.execute(select(1)).scalar_one()

    # -- change log ----------------------------------------------------------------------------

    @staticmethod
    def _edge_seq(conn: Connection, *, newest: bool) -> int | None:
        """The highest (or lowest) seq in the log: one probe at an end of the primary key."""
        seq = change_table.c.seq
        value = conn.execute(select(seq).order_by(seq.desc() if newest else seq).limit(1)).scalar()
        return None if value is None else int(value)

    def change_cursor(self) -> int:
        """The newest change's seq (0 when the log is empty): take it before loading everything,
        then follow with changes_since(cursor)."""
        with self._guard("change_cursor"), self._engine.connect() as conn:
            return self._edge_seq(conn, newest=True) or 0

    def changes_since(self, seq: int, limit: int = 10_000) -> Changes:
        """The books changed after `seq`, at most `limit` log entries' worth (call again from the
        returned cursor until it stops moving). Books are reported as they are now, so reading the
        same range twice is harmless."""
        if seq < 0 or limit < 1:
            raise ValueError("seq must not be negative and limit must be at least 1")
        log_seq = change_table.c.seq
        with self._guard("changes_since"), self._engine.connect() as conn:
            # The range first, then the log's ends: a prune in between then shows up as incomplete
            # instead of silently dropping entries.
            entries = conn.execute(select(log_seq, change_table.c.book_id).where(log_seq > seq)
                                   .order_by(log_seq).limit(limit)).all()
            first = self._edge_seq(conn, newest=False)
            last = self._edge_seq(conn, newest=True)
            if not self._log_reaches(seq, first, last):
                return Changes(cursor=last or 0, complete=False)
            ids = list(dict.fromkeys(int(e.book_id) for e in entries))
            current = self._books_by_id(conn, ids)
        return Changes(upserted=[current[i] for i in ids if i in current],
                       deleted=[i for i in ids if i not in current],
                       cursor=int(entries[-1].seq) if entries else seq)

    @staticmethod
    def _log_reaches(seq: int, first: int | None, last: int | None) -> bool:
        """Whether every change after `seq` is still in the log. Conservative: a seq lost to a
        rolled-back write just after `seq` may also read as pruned, costing one reload."""
        if last is None:
            # prune_changes always keeps the newest entry, so an empty log was never pruned; a
            # cursor past it belongs to a database that was emptied or replaced.
            return seq == 0
        if seq > last:
            return False  # the log went backwards: a replaced or restored database
        return first <= seq + 1

    def prune_changes(self, keep: int = 100_000) -> int:
        """Deletes all but the newest `keep` (at least 1) log entries; the number deleted. Readers
        further behind than that get complete=False and reload."""
        keep = max(int(keep), 1)
        seq = change_table.c.seq
        deleted = 0
        with self._guard("prune_changes"):
            while True:
                with self._engine.begin() as conn:
                    first = self._edge_seq(conn, newest=False)
                    last = self._edge_seq(conn, newest=True)
                    if first is None or first > last - keep:
                        break
                    upto = min(last - keep, first + _PRUNE_CHUNK - 1)
                    deleted += conn.execute(delete(change_table).where(seq <= upto)).rowcount
        if deleted:
            log.debug("pruned %d change-log entries", deleted)
        return deleted

    def _prune_quietly(self) -> None:
        """Pruning after a committed write: a failure must not make the write look failed."""
        try:
            self.prune_changes()
        except (CatalogueUnavailable, sa_exc.SQLAlchemyError) as error:
            log.warning("pruning the change log failed: %s", _reason(error))

    # -- writes ------------------------------------------------------------------------------

    def _take_turn(self, conn: Connection) -> None:
        """On MySQL, locks the row every trigger locks, first thing: our writers then queue instead
        of deadlocking on each other's rows halfway through."""
        if self._backend == "mysql":
            conn.execute(select(change_lock_table.c.n).where(change_lock_table.c.id == 1)
                         .with_for_update())

    def _write(self, action: str, work: Callable[[Connection], T], *, retry_duplicates: bool = False) -> T:
        """Runs `work` in one transaction, again when InnoDB picks it as a deadlock victim (or, with
        retry_duplicates, when a concurrent writer committed the same title first)."""
        with self._guard(action):
            for attempt in range(1, _ADD_ATTEMPTS + 1):
                try:
                    with self._engine.begin() as conn:
                        self._take_turn(conn)
                        return work(conn)
                except sa_exc.IntegrityError:
                    if not retry_duplicates:
                        raise
                    # Another writer committed one of these titles after our read; re-read picks it up.
                    log.debug("%s raced on a duplicate title (attempt %d); re-reading", action, attempt)
                except sa_exc.OperationalError as error:
                    if _driver_code(error) != _MYSQL_DEADLOCK:
                        raise
                    # InnoDB aborted us to break a lock cycle with a concurrent writer; the retry is clean.
                    log.debug("%s chosen as deadlock victim (attempt %d); retrying", action, attempt)
            raise CatalogueUnavailable(
                f"catalogue database unavailable ({action}): still conflicting after {_ADD_ATTEMPTS} attempts")

    def add(self, titles: list[str]) -> list[Book]:
        """One Book per requested title in request order; existing titles keep their ids."""
        return self.add_books([NewBook(title=t) for t in _normalise(titles)])

    def add_books(self, books: Sequence[NewBook | Mapping[str, Any]]) -> list[Book]:
        """One Book per requested book, in request order. A title already present keeps its id and
        its stored fields (returned as stored); a title repeated in the call is added once, with the
        fields of its first occurrence."""
        requested = [_as_new_book(b) for b in books]
        if not requested:
            return []
        unique: dict[str, NewBook] = {}
        for book in requested:
            unique.setdefault(book.title, book)
        stored, inserted = self._write("add", lambda conn: self._add_once(conn, unique),
                                       retry_duplicates=True)
        if inserted:
            self._prune_quietly()
        return [stored[b.title] for b in requested]

    @staticmethod
    def _books_by_title(conn: Connection, titles: Sequence[str]) -> dict[str, Book]:
        found: dict[str, Book] = {}
        for batch in _chunks(titles):
            rows = conn.execute(select(book_table).where(book_table.c.title.in_(batch)))
            found.update((r.title, _book(r)) for r in rows)
        return found

    def _add_once(self, conn: Connection, unique: dict[str, NewBook]) -> tuple[dict[str, Book], int]:
        """The stored book of every title, and how many of them this call inserted."""
        stored = self._books_by_title(conn, list(unique))
        missing = [book for title, book in unique.items() if title not in stored]
        for batch in _chunks(missing):
            conn.execute(insert(book_table), [_new_book_values(b) for b in batch])
        if missing:
            stored.update(self._books_by_title(conn, [b.title for b in missing]))
        return stored, len(missing)

    def insert_new(self, books: Sequence[NewBook]) -> int:
        """Inserts, in one transaction, the books whose title is not in the catalogue yet (the first
        of each title within `books`); the number inserted. The bulk path: no ids are read back."""
        unique: dict[str, NewBook] = {}
        for book in books:
            unique.setdefault(book.title, book)
        if self._backend == "sqlite":
            stmt = sqlite_insert(book_table).on_conflict_do_nothing()
        else:
            stmt = insert(book_table).prefix_with("IGNORE")

        def work(conn: Connection) -> int:
            # Titles already present are skipped before inserting: both engines burn an id on every
            # ignored row, and a re-import of the same file then writes nothing at all. The
            # insert-or-ignore still covers a writer that commits a title after this read.
            present = self._present_titles(conn, list(unique))
            rows = [_new_book_values(b) for t, b in unique.items() if t not in present]
            # rowcount of an executemany is the rows inserted; ignored titles count 0.
            return sum(conn.execute(stmt, list(batch)).rowcount for batch in _chunks(rows, 5000))

        added = self._write("import", work) if unique else 0
        if added:
            self._prune_quietly()
        return added

    @staticmethod
    def _present_titles(conn: Connection, titles: Sequence[str]) -> set[str]:
        present: set[str] = set()
        for batch in _chunks(titles):
            present.update(conn.execute(select(book_table.c.title)
                                        .where(book_table.c.title.in_(batch))).scalars())
        return present

    def update(self, book_id: int, changes: Mapping[str, Any]) -> Book | None:
        """Changes the given fields (as in BookPatch: a field given as None is cleared) and returns
        the book as stored; None when no book has this id. TitleConflict when another book has the
        new title; pydantic's ValidationError (a ValueError) for unusable fields."""
        values = _column_values(BookPatch.model_validate(dict(changes)).changes())
        book_id = int(book_id)
        if not self._id_in_range(book_id):
            return None
        title = values.get("title")

        def work(conn: Connection) -> Book | None:
            if title is not None and conn.execute(
                    select(book_table.c.id).where(book_table.c.title == title,
                                                  book_table.c.id != book_id).limit(1)).first():
                raise TitleConflict(title)
            try:
                conn.execute(update(book_table).where(book_table.c.id == book_id).values(values))
            except sa_exc.IntegrityError as error:
                # Only the title is unique: a concurrent writer took it after our check.
                raise TitleConflict(title or "") from error
            row = conn.execute(select(book_table).where(book_table.c.id == book_id)).first()
            return _book(row) if row is not None else None

        return self._write("update", work)

    def delete(self, book_id: int) -> bool:
        """True when a book with this id existed and was removed."""
        book_id = int(book_id)
        if not self._id_in_range(book_id):
            return False
        stmt = delete(book_table).where(book_table.c.id == book_id)
        return self._write("delete", lambda conn: conn.execute(stmt).rowcount > 0)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    """WAL lets readers proceed during a write; busy_timeout makes writers wait instead of failing."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()
