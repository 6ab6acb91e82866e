"""The word tokenizer behind the lexical index, term coverage and category/brand matching.

The bundle builder and the server both call `tokenize`, so a query is cut into exactly the tokens
the index was built from. Tokens are NFKC-normalised, lower-cased alphanumeric runs, English
stopwords removed, Snowball-stemmed (PyStemmer). Decimal numbers such as "1.5" stay one token,
because sizes and quantities matter in product search.
"""
from __future__ import annotations

import re
import threading
import unicodedata

import numpy as np
import Stemmer

# Lucene/bm25s English stopword list: short, so that product words like "off" or "top" survive.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)
WORD = re.compile(r"[0-9]+(?:\.[0-9]+)?|[^\W_]+", re.UNICODE)
_local = threading.local()  # PyStemmer objects are not safe to share between threads


def _stemmer() -> Stemmer.Stemmer:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("english")
    return stemmer


def normalize(text: str) -> str:
    """NFKC-normalise, lower-case and collapse whitespace."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def tokenize(text: str) -> list[str]:
    """Cut text into stemmed, stopword-free tokens (order kept, duplicates kept)."""
    words = [w for w in WORD.findall(normalize(text)) if w not in STOPWORDS]
    return _stemmer().stemWords(words) if words else []


def has_control_chars(text: str) -> bool:
    """True when text holds a control character other than tab, newline or carriage return."""
    return any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text)


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def number_tokens(vocabulary: list[str]) -> np.ndarray:
    """Boolean mask over a vocabulary: which tokens are numbers (sizes, counts, model numbers)."""
    return np.fromiter((bool(_NUMBER.fullmatch(w)) for w in vocabulary), dtype=np.bool_, count=len(vocabulary))


def term_ids(text: str, vocab: dict[str, int]) -> np.ndarray:
    """Distinct token ids of text, sorted; -1 stands for any word outside the vocabulary.

    The query side of the lexical index: the server and the trainer both call this."""
    return np.array(sorted({vocab.get(t, -1) for t in tokenize(text)}), dtype=np.int32)


SEP = " > "  # between the levels of a category path


def normalise_path(path: str) -> str:
    """'A>B >  C' -> 'A > B > C' (the one spelling of a category path)."""
    return SEP.join(p.strip() for p in str(path).split(">") if p.strip())
