"""The catalogue store against real databases: a SQLite file and the local MariaDB.

MySQL tests fail (not skip) when MariaDB is unreachable, unless CHATGLM4_SKIP_MYSQL=1."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time

import pytest

from chatglm4.catalogue import (Catalogue, CatalogueUnavailable, Changes, DEFAULT_SEED_PATH, TitleConflict,
                                load_seed_titles)
from chatglm4.protocol import Book, BookPatch, NewBook
from conftest import mysql_connection, mysql_database_exists, mysql_query

log = logging.getLogger(__name__)

SEEDS = load_seed_titles()
INJECTIONS = ["x'); DROP TABLE book; --", "' OR '1'='1", '"; DELETE FROM book; --']


@pytest.fixture
def catalogue(db_url):
    cat = Catalogue(db_url, seed_titles=SEEDS)
    cat.init_schema()
    yield cat
    cat.dispose()


@pytest.fixture
def empty(db_url):
    cat = Catalogue(db_url)
    cat.init_schema()
    yield cat
    cat.dispose()


def test_seed_file_has_25_titles():
    lines = [line.strip() for line in DEFAULT_SEED_PATH.read_text(encoding="utf-8").splitlines()]
    assert SEEDS == [line for line in lines if line]
    assert len(SEEDS) == 25
    assert SEEDS[0] == "线性代数：从基础到前沿"


def test_load_seed_titles_from_path_strips_and_skips_blank(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_text("  一 \n\n二\n   \n三\n", encoding="utf-8")
    assert load_seed_titles(path) == ["一", "二", "三"]
    assert load_seed_titles(str(path)) == ["一", "二", "三"]


def test_init_schema_creates_database_and_seeds_in_file_order(db_url, catalogue):
    assert catalogue.all() == [Book(id=i, title=t) for i, t in enumerate(SEEDS, start=1)]
    if catalogue.backend == "mysql":
        assert mysql_database_exists(db_url.rsplit("/", 1)[1])


def test_init_schema_twice_does_not_reseed(db_url, catalogue):
    catalogue.init_schema()
    again = Catalogue(db_url, seed_titles=SEEDS + ["新书"])
    again.init_schema()
    try:
        assert again.list() == ([Book(id=i, title=t) for i, t in enumerate(SEEDS, start=1)], 25)
    finally:
        again.dispose()


def test_existing_empty_table_is_never_reseeded(db_url, catalogue):
    for book in catalogue.all():
        assert catalogue.delete(book.id)
    catalogue.init_schema()
    assert catalogue.list() == ([], 0)


def test_mysql_table_is_innodb_utf8mb4(db_url, catalogue):
    if catalogue.backend != "mysql":
        pytest.skip("MySQL-only storage options")
    [(engine, collation)] = mysql_query("SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES "
                                        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'book'",
                                        (db_url.rsplit("/", 1)[1],))
    assert engine == "InnoDB"
    assert collation.startswith("utf8mb4")


def test_backend_names():
    assert Catalogue("sqlite://").backend == "sqlite"
    assert Catalogue("mysql+pymysql://u@h/db").backend == "mysql"
    with pytest.raises(ValueError):
        Catalogue("postgresql://u@h/db")


def test_paging(catalogue):
    page, total = catalogue.list(offset=0, limit=10)
    assert total == 25 and [b.id for b in page] == list(range(1, 11))
    page, total = catalogue.list(offset=20, limit=10)
    assert total == 25 and [b.id for b in page] == list(range(21, 26))
    assert catalogue.list(offset=25, limit=10) == ([], 25)
    assert catalogue.list(offset=3, limit=0) == ([], 25)
    assert catalogue.list() == (catalogue.all(), 25)
    with pytest.raises(ValueError):
        catalogue.list(offset=-1)


def test_add_returns_ids_in_request_order(catalogue):
    books = catalogue.add(["  新书甲 ", SEEDS[2], "新书乙", "新书甲", "New Book"])
    assert books == [Book(id=26, title="新书甲"), Book(id=3, title=SEEDS[2]), Book(id=27, title="新书乙"), Book(id=26, title="新书甲"),
                     Book(id=28, title="New Book")]
    assert catalogue.list(limit=0)[1] == 28
    assert catalogue.add(["新书乙"]) == [Book(id=27, title="新书乙")]
    assert catalogue.list(limit=0)[1] == 28
    assert catalogue.add([]) == []
    assert Book(id=5, title="t").model_dump(include={"id", "title"}) == {"id": 5, "title": "t"}


def test_add_is_exact_about_case_and_punctuation(catalogue):
    # On MySQL a case-/accent-insensitive collation would merge these into one row.
    variants = ["abc", "ABC", "线性代数:从基础到前沿", "café", "cafe"]
    books = catalogue.add(variants)
    assert [b.title for b in books] == variants
    assert len({b.id for b in books}) == len(variants)


def test_chinese_and_unusual_text_round_trips(catalogue):
    titles = ["红楼梦：第一回　甄士隐梦幻识通灵", "𠀀𪚥 emoji 📚 mixed", "tab\tinside", "引号\"'`\\反斜杠"]
    added = catalogue.add(titles)
    assert [b.title for b in catalogue.get_many(b.id for b in added)] == titles


def test_add_rejects_unusable_titles(catalogue):
    with pytest.raises(ValueError):
        catalogue.add(["ok", "   "])
    with pytest.raises(ValueError):
        catalogue.add(["长" * 256])
    with pytest.raises(TypeError):
        catalogue.add("a string")
    assert catalogue.add(["长" * 255])[0].title == "长" * 255
    assert catalogue.list(limit=0)[1] == 26


def test_delete(catalogue):
    assert catalogue.delete(5) is True
    assert catalogue.delete(5) is False
    assert catalogue.delete(999) is False
    assert [b.id for b in catalogue.all()] == [i for i in range(1, 26) if i != 5]


def test_get_many_skips_missing_and_keeps_order(catalogue):
    catalogue.delete(7)
    got = catalogue.get_many([9, 7, 999, 1, 9, 3])
    assert got == [Book(id=9, title=SEEDS[8]), Book(id=1, title=SEEDS[0]), Book(id=3, title=SEEDS[2])]
    assert catalogue.get_many([]) == []
    assert catalogue.get_many(iter([2])) == [Book(id=2, title=SEEDS[1])]


def test_unseeded_catalogue_is_empty(empty):
    assert empty.list() == ([], 0)
    assert empty.add(["第一本"]) == [Book(id=1, title="第一本")]
    assert empty.list() == ([Book(id=1, title="第一本")], 1)


def test_ids_are_never_reused(catalogue):
    # A reader holding book 26 must not mistake a different book for it after delete-then-add.
    [book] = catalogue.add(["编号测试"])
    assert book.id == 26 and catalogue.delete(26)
    assert catalogue.add(["编号测试二"])[0].id == 27
    assert catalogue.add(["编号测试"])[0].id == 28


def test_sql_injection_strings_are_stored_literally(catalogue):
    added = catalogue.add(INJECTIONS)
    assert [b.title for b in added] == INJECTIONS
    everything = catalogue.all()
    assert [b.title for b in everything] == SEEDS + INJECTIONS
    assert catalogue.add([INJECTIONS[1]]) == [added[1]]
    assert catalogue.get_many([added[0].id]) == [added[0]]
    assert catalogue.delete(added[2].id)
    assert catalogue.list(limit=0)[1] == 27


def test_concurrent_adds_of_same_titles_agree(catalogue):
    titles = [f"并发书{i:02d}" for i in range(40)] + SEEDS[:5]
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        mine = titles[:]
        random.Random(seed).shuffle(mine)
        barrier.wait()
        try:
            results.append({b.title: b.id for b in catalogue.add(mine)})
        except (CatalogueUnavailable, AssertionError) as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert catalogue.list(limit=0)[1] == 25 + 40


def test_ten_thousand_titles(catalogue):
    titles = [f"批量书名 {i:05d}" for i in range(10_000)]
    began = time.perf_counter()
    books = catalogue.add(titles)
    log.info("%s: added 10,000 titles in %.2fs", catalogue.backend, time.perf_counter() - began)
    assert [b.title for b in books] == titles
    assert [b.id for b in books] == list(range(26, 10_026))
    assert catalogue.list(offset=10_020, limit=10) == (
        [Book(id=i, title=titles[i - 26]) for i in range(10_021, 10_026)], 10_025)
    assert catalogue.add(titles[:3] + ["one more"])[3].id == 10_026


def test_ping(catalogue):
    catalogue.ping()


def test_unreachable_mysql_raises_unavailable_quickly():
    cat = Catalogue("mysql+pymysql://root:s3cretpw@127.0.0.1:1/x")
    began = time.perf_counter()
    with pytest.raises(CatalogueUnavailable) as init_error:
        cat.init_schema()
    with pytest.raises(CatalogueUnavailable):
        cat.list()
    with pytest.raises(CatalogueUnavailable):
        cat.ping()
    with pytest.raises(CatalogueUnavailable):
        cat.add(["x"])
    assert time.perf_counter() - began < 10
    assert "s3cretpw" not in str(init_error.value)
    cat.dispose()


def test_unreachable_sqlite_raises_unavailable(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    cat = Catalogue(f"sqlite:///{blocker}/catalogue.db")
    with pytest.raises(CatalogueUnavailable):
        cat.init_schema()
    with pytest.raises(CatalogueUnavailable):
        cat.list()


def test_in_memory_sqlite_is_shared_across_threads():
    cat = Catalogue("sqlite://", seed_titles=SEEDS[:3])
    cat.init_schema()
    thread = threading.Thread(target=cat.add, args=(["线程里加的书"],))
    thread.start()
    thread.join()
    assert [b.title for b in cat.all()] == SEEDS[:3] + ["线程里加的书"]
    cat.dispose()


# -- rich records ------------------------------------------------------------------------------

RICH = NewBook(title="三体", author="刘慈欣", subjects=["科幻", "小说"], year=2008, isbn="9787536692930",
               description="地球文明与三体文明的第一次接触。")


def test_rich_record_round_trips(catalogue):
    [added] = catalogue.add_books([RICH])
    expected = Book(id=26, **RICH.model_dump())
    assert added == expected
    assert catalogue.get_many([26]) == [expected]
    assert catalogue.list(offset=25, limit=5) == ([expected], 26)
    assert catalogue.all()[-1] == expected
    # A book added by title alone has every optional field empty, subjects as [] rather than None.
    assert catalogue.get_many([1]) == [Book(id=1, title=SEEDS[0], author=None, subjects=[], year=None,
                                            isbn=None, description=None)]


def test_add_books_keeps_present_titles_as_stored(catalogue):
    catalogue.add_books([RICH])
    other = NewBook(title="三体", author="别人", year=1999)
    new_a = NewBook(title="球状闪电", author="刘慈欣", subjects=["科幻"])
    new_a_again = NewBook(title="球状闪电", author="后来者")
    books = catalogue.add_books([new_a, other, new_a_again, {"title": SEEDS[0], "year": 2020}])
    assert [b.id for b in books] == [27, 26, 27, 1]
    assert books[1] == Book(id=26, **RICH.model_dump())  # kept its stored fields
    assert books[0] == books[2] == Book(id=27, **new_a.model_dump())  # first occurrence wins
    assert books[3].year is None
    assert catalogue.list(limit=0)[1] == 27
    with pytest.raises(ValueError):
        catalogue.add_books([{"title": "  "}])
    assert catalogue.add_books([]) == []


def test_update_changes_and_clears_fields(catalogue):
    [book] = catalogue.add_books([RICH])
    updated = catalogue.update(book.id, {"year": 2006, "description": None, "subjects": ["科幻"]})
    assert updated == book.model_copy(update={"year": 2006, "description": None, "subjects": ["科幻"]})
    assert catalogue.get_many([book.id]) == [updated]
    renamed = catalogue.update(book.id, BookPatch(title=" 三体 I ").changes())
    assert renamed.title == "三体 I" and renamed.author == "刘慈欣"
    # Its own title again is no conflict.
    assert catalogue.update(book.id, {"title": "三体 I"}) == renamed


def test_update_title_conflict_and_missing_id(catalogue):
    with pytest.raises(TitleConflict) as conflict:
        catalogue.update(2, {"title": SEEDS[0]})
    assert SEEDS[0] in str(conflict.value) and conflict.value.title == SEEDS[0]
    assert isinstance(conflict.value, ValueError)
    assert catalogue.get_many([2])[0].title == SEEDS[1]
    assert catalogue.update(999, {"title": "不存在"}) is None
    assert catalogue.update(999, {"author": "x"}) is None
    with pytest.raises(ValueError):
        catalogue.update(2, {"colour": "red"})
    with pytest.raises(ValueError):
        catalogue.update(2, {})
    assert catalogue.list(limit=0)[1] == 25


@pytest.mark.parametrize("book_id", [99999999999999999999, 2 ** 63, 2 ** 31, -1, -(2 ** 70), 0])
def test_ids_outside_the_column_are_simply_absent(catalogue, book_id):
    assert catalogue.delete(book_id) is False
    assert catalogue.get_many([book_id, 1]) == [Book(id=1, title=SEEDS[0])]
    assert catalogue.update(book_id, {"author": "x"}) is None
    assert catalogue.list(limit=0)[1] == 25


def test_iter_books_pages_by_id(catalogue):
    catalogue.delete(3)
    catalogue.add([f"翻页书{i}" for i in range(10)])
    batches = list(catalogue.iter_books(batch=7))
    assert [len(b) for b in batches] == [7, 7, 7, 7, 6]
    assert [b for batch in batches for b in batch] == catalogue.all() == catalogue.list(limit=100)[0]
    assert [len(b) for b in catalogue.iter_books(batch=34)] == [34]
    with pytest.raises(ValueError):
        next(catalogue.iter_books(batch=0))


def test_iter_books_of_empty_catalogue(empty):
    assert list(empty.iter_books()) == []


# -- change log --------------------------------------------------------------------------------


def run_sql(db_url: str, *statements: str) -> None:
    """Runs SQL on a connection of its own, as someone at a database prompt would (autocommit)."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
        return
    conn = mysql_connection()
    try:
        conn.select_db(db_url.rsplit("/", 1)[1])
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def test_change_cursor_starts_at_zero_and_moves_with_writes(empty):
    assert empty.change_cursor() == 0
    assert empty.changes_since(0) == Changes(upserted=[], deleted=[], cursor=0, complete=True)
    empty.add(["第一本", "第二本"])
    assert empty.change_cursor() == 2
    changes = empty.changes_since(0)
    assert [b.title for b in changes.upserted] == ["第一本", "第二本"]
    assert changes.cursor == 2 and changes.complete and changes.deleted == []
    assert empty.changes_since(2) == Changes(cursor=2)


