"""The library catalogue (book titles) behind one SQLAlchemy URL: SQLite by default, MySQL/MariaDB
(pymysql) in production, one Core 2.x code path for both. Values always travel as bound parameters;
any failure to reach or talk to the database surfaces as `CatalogueUnavailable`."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from sqlalchemy import (Column, Integer, MetaData, String, Table, UniqueConstraint, create_engine,
                        delete, event, func, insert, inspect, select, text)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.schema import CreateTable

log = logging.getLogger(__name__)

DEFAULT_SEED_PATH = Path(__file__).resolve().parent / "data" / "seed_books.txt"
MAX_TITLE_LENGTH = 255

# Keeps IN lists and VALUES batches well under SQLite's bound-parameter limit on old builds.
_CHUNK = 500
# Two adders racing on the same titles lose at most a few rounds; past this something else is wrong.
_ADD_ATTEMPTS = 5
_MYSQL_UNKNOWN_DATABASE = 1049
_MYSQL_DEADLOCK = 1213
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_$]+")

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
    UniqueConstraint("title", name="uq_book_title"),
    # AUTOINCREMENT stops SQLite reusing the id of a deleted last row, which would let a
    # delete-then-add leave fingerprint() unchanged.
    sqlite_autoincrement=True,
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_unicode_ci",
)


@dataclass(frozen=True)
class Book:
    id: int
    title: str

    def to_dict(self) -> dict:
        """The book as a JSON-ready dict: {"id": int, "title": str}."""
        return {"id": self.id, "title": self.title}


class CatalogueUnavailable(Exception):
    """The database cannot be reached or answered with an operational error."""


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


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _driver_code(error: sa_exc.DBAPIError) -> int | None:
    """The numeric server error code pymysql carries in args[0], if any."""
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


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
        self._seed_titles = list(seed_titles) if seed_titles is not None else None
        self._engine = self._make_engine(self._url)

    # -- engine ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The dialect family in use: "sqlite" or "mysql" (MariaDB included)."""
        return self._backend

    def _is_memory(self) -> bool:
        return self._url.database in (None, "", ":memory:")

    def _make_engine(self, url: URL, *, server_only: bool = False) -> Engine:
        if self._backend == "mysql":
            kwargs: dict = {
                "pool_pre_ping": True,
                "pool_recycle": 3600,
                "connect_args": {"connect_timeout": 5, "read_timeout": 10, "write_timeout": 10,
                                 "charset": "utf8mb4"},
            }
            if server_only:
                # Used once to create the database; a pool would only linger.
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

    # -- schema ------------------------------------------------------------------------------

    def init_schema(self) -> None:
        """Idempotently creates the database or folder and the book table; seeds only a new table."""
        with self._guard("init_schema"):
            if self._backend == "sqlite":
                self._ensure_sqlite_folder()
            else:
                self._ensure_mysql_database()
            self._ensure_table()

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
        server = self._make_engine(server_url, server_only=True)
        try:
            # Identifiers cannot be bound parameters; the name is whitelisted above and quoted.
            quoted = server.dialect.identifier_preparer.quote_identifier(name)
            with server.begin() as conn:
                conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {quoted} "
                                  "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
            log.info("created catalogue database %s", name)
        finally:
            server.dispose()

    def _ensure_table(self) -> None:
        seeds = list(dict.fromkeys(_normalise(self._seed_titles or [])))
        try:
            with self._engine.begin() as conn:
                if inspect(conn).has_table(book_table.name):
                    return
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

    # -- reads -------------------------------------------------------------------------------

    def list(self, offset: int = 0, limit: int = 50) -> tuple[list[Book], int]:
        """One page of books ordered by id, and the total number of books."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        with self._guard("list"), self._engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(book_table)).scalar_one()
            rows = conn.execute(select(book_table.c.id, book_table.c.title)
                                .order_by(book_table.c.id).offset(offset).limit(limit)).all()
        return [Book(int(r.id), r.title) for r in rows], int(total)

    def all(self) -> list[Book]:
        """Every book ordered by id."""
        with self._guard("all"), self._engine.connect() as conn:
            rows = conn.execute(select(book_table.c.id, book_table.c.title)
                                .order_by(book_table.c.id)).all()
        return [Book(int(r.id), r.title) for r in rows]

    def get_many(self, ids: Iterable[int]) -> list[Book]:
        """The books with these ids that exist, in the order given, each once."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        if not wanted:
            return []
        found: dict[int, str] = {}
        with self._guard("get_many"), self._engine.connect() as conn:
            for batch in _chunks(wanted):
                rows = conn.execute(select(book_table.c.id, book_table.c.title)
                                    .where(book_table.c.id.in_(batch)))
                found.update((int(r.id), r.title) for r in rows)
        return [Book(i, found[i]) for i in wanted if i in found]

    def fingerprint(self) -> tuple[int, int, int]:
        """(count, sum of ids, max id), 0s when empty; differs after any add or delete."""
        stmt = select(func.count(book_table.c.id),
                      func.coalesce(func.sum(book_table.c.id), 0),
                      func.coalesce(func.max(book_table.c.id), 0))
        with self._guard("fingerprint"), self._engine.connect() as conn:
            count, total, highest = conn.execute(stmt).one()
        # MySQL's SUM comes back as Decimal.
        return int(count), int(total), int(highest)

    def ping(self) -> None:
        """Returns when the database answers SELECT 1; raises CatalogueUnavailable otherwise."""
        with self._guard("ping"), self._engine.connect() as conn:
            conn.execute(select(1)).scalar_one()

    # -- writes ------------------------------------------------------------------------------

    def add(self, titles: list[str]) -> list[Book]:
        """One Book per requested title in request order; existing titles keep their ids."""
        requested = _normalise(titles)
        if not requested:
            return []
        unique = list(dict.fromkeys(requested))
        with self._guard("add"):
            by_title = self._add_with_retry(unique)
        return [Book(by_title[t], t) for t in requested]

    def _add_with_retry(self, unique: list[str]) -> dict[str, int]:
        for attempt in range(1, _ADD_ATTEMPTS + 1):
            try:
                with self._engine.begin() as conn:
                    return self._add_once(conn, unique)
            except sa_exc.IntegrityError:
                # Another caller committed one of these titles after our read; re-read picks it up.
                log.debug("add raced on a duplicate title (attempt %d); re-reading", attempt)
            except sa_exc.OperationalError as error:
                if _driver_code(error) != _MYSQL_DEADLOCK:
                    raise
                # InnoDB aborted us to break a lock cycle with a concurrent add; the retry is clean.
                log.debug("add chosen as deadlock victim (attempt %d); retrying", attempt)
        raise CatalogueUnavailable(
            f"catalogue database unavailable (add): still conflicting after {_ADD_ATTEMPTS} attempts")

    @staticmethod
    def _ids_for(conn: Connection, titles: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for batch in _chunks(titles):
            rows = conn.execute(select(book_table.c.id, book_table.c.title)
                                .where(book_table.c.title.in_(batch)))
            found.update((r.title, int(r.id)) for r in rows)
        return found

    def _add_once(self, conn: Connection, unique: list[str]) -> dict[str, int]:
        existing = self._ids_for(conn, unique)
        missing = [t for t in unique if t not in existing]
        for batch in _chunks(missing):
            conn.execute(insert(book_table), [{"title": t} for t in batch])
        if not missing:
            return existing
        created = self._ids_for(conn, missing)
        existing.update(created)
        return existing

    def delete(self, book_id: int) -> bool:
        """True when a book with this id existed and was removed."""
        with self._guard("delete"), self._engine.begin() as conn:
            deleted = conn.execute(delete(book_table).where(book_table.c.id == int(book_id))).rowcount
        return deleted > 0


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    """WAL lets readers proceed during a write; busy_timeout makes writers wait instead of failing."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()
