"""Dictionary translation of English requests, on the real CC-CEDICT file the wheel ships, and the
pinyin forms of authors' names."""

from __future__ import annotations

import pytest

from chatglm4.crosslingual import Dictionary, cedict_path, is_foreign_request, latin_words
from chatglm4.protocol import Book
from chatglm4.retrieval import author_pinyin, index_terms


@pytest.fixture(scope="module")
def dictionary() -> Dictionary:
    return Dictionary.load()


def test_the_dictionary_ships_in_its_wheel():
    path = cedict_path()
    assert path.is_file() and path.stat().st_size > 5_000_000


@pytest.mark.parametrize("request_text, words", [
    ("Pride and Prejudice", ["傲慢与偏见"]),                 # a title is one dictionary phrase
    ("science fiction novels", ["科幻小说"]),                # longest phrase first
    ("Sherlock Holmes stories", ["福尔摩斯", "故事"]),        # a name, then a plural
    ("books by Haruki Murakami", ["村上春树"]),              # names in either order; "books by" is filler
    ("detective stories", ["侦探", "故事"]),
])
def test_requests_translate_to_the_words_a_catalogue_uses(dictionary, request_text, words):
    assert dictionary.translate(request_text).chinese == words


def test_unknown_words_numbers_and_filler_stay_out_of_the_translation(dictionary):
    t = dictionary.translate("books about zxqv and 1984")
    assert t.chinese == [] and t.untranslated == ["zxqv", "1984"]  # a number is searched as it is
    # "1' OR '1'='1": nothing to translate, so nothing is searched for beyond the request itself.
    assert dictionary.translate("1' OR '1'='1").chinese == []


def test_ranking_prefers_plain_main_senses_then_common_words(tmp_path):
    path = tmp_path / "cedict.txt"
    path.write_text("# a comment\n"
                    "西部片 西部片 [xi1 bu4 pian4] /western (film)/\n"
                    "西方 西方 [Xi1 fang1] /western/the West/\n"
                    "甲 甲 [jia3] /first/armour/\n"
                    "乙 乙 [yi3] /armour/\n"
                    "丙 丙 [bing3] /armour/\n"
                    "豆腐 豆腐 [dou4 fu5] /variant of 荳腐|荳腐[dou4 fu5]/tofu/\n"
                    "not an entry\n", encoding="utf-8")
    d = Dictionary.load(path, frequencies={"丙": 1000})
    assert d.lookup("western") == ["西方", "西部片"]   # a note costs: the plain sense wins
    assert d.lookup("armour")[0] == "丙"              # among main senses, the commoner word
    assert d.lookup("first") == ["甲"] and d.lookup("tofu") == ["豆腐"]
    assert d.lookup("variant of") == [] and d.lookup("nothing") == []
    assert d.lookup("west") == ["西方"]               # "the" is dropped from a sense


def test_translation_text_joins_chinese_then_the_rest(dictionary):
    t = dictionary.translate("Pride and Prejudice zxqv")
    assert t.text == "傲慢与偏见 zxqv"


@pytest.mark.parametrize("text, foreign", [
    ("books about linear algebra", True), ("Do you have A Brief History of Time?", True),
    ("我想学Python", False), ("线性代数", False), ("1234", False), ("", False),
])
def test_which_requests_are_translated(text, foreign):
    assert is_foreign_request(text) is foreign


def test_latin_words_fold_width_and_case():
    assert latin_words("Ｐｙｔｈｏｎ children's BOOKS") == ["python", "children's", "books"]


def test_author_names_in_pinyin_both_orders():
    assert author_pinyin("余华") == {"yuhua": "余华", "huayu": "余华"}
    # Marks and several authors: a transliterated foreign name ("·") is no Chinese name.
    assert author_pinyin("[美] 乔治·B. 托马斯") == {}
    assert set(author_pinyin("常庚哲, 史济怀")) == {"changgengzhe", "gengzhechang", "shijihuai", "jihuaishi"}
    assert author_pinyin(None) == {} and author_pinyin("") == {}


def test_index_terms_carry_the_pinyin_names():
    terms = index_terms(Book(id=1, title="活着", author="余华", subjects=["小说"]))
    assert {"活着", "余华", "小说", "yuhua", "huayu"} <= set(terms)
    assert len(terms) == len(set(terms))