def test_changes_since_sees_raw_sql_from_another_connection(db_url, catalogue):
    cursor = catalogue.change_cursor()
    run_sql(db_url,
            "INSERT INTO book (title, author) VALUES ('手工插入', '某人')",
            "UPDATE book SET year = 1990 WHERE id = 2",
            "DELETE FROM book WHERE id = 3")
    changes = catalogue.changes_since(cursor)
    assert changes.complete
    assert [(b.id, b.title, b.author, b.year) for b in changes.upserted] == [
        (26, "手工插入", "某人", None), (2, SEEDS[1], None, 1990)]
    assert changes.deleted == [3]
    assert changes.cursor == catalogue.change_cursor() > cursor
    # Inserted, then deleted: reported as deleted only. Deleted, then inserted again: as upserted.
    cursor = changes.cursor
    run_sql(db_url, "INSERT INTO book (title) VALUES ('转瞬即逝')", "DELETE FROM book WHERE title = '转瞬即逝'",
            f"INSERT INTO book (id, title) VALUES (3, '{SEEDS[2]}')")
    changes = catalogue.changes_since(cursor)
    assert changes.deleted == [27]
    assert changes.upserted == [Book(id=3, title=SEEDS[2])]


def test_changing_an_id_reads_as_delete_and_insert(db_url, catalogue):
    cursor = catalogue.change_cursor()
    run_sql(db_url, "UPDATE book SET id = 1000 WHERE id = 1")
    changes = catalogue.changes_since(cursor)
    assert changes.deleted == [1]
    assert changes.upserted == [Book(id=1000, title=SEEDS[0])]


