"""Query spelling correction: the dictionary rules, the distance, live updates, and the served query."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.spelling import Speller, distance
from common.text import tokenize

TITLES = [
    "Red Cedar Fence Picket", "Western Red Cedar Board", "Cedar Shake Siding",
    "Deck Paint Gallon", "Porch and Deck Paint", "Exterior Deck Stain",
    "Cordless Drill Kit", "Brushless Cordless Drill", "Cordless Impact Driver",
    "Wire Brush Set", "Copper Wire Spool", "Shelf Bracket", "Wall Shelf Bracket",
    "Trimmer Line Spool", "String Trimmer Head", "Primer Sealer",
]


@pytest.fixture(scope="module")
def speller() -> Speller:
    vocab = sorted({t for title in TITLES for t in tokenize(title)})
    return Speller(TITLES, vocab)


@pytest.mark.parametrize("typo,fixed", [
    ("ceadar", "cedar"),           # one insertion
    ("cordles", "cordless"),       # one deletion
    ("dirll", "drill"),            # a transposition is one edit
    ("deckpaint", "deck paint"),   # two catalog words run together
    ("cordlesss drrill", "cordless drill"),
    ("2x4 cedr", "2x4 cedar"),     # a token with digits stays, the word beside it is corrected
])
def test_misspelt_words_become_catalog_words(speller, typo, fixed):
    assert speller.correct(typo) == fixed


@pytest.mark.parametrize("query", [
    "cedar fence",          # known words
    "drills",               # plural: its stem is in the lexical vocabulary
    "bx12",                 # model numbers are not typos
    "abc",                  # too short to guess
    "hire",                 # 'wire' differs in the first letter: not a correction
    "zzzzzzzz",             # nothing near it
])
def test_words_left_alone(speller, query):
    assert speller.correct(query) is None


def test_more_frequent_word_wins_at_equal_distance():
    s = Speller(["Shelf A", "Shelf B", "Shelf C", "Shell D", "Shell E"])
    assert s.correct("shelk") == "shelf"


def test_a_word_in_a_single_title_is_not_a_correction_target():
    s = Speller(["Grommet Kit", "Grommet Set", "Gromet Tool"])  # 'gromet' is itself a typo in one title
    assert s.correct_word("grommet") is None
    assert s.correct_word("gromett") == "grommet"


def test_with_titles_learns_new_words_and_leaves_the_original_alone(speller):
    before = speller.correct("lawnmowr")
    grown = speller.with_titles(["Lawnmower Blade", "Lawnmower Bag"])
    assert grown.correct("lawnmowr") == "lawnmower"
    assert speller.correct("lawnmowr") == before and before != "lawnmower"


def _reference_osa(a: str, b: str) -> int:
    """Optimal-string-alignment distance by the textbook full table (the slow twin)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, j in itertools.product(range(len(a) + 1), range(len(b) + 1)):
        if min(i, j) == 0:
            d[i][j] = max(i, j)
            continue
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
            d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


@settings(max_examples=300, deadline=None)
@given(st.text("abcd", max_size=7), st.text("abcd", max_size=7))
def test_distance_matches_the_full_table_up_to_its_limit(a, b):
    ref = _reference_osa(a, b)
    assert distance(a, b, limit=2) == (ref if ref <= 2 else 3)


def test_served_search_corrects_and_says_so(server, stub, pb, capsys):
    plain = stub.Search(pb.SearchRequest(query="cordless drill", k=5))
    typo = stub.Search(pb.SearchRequest(query="cordles drrill", k=5))
    assert plain.corrected_query == ""
    assert typo.corrected_query == "cordless drill"
    assert [i.item_id for i in typo.items] == [i.item_id for i in plain.items]
    from server.client import main as client

    assert client(["--target", server.target, "search", "cordles drrill", "--k", "3"]) == 0
    assert "searched for: cordless drill" in capsys.readouterr().out
