"""Bulk import (chatglm4/importer.py) into real databases: a SQLite file and the local MariaDB."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatglm4 import importer
from chatglm4.catalogue import Catalogue, load_seed_titles
from chatglm4.importer import ImportFileError, ImportReport, import_file
from chatglm4.protocol import Book
from conftest import EVAL_DIR, ROOT

SEEDS = load_seed_titles()
LIBRARY = EVAL_DIR / "library" / "catalogue.jsonl"


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/catalogue.db"


@pytest.fixture
def catalogue(sqlite_url):
    cat = Catalogue(sqlite_url, seed_titles=SEEDS)
    cat.init_schema()
    yield cat
    cat.dispose()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def snapshot(cat: Catalogue) -> tuple:
    return cat.all(), cat.change_cursor()


# -- formats -----------------------------------------------------------------------------------


def test_csv_with_header_in_any_order(catalogue, tmp_path):
    path = write(tmp_path / "books.csv",
                 "\ufeffYear,Title,subjects,author,isbn,description\n"
                 '2008,三体,科幻;小说,刘慈欣,9787536692930,"地球文明, 三体文明\n第二行"\n'
                 ",只有书名,,,,\n"
                 "1990, 有空格的书 ,数学|代数 | 线性代数,,,\n"
                 ",,,,,\n"
                 f"2000,{SEEDS[0]},,,,\n")
    report = import_file(catalogue, path, progress=False)
    assert report == ImportReport(path=str(path), lines=4, added=3, present=1)
    books = catalogue.list(offset=25)[0]
    assert books == [
        Book(id=26, title="三体", author="刘慈欣", subjects=["科幻", "小说"], year=2008,
             isbn="9787536692930", description="地球文明, 三体文明\n第二行"),
        Book(id=27, title="只有书名"),
        Book(id=28, title="有空格的书", subjects=["数学", "代数", "线性代数"], year=1990),
    ]
    # A title already present keeps what it had.
    assert catalogue.get_many([1]) == [Book(id=1, title=SEEDS[0])]


def test_csv_with_title_column_only(catalogue, tmp_path):
    path = write(tmp_path / "titles.csv", "title\n甲\n乙\n甲\n")
    assert import_file(catalogue, path, progress=False) == ImportReport(str(path), 3, 2, 1)


def test_jsonl_fields_lists_and_strings(catalogue, tmp_path):
    path = jsonl(tmp_path / "books.jsonl", [
        {"id": 7, "title": "高等数学", "author": "同济大学数学系", "year": None, "subjects": ["数学", "微积分"]},
        {"title": "字符串主题", "subjects": "烹饪; 家常菜|川菜"},
        {"title": "全字段", "author": "某", "subjects": [], "year": -200, "isbn": "7-1", "description": "描述"},
    ])
    write(path, path.read_text(encoding="utf-8") + "\n   \n")  # blank lines are skipped
    assert import_file(catalogue, path, progress=False) == ImportReport(str(path), 3, 3, 0)
    assert catalogue.list(offset=25)[0] == [
        Book(id=26, title="高等数学", author="同济大学数学系", subjects=["数学", "微积分"]),
        Book(id=27, title="字符串主题", subjects=["烹饪", "家常菜", "川菜"]),
        Book(id=28, title="全字段", author="某", year=-200, isbn="7-1", description="描述"),
    ]


def test_batches_and_duplicates_within_the_file(catalogue, tmp_path):
    titles = [f"书{i % 7}" for i in range(20)] + [SEEDS[3]]
    path = jsonl(tmp_path / "dups.jsonl", [{"title": t} for t in titles])
    assert import_file(catalogue, path, batch=3, progress=False) == ImportReport(str(path), 21, 7, 14)
    assert [b.title for b in catalogue.list(offset=25)[0]] == [f"书{i}" for i in range(7)]
    assert [b.id for b in catalogue.list(offset=25)[0]] == list(range(26, 33))
    with pytest.raises(ValueError):
        import_file(catalogue, path, batch=0, progress=False)


def test_import_reaches_change_log_readers(catalogue, tmp_path):
    cursor = catalogue.change_cursor()
    import_file(catalogue, jsonl(tmp_path / "a.jsonl", [{"title": "新到的书", "year": 2024}]), progress=False)
    changes = catalogue.changes_since(cursor)
    assert [(b.title, b.year) for b in changes.upserted] == [("新到的书", 2024)]


def test_import_prunes_the_change_log_after_each_batch(catalogue, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(catalogue, "prune_changes", lambda keep=100_000: calls.append(keep) or 0)
    path = jsonl(tmp_path / "ten.jsonl", [{"title": f"剪{i}"} for i in range(10)])
    import_file(catalogue, path, batch=4, progress=False)
    assert calls == [100_000] * 3


def test_the_library_catalogue_imports_and_reimports_nothing(db_url):
    if not LIBRARY.exists():
        pytest.skip("../shared/eval is not beside this checkout")
    originals = [json.loads(line) for line in LIBRARY.read_text(encoding="utf-8").splitlines()]
    cat = Catalogue(db_url, seed_titles=SEEDS)
    try:
        cat.init_schema()
        first = import_file(cat, LIBRARY, batch=100, progress=False)
        assert first == ImportReport(str(LIBRARY), 420, 420, 0)
        assert cat.list(limit=0)[1] == 25 + 420
        imported = cat.list(offset=25, limit=1000)[0]
        assert [(b.title, b.author, b.subjects, b.year) for b in imported] == [
            (r["title"], r["author"], r["subjects"], r["year"]) for r in originals]
        cursor = cat.change_cursor()
        again = import_file(cat, LIBRARY, progress=False)
        assert again == ImportReport(str(LIBRARY), 420, 0, 420)
        assert cat.list(limit=0)[1] == 445
        assert cat.change_cursor() == cursor  # a re-import writes nothing at all
    finally:
        cat.dispose()


# -- malformed files ---------------------------------------------------------------------------

GOOD = [{"title": "好书一"}, {"title": "好书二", "year": 2001}]
BAD_JSONL = [
    ('{"title": "坏", ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"author": "没有书名"}', "title: required"),
    ('{"title": "   "}', "title: title must not be blank"),
    ('{"title": null}', "title"),
    ('{"title": 42}', "title"),
    ('{"title": "年份错", "year": "1999"}', "year"),
    ('{"title": "年份错", "year": 1999.5}', "year"),
    ('{"title": "年份错", "year": 99999}', "year"),
    ('{"title": "多字段", "colour": "red"}', "colour: unknown field"),
    ('{"title": "主题错", "subjects": 5}', "subjects"),
    ('{"title": "主题错", "subjects": [1, 2]}', "subjects"),
    ('{"title": "' + "长" * 256 + '"}', "at most 255 characters"),
]


@pytest.mark.parametrize("line,reason", BAD_JSONL)
def test_a_malformed_jsonl_line_imports_nothing(catalogue, tmp_path, line, reason):
    good = [json.dumps(r, ensure_ascii=False) for r in GOOD * 3]
    path = write(tmp_path / "bad.jsonl", "\n".join(good[:4] + [line] + good[4:]) + "\n")
    before = snapshot(catalogue)
    with pytest.raises(ImportFileError) as error:
        import_file(catalogue, path, batch=1, progress=False)
    assert error.value.line == 5 and error.value.path == str(path)
    assert f"{path}, line 5: " in str(error.value) and reason in str(error.value)
    assert snapshot(catalogue) == before


BAD_CSV = [
    ("title,colour\n好书,红\n", 1, "unknown column 'colour'"),
    ("author,year\n某,2000\n", 1, "no title column"),
    ("title,title\n甲,乙\n", 1, "named twice"),
    ("", 1, "header row is required"),
    ("title,year\n好书一,2000\n好书二,20x0\n", 3, "year: '20x0' is not a whole number"),
    ("title,year\n好书一,2000\n好书二,2000,多余\n", 3, "more cells"),
    ("title,author\n好书一,某\n,某人\n", 3, "title: required"),
]


@pytest.mark.parametrize("text,line,reason", BAD_CSV)
def test_a_malformed_csv_line_imports_nothing(catalogue, tmp_path, text, line, reason):
    path = write(tmp_path / "bad.csv", text)
    before = snapshot(catalogue)
    with pytest.raises(ImportFileError) as error:
        import_file(catalogue, path, progress=False)
    assert error.value.line == line and reason in str(error.value)
    assert snapshot(catalogue) == before


def test_a_bad_line_near_the_end_of_a_big_file_imports_nothing(catalogue, tmp_path):
    records = [{"title": f"大文件{i}"} for i in range(5000)] + [{"title": "坏", "year": "x"}]
    path = jsonl(tmp_path / "big.jsonl", records)
    before = snapshot(catalogue)
    with pytest.raises(ImportFileError) as error:
        import_file(catalogue, path, batch=100, progress=False)
    assert error.value.line == 5001
    assert snapshot(catalogue) == before


def test_bytes_that_are_not_utf8_name_their_line(catalogue, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("title\n好书\n".encode() + "Café\n".encode("latin-1"))
    with pytest.raises(ImportFileError, match="line 3: not UTF-8"):
        import_file(catalogue, path, progress=False)


def test_unsupported_file_type(catalogue, tmp_path):
    with pytest.raises(ValueError, match="use .csv or .jsonl"):
        import_file(catalogue, write(tmp_path / "books.txt", "title\n"), progress=False)


# -- command line ------------------------------------------------------------------------------


def test_main_imports_seeds_a_new_table_and_is_idempotent(tmp_path, sqlite_url, capsys):
    path = jsonl(tmp_path / "books.jsonl", GOOD)
    assert importer.main([str(path), "--database-url", sqlite_url]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    assert "2 books read, 2 added, 0 already present" in out
    cat = Catalogue(sqlite_url)
    assert [b.title for b in cat.all()] == SEEDS + ["好书一", "好书二"]
    assert importer.main([str(path), "--database-url", sqlite_url]) == 0
    assert "2 books read, 0 added, 2 already present" in capsys.readouterr().out
    assert cat.list(limit=0)[1] == 27
    cat.dispose()


def test_main_does_not_seed_an_existing_table(tmp_path, sqlite_url, capsys):
    cat = Catalogue(sqlite_url)
    cat.init_schema()
    assert importer.main([str(jsonl(tmp_path / "b.jsonl", GOOD)), "--database-url", sqlite_url]) == 0
    assert [b.title for b in cat.all()] == ["好书一", "好书二"]
    cat.dispose()


def test_main_reads_database_url_from_the_environment(tmp_path, sqlite_url, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    assert importer.main([str(jsonl(tmp_path / "b.jsonl", GOOD))]) == 0
    assert Catalogue(sqlite_url).list(limit=0)[1] == 27


def test_main_default_database_is_the_gateways(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert importer.main([str(jsonl(tmp_path / "b.jsonl", GOOD))]) == 0
    assert (tmp_path / "data" / "catalogue.db").is_file()


def test_main_malformed_file_exits_1_with_one_line(tmp_path, sqlite_url, capsys):
    path = write(tmp_path / "bad.jsonl", '{"title": "好"}\n{"title": 1}\n')
    assert importer.main([str(path), "--database-url", sqlite_url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    # One line, after the progress bar that \r wiped.
    last = re.split(r"[\r\n]", err.rstrip())[-1]
    assert last.startswith("import: error: ") and err.count("import: error") == 1
    assert f"{path}, line 2: title" in last and "nothing was imported" in last
    assert Catalogue(sqlite_url).list(limit=0)[1] == 25


@pytest.mark.parametrize("argv", [
    [],
    ["a.jsonl", "b.jsonl"],
    ["--bogus", "a.jsonl"],
    ["{tmp}/books.txt"],
    ["{tmp}/missing.jsonl"],
    ["{tmp}/ok.jsonl", "--database-url", "postgresql://u@h/db"],
    ["{tmp}/ok.jsonl", "--database-url", "not a url"],
])
def test_main_usage_errors_exit_2(tmp_path, argv, capsys):
    write(tmp_path / "books.txt", "title\n")
    jsonl(tmp_path / "ok.jsonl", GOOD)
    assert importer.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err


def test_main_unreachable_database_exits_1(tmp_path, capsys):
    path = jsonl(tmp_path / "ok.jsonl", GOOD)
    assert importer.main([str(path), "--database-url", "mysql+pymysql://root@127.0.0.1:1/x"]) == 1
    assert "unavailable" in capsys.readouterr().err


def test_command_in_a_subprocess(tmp_path, db_url):
    path = write(tmp_path / "books.csv", "title,author,subjects,year\n三体,刘慈欣,科幻;小说,2008\n")
    command = [sys.executable, "-c",
               "import sys; from chatglm4 import importer; sys.exit(importer.main(sys.argv[1:]))",
               str(path), "--database-url", db_url]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"imported {path}: 1 books read, 1 added, 0 already present")
    assert "importing" in done.stderr and "100%" in done.stderr  # the progress bar
    cat = Catalogue(db_url)
    assert cat.list(offset=25)[0] == [Book(id=26, title="三体", author="刘慈欣", subjects=["科幻", "小说"],
                                           year=2008)]
    cat.dispose()
    bad = write(tmp_path / "bad.csv", "title,year\n好,1\n坏,x\n")
    done = subprocess.run(command[:3] + [str(bad), "--database-url", db_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"{bad}, line 3: year" in done.stderr