def test_changes_since_sees_catalogue_writes_and_pages_by_limit(catalogue):
    cursor = catalogue.change_cursor()
    [a, b] = catalogue.add(["甲书", "乙书"])
    catalogue.update(a.id, {"author": "甲"})
    catalogue.delete(5)
    first = catalogue.changes_since(cursor, limit=2)
    assert [x.id for x in first.upserted] == [a.id, b.id] and first.deleted == []
    second = catalogue.changes_since(first.cursor, limit=2)
    assert [x.author for x in second.upserted] == ["甲"] and second.deleted == [5]
    assert catalogue.changes_since(second.cursor) == Changes(cursor=second.cursor)
    with pytest.raises(ValueError):
        catalogue.changes_since(-1)
    with pytest.raises(ValueError):
        catalogue.changes_since(0, limit=0)


def test_changes_since_incomplete_once_pruned_past_the_cursor(db_url, catalogue):
    cursor = catalogue.change_cursor()
    catalogue.add([f"剪枝书{i}" for i in range(5)])
    catalogue.delete(1)
    assert catalogue.prune_changes(keep=3) == 3
    stale = catalogue.changes_since(cursor)
    assert stale == Changes(cursor=catalogue.change_cursor(), complete=False)
    # The newest entries are still there for readers that are close enough.
    fresh = catalogue.changes_since(catalogue.change_cursor() - 2)
    assert fresh.complete and fresh.deleted == [1]
    # Never empties the log, so the cursor never goes back.
    catalogue.prune_changes(keep=0)
    assert catalogue.change_cursor() == stale.cursor
    assert catalogue.changes_since(stale.cursor) == Changes(cursor=stale.cursor)


