"""The catalogue store against real databases: a SQLite file and the local MariaDB.

MySQL tests fail (not skip) when MariaDB is unreachable, unless CHATGLM4_SKIP_MYSQL=1."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid

import pymysql
import pytest

from chatglm4.catalogue import (Book, Catalogue, CatalogueUnavailable, DEFAULT_SEED_PATH,
                                load_seed_titles)

log = logging.getLogger(__name__)

MYSQL_HOST, MYSQL_PORT, MYSQL_USER = "127.0.0.1", 3306, "root"
SEEDS = load_seed_titles()
INJECTIONS = ["x'); DROP TABLE book; --", "' OR '1'='1", '"; DELETE FROM book; --']


def _server() -> pymysql.connections.Connection:
    return pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, connect_timeout=3,
                           charset="utf8mb4", autocommit=True)


def _database_exists(name: str) -> bool:
    conn = _server()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path):
    """A URL to a database that does not exist yet; MySQL's is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sub/catalogue.db"
        return
    if os.environ.get("CHATGLM4_SKIP_MYSQL") == "1":
        pytest.skip("CHATGLM4_SKIP_MYSQL=1")
    try:
        _server().close()
    except pymysql.err.OperationalError as error:
        pytest.fail(f"MariaDB at {MYSQL_HOST}:{MYSQL_PORT} unreachable ({error}); "
                    "start it or set CHATGLM4_SKIP_MYSQL=1")
    name = f"glm4_test_{uuid.uuid4().hex[:12]}"
    assert not _database_exists(name)
    yield f"mysql+pymysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"
    conn = _server()
    try:
        with conn.cursor() as cur:
            # The name is generated above from hex digits only.
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


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
    assert catalogue.all() == [Book(i, t) for i, t in enumerate(SEEDS, start=1)]
    if catalogue.backend == "mysql":
        assert _database_exists(db_url.rsplit("/", 1)[1])


def test_init_schema_twice_does_not_reseed(db_url, catalogue):
    catalogue.init_schema()
    again = Catalogue(db_url, seed_titles=SEEDS + ["新书"])
    again.init_schema()
    try:
        assert again.list() == ([Book(i, t) for i, t in enumerate(SEEDS, start=1)], 25)
    finally:
        again.dispose()


def test_existing_empty_table_is_never_reseeded(db_url, catalogue):
    for book in catalogue.all():
        assert catalogue.delete(book.id)
    catalogue.init_schema()
    assert catalogue.list() == ([], 0)
    assert catalogue.fingerprint() == (0, 0, 0)


def test_mysql_table_is_innodb_utf8mb4(db_url, catalogue):
    if catalogue.backend != "mysql":
        pytest.skip("MySQL-only storage options")
    conn = _server()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES "
                        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'book'", (db_url.rsplit("/", 1)[1],))
            engine, collation = cur.fetchone()
    finally:
        conn.close()
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
    assert books == [Book(26, "新书甲"), Book(3, SEEDS[2]), Book(27, "新书乙"), Book(26, "新书甲"),
                     Book(28, "New Book")]
    assert catalogue.list(limit=0)[1] == 28
    assert catalogue.add(["新书乙"]) == [Book(27, "新书乙")]
    assert catalogue.list(limit=0)[1] == 28
    assert catalogue.add([]) == []
    assert Book(5, "t").to_dict() == {"id": 5, "title": "t"}


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
    assert got == [Book(9, SEEDS[8]), Book(1, SEEDS[0]), Book(3, SEEDS[2])]
    assert catalogue.get_many([]) == []
    assert catalogue.get_many(iter([2])) == [Book(2, SEEDS[1])]


def test_unseeded_catalogue_is_empty(empty):
    assert empty.list() == ([], 0)
    assert empty.fingerprint() == (0, 0, 0)
    assert empty.add(["第一本"]) == [Book(1, "第一本")]
    assert empty.fingerprint() == (1, 1, 1)


def test_fingerprint_changes_on_add_and_delete(catalogue):
    start = catalogue.fingerprint()
    assert start == (25, 325, 25)
    assert catalogue.fingerprint() == start
    catalogue.add([SEEDS[0]])
    assert catalogue.fingerprint() == start
    catalogue.add(["指纹测试"])
    after_add = catalogue.fingerprint()
    assert after_add == (26, 351, 26)
    assert catalogue.delete(3)
    after_delete = catalogue.fingerprint()
    assert after_delete == (25, 348, 26)
    # Ids are never reused, so deleting the last row and adding another still moves the fingerprint.
    assert catalogue.delete(26)
    before_readd = catalogue.fingerprint()
    catalogue.add(["指纹测试二"])
    assert catalogue.fingerprint() not in (start, after_add, after_delete, before_readd)
    assert catalogue.fingerprint()[0] == after_delete[0]


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
        [Book(i, titles[i - 26]) for i in range(10_021, 10_026)], 10_025)
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