def test_a_log_that_went_backwards_reads_as_incomplete(empty):
    empty.add(["一", "二"])
    assert empty.changes_since(50) == Changes(cursor=2, complete=False)


def test_add_prunes_the_change_log(catalogue, monkeypatch):
    calls = []
    monkeypatch.setattr(catalogue, "prune_changes", lambda keep=100_000: calls.append(keep) or 0)
    catalogue.add([SEEDS[0]])
    assert calls == []  # nothing written, nothing to prune
    catalogue.add(["剪枝"])
    assert calls == [100_000]


def test_concurrent_writers_and_change_readers_lose_nothing(catalogue):
    """Readers following the log while four writers add, update and delete end with exactly the
    table's content."""
    mirror = {b.id: b for b in catalogue.all()}
    cursor = catalogue.change_cursor()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                [book] = catalogue.add([f"并发写{n}-{i}"])
                catalogue.update(book.id, {"year": 2000 + i})
                if i % 3 == 0:
                    catalogue.delete(book.id)
        except (CatalogueUnavailable, ValueError) as error:
            errors.append(error)

    def follow() -> None:
        nonlocal cursor
        changes = catalogue.changes_since(cursor)
        assert changes.complete
        mirror.update((b.id, b) for b in changes.upserted)
        for book_id in changes.deleted:
            mirror.pop(book_id, None)
        cursor = changes.cursor

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        follow()
        time.sleep(0.01)
    for t in threads:
        t.join()
    follow()
    assert not errors
    assert mirror == {b.id: b for b in catalogue.all()}
    assert len(mirror) == 25 + 4 * 10


# -- in-place upgrade --------------------------------------------------------------------------

DEMO_TITLES = ["线性代数", "abc", "ABC", "红楼梦"]


def _create_database(db_url: str) -> None:
    mysql_query(f"CREATE DATABASE `{db_url.rsplit('/', 1)[1]}` CHARACTER SET utf8mb4")


def _mysql_columns(db_url: str) -> dict[str, tuple]:
    rows = mysql_query("SELECT COLUMN_NAME, DATA_TYPE, COLLATION_NAME, IS_NULLABLE, COLUMN_KEY "
                       "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'book'",
                       (db_url.rsplit("/", 1)[1],))
    return {row[0]: row[1:] for row in rows}


def _check_upgraded(cat: Catalogue, titles: list[str]) -> None:
    assert cat.all() == [Book(id=i, title=t) for i, t in enumerate(titles, start=1)]
    # Everything works on the upgraded table: rich adds, exact titles, updates, the change log.
    cursor = cat.change_cursor()
    [rich] = cat.add_books([RICH])
    assert rich == Book(id=len(titles) + 1, **RICH.model_dump())
    assert cat.add([titles[0]]) == [Book(id=1, title=titles[0])]
    assert cat.update(1, {"author": "升级后"}).author == "升级后"
    assert cat.delete(2)
    changes = cat.changes_since(cursor)
    assert [b.id for b in changes.upserted] == [rich.id, 1] and changes.deleted == [2]


@pytest.mark.parametrize("charset,titles", [
    ("utf8mb4 COLLATE utf8mb4_general_ci", DEMO_TITLES),
    ("latin1", ["Linear Algebra", "abc", "ABC", "Café"]),
])
def test_upgrade_of_the_demo_mysql_table_without_id(mysql_url, charset, titles):
    _create_database(mysql_url)
    run_sql(mysql_url, f"CREATE TABLE book (title char(255)) CHARACTER SET {charset}",
            *[f"INSERT INTO book (title) VALUES ('{t}')" for t in titles])
    cat = Catalogue(mysql_url, seed_titles=SEEDS)
    try:
        cat.init_schema()
        cat.init_schema()
        columns = _mysql_columns(mysql_url)
        assert set(columns) == {"id", "title", "author", "subjects", "year", "isbn", "description"}
        assert columns["id"][3] == "PRI"
        # Case-insensitive char(255) became exact varchar, so "abc" and "ABC" stay two books.
        assert columns["title"][:3] == ("varchar", "utf8mb4_bin", "NO") and columns["title"][3] == "UNI"
        _check_upgraded(cat, titles)  # rows kept, numbered in stored order, never seeded
    finally:
        cat.dispose()


def test_upgrade_of_todays_mysql_table(mysql_url, caplog):
    _create_database(mysql_url)
    run_sql(mysql_url, "CREATE TABLE book (id INTEGER NOT NULL AUTO_INCREMENT, title VARCHAR(255) "
                       "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, PRIMARY KEY (id), "
                       "CONSTRAINT uq_book_title UNIQUE (title)) ENGINE=InnoDB CHARSET=utf8mb4",
            *[f"INSERT INTO book (title) VALUES ('{t}')" for t in DEMO_TITLES])
    cat = Catalogue(mysql_url, seed_titles=SEEDS)
    try:
        with caplog.at_level(logging.INFO, logger="chatglm4.catalogue"):
            cat.init_schema()
        assert "added author, subjects, year, isbn, description" in caplog.text
        assert "book.title" not in caplog.text  # already exact: no table rebuild
        assert len(_mysql_columns(mysql_url)) == 7
        _check_upgraded(cat, DEMO_TITLES)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chatglm4.catalogue"):
            cat.init_schema()
        assert "upgraded" not in caplog.text and "created" not in caplog.text
    finally:
        cat.dispose()


def test_upgrade_keeps_rows_without_a_title(mysql_url, caplog):
    _create_database(mysql_url)
    run_sql(mysql_url, "CREATE TABLE book (title char(255)) CHARACTER SET utf8mb4",
            "INSERT INTO book (title) VALUES ('有书名'), (NULL)")
    cat = Catalogue(mysql_url)
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm4.catalogue"):
            cat.init_schema()
        assert "stays nullable" in caplog.text
        assert cat.all() == [Book(id=1, title="有书名"), Book(id=2, title="")]
        assert _mysql_columns(mysql_url)["title"][:3] == ("varchar", "utf8mb4_bin", "YES")
    finally:
        cat.dispose()


def test_upgrade_of_todays_sqlite_table(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    run_sql(url, "CREATE TABLE book (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "
                 "title VARCHAR(255) NOT NULL, CONSTRAINT uq_book_title UNIQUE (title))",
            *[f"INSERT INTO book (title) VALUES ('{t}')" for t in DEMO_TITLES])
    cat = Catalogue(url, seed_titles=SEEDS)
    try:
        cat.init_schema()
        cat.init_schema()
        with sqlite3.connect(f"{tmp_path}/old.db") as conn:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(book)")]
        assert columns == ["id", "title", "author", "subjects", "year", "isbn", "description"]
        _check_upgraded(cat, DEMO_TITLES)
    finally:
        cat.dispose()


def test_upgrade_of_a_sqlite_table_without_unique_title_adds_the_index(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    run_sql(url, "CREATE TABLE book (id INTEGER PRIMARY KEY AUTOINCREMENT, title VARCHAR(255) NOT NULL)",
            "INSERT INTO book (title) VALUES ('一')")
    cat = Catalogue(url)
    try:
        cat.init_schema()
        with pytest.raises(sqlite3.IntegrityError):
            run_sql(url, "INSERT INTO book (title) VALUES ('一')")
    finally:
        cat.dispose()


def test_sqlite_table_without_id_is_refused_untouched(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    run_sql(url, "CREATE TABLE book (title TEXT)", "INSERT INTO book (title) VALUES ('一')")
    cat = Catalogue(url)
    with pytest.raises(CatalogueUnavailable, match="no id column"):
        cat.init_schema()
    cat.dispose()
    with sqlite3.connect(f"{tmp_path}/old.db") as conn:
        assert conn.execute("SELECT title FROM book").fetchall() == [("一",)]


def test_upgrade_keeps_duplicate_titles_and_warns(mysql_url, caplog):
    _create_database(mysql_url)
    run_sql(mysql_url, "CREATE TABLE book (title char(255)) CHARACTER SET utf8mb4",
            "INSERT INTO book (title) VALUES ('重复'), ('重复'), ('唯一')")
    cat = Catalogue(mysql_url)
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm4.catalogue"):
            cat.init_schema()
        assert "not unique" in caplog.text
        assert [b.title for b in cat.all()] == ["重复", "重复", "唯一"]
        assert cat.add(["唯一", "新的"])[0].id == 3
        cat.init_schema()  # still fine, still no index
        assert _mysql_columns(mysql_url)["title"][3] == ""
    finally:
        cat.dispose()


def init_schema_at_once(cats: list[Catalogue]) -> list[BaseException]:
    """Runs init_schema on every catalogue at the same moment (as separate processes would); the
    errors they raised."""
    barrier = threading.Barrier(len(cats))
    errors: list[BaseException] = []

    def run(cat: Catalogue) -> None:
        barrier.wait()
        try:
            cat.init_schema()
        except CatalogueUnavailable as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in cats]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors


def test_two_processes_upgrading_at_once(mysql_url):
    _create_database(mysql_url)
    run_sql(mysql_url, "CREATE TABLE book (title char(255)) CHARACTER SET utf8mb4",
            *[f"INSERT INTO book (title) VALUES ('{t}')" for t in DEMO_TITLES])
    cats = [Catalogue(mysql_url, seed_titles=SEEDS) for _ in range(3)]
    errors = init_schema_at_once(cats)
    try:
        assert not errors
        _check_upgraded(cats[0], DEMO_TITLES)
    finally:
        for cat in cats:
            cat.dispose()


def test_two_processes_creating_at_once(db_url):
    cats = [Catalogue(db_url, seed_titles=SEEDS) for _ in range(3)]
    errors = init_schema_at_once(cats)
    try:
        assert not errors
        assert cats[1].all() == [Book(id=i, title=t) for i, t in enumerate(SEEDS, start=1)]
        [book] = cats[2].add(["建好以后"])
        assert cats[0].changes_since(0).upserted[-1] == book
    finally:
        for cat in cats:
            cat.dispose()
