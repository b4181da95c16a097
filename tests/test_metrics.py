"""Scoring must equal the official SQuAD v1.1 script (v2.0 rule for unanswerable questions), CJK character-level."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t5qa.metrics import exact_match, f1, has_cjk, normalize_answer, squad_scores, token_accuracy


# --- hand-computed expectations, one row per rule --------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),                          # case
        ("U.S.A.!", "usa"),                          # ASCII punctuation removed, not replaced by a space
        ("cat-dog", "catdog"),
        ("The Eiffel Tower", "eiffel tower"),        # capitalised article
        ("an apple a day", "apple day"),             # "an" and "a"
        ("theory anthem another", "theory anthem another"),  # articles inside words stay
        ("(the) end", "end"),                        # article freed by punctuation removal
        ("a.b", "ab"),                               # punctuation removed first, so no article here
        ("  New \t York\n ", "new york"),            # whitespace collapsed and stripped
        ("", ""),
        ("The a an", ""),
        ("Ünïcode ÉTÉ", "ünïcode été"),              # non-ASCII letters lowercased and kept
        ("北京，中国", "北京，中国"),                   # the official normalisation leaves CJK punctuation alone
    ],
)
def test_normalize_answer_applies_each_squad_rule(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1_expected"),
    [
        ("Paris", ["paris"], 1.0, 1.0),
        ("Paris!", ["Paris"], 1.0, 1.0),
        ("The Eiffel Tower", ["Eiffel Tower"], 1.0, 1.0),
        ("an apple", ["apple"], 1.0, 1.0),
        ("theory", ["ory"], 0.0, 0.0),
        ("  New   York ", ["New York"], 1.0, 1.0),
        ("", ["Paris"], 0.0, 0.0),                            # empty prediction on an answerable question
        ("Lyon", ["Paris", "lyon"], 1.0, 1.0),                # max over references
        # pred {big, red, dog} vs gold {red, dog}: overlap 2, P=2/3, R=1 -> F1 = 0.8
        ("the big red dog", ["a red dog"], 0.0, 0.8),
        # Counter overlap of duplicates: pred dog x3 vs gold {dog, cat}: overlap 1, P=1/3, R=1/2 -> 0.4
        ("dog dog dog", ["dog cat"], 0.0, 0.4),
        # pred {dog x2, cat} vs gold dog x3: overlap 2, P=R=2/3
        ("dog dog cat", ["dog dog dog"], 0.0, 2 / 3),
        # vs "dog": P=1/2, R=1 -> 2/3; vs "red dog house": P=1, R=2/3 -> 0.8; max is 0.8
        ("red dog", ["blue cat", "dog", "red dog house"], 0.0, 0.8),
        # v1.1 quirk: both normalise to "" -> strings equal (EM 1) but no common tokens (F1 0)
        ("the", ["an"], 1.0, 0.0),
        # unanswerable (SQuAD v2 rule): only an answer that normalises to "" is right
        ("", [], 1.0, 1.0),
        ("The.", [], 1.0, 1.0),
        ("nothing", [], 0.0, 0.0),
        ("", ["", "  "], 1.0, 1.0),                           # blank references also mean "no answer"
        ("Paris", "Paris", 1.0, 1.0),                         # a bare string is one reference, not characters
    ],
)
def test_exact_match_and_f1_hand_computed(
    prediction: str, references: list[str], em: float, f1_expected: float
) -> None:
    assert exact_match(prediction, references) == em
    assert f1(prediction, references) == pytest.approx(f1_expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1_expected"),
    [
        # 4 characters vs 2, overlap 2: P=1/2, R=1 -> 2/3 (whitespace tokens would give 0)
        ("北京大学", ["北京"], 0.0, 2 / 3),
        ("北京。", ["北京"], 1.0, 1.0),                         # Chinese full stop stripped
        ("《红楼梦》", ["红楼梦"], 1.0, 1.0),                     # book-title marks stripped
        ("“北京”，中国！", ["北京中国"], 1.0, 1.0),                # curly quotes, full-width comma and ! stripped
        ("北京 大学", ["北京大学"], 1.0, 1.0),                    # spaces between CJK characters do not matter
        # Latin/digit runs are one token: [1949, 年, 10, 月] vs [1949, 年] -> P=1/2, R=1 -> 2/3
        ("1949年10月", ["1949年"], 0.0, 2 / 3),
        # 5 characters vs 2, overlap 2: P=2/5, R=1 -> 4/7
        ("東京タワー", ["東京"], 0.0, 4 / 7),                    # Japanese kanji + katakana
        ("서울특별시", ["서울"], 0.0, 4 / 7),                    # Korean Hangul
        ("北京", ["Beijing"], 0.0, 0.0),
        ("上海", ["北京", "上海市"], 0.0, 0.8),                   # max over references: P=1, R=2/3
        ("", [], 1.0, 1.0),
        ("北京", [], 0.0, 0.0),
    ],
)
def test_cjk_is_scored_character_level(prediction: str, references: list[str], em: float, f1_expected: float) -> None:
    assert exact_match(prediction, references) == em
    assert f1(prediction, references) == pytest.approx(f1_expected, abs=1e-12)


def test_has_cjk_detects_han_kana_hangul_only() -> None:
    assert has_cjk("价格") and has_cjk("ひらがな") and has_cjk("カタカナ") and has_cjk("한국어")
    assert not has_cjk("Ünïcode, ümlaut — ½") and not has_cjk("，。")


# --- squad_scores --------------------------------------------------------------------------------------

def test_squad_scores_percentages_groups_and_missing() -> None:
    predictions = {"q1": "Paris", "q2": "the big red dog", "q3": "", "q4": "something", "extra": "x"}
    references = {"q1": ["Paris"], "q2": ["a red dog"], "q3": [], "q4": [], "q5": ["x"]}
    scores = squad_scores(predictions, references)
    # per question EM 1, 0, 1, 0, 0 (q5 missing -> ""); F1 1, 0.8, 1, 0, 0
    assert scores["count"] == 5 and scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(40.0)
    assert scores["f1"] == pytest.approx(56.0)
    assert scores["HasAns_count"] == 3 and scores["NoAns_count"] == 2
    assert scores["HasAns_exact_match"] == pytest.approx(100 / 3)
    assert scores["HasAns_f1"] == pytest.approx(60.0)
    assert scores["NoAns_exact_match"] == pytest.approx(50.0)
    assert scores["NoAns_f1"] == pytest.approx(50.0)


def test_squad_scores_without_unanswerable_has_no_group_keys() -> None:
    scores = squad_scores({"a": "red dog", "b": "blue"}, {"a": ["red dog"], "b": ["green"]})
    assert scores == {"exact_match": 50.0, "f1": 50.0, "count": 2, "missing": 0}


def test_squad_scores_of_nothing_is_zero() -> None:
    assert squad_scores({}, {}) == {"exact_match": 0.0, "f1": 0.0, "count": 0, "missing": 0}


# --- equality with the official v1.1 algorithm on generated inputs ------------------------------------

def _oracle_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _oracle_f1(pred: str, gold: str) -> float:
    p, g = _oracle_normalize(pred).split(), _oracle_normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0
    precision, recall = 1.0 * same / len(p), 1.0 * same / len(g)
    return (2 * precision * recall) / (precision + recall)


def _oracle_em(pred: str, gold: str) -> bool:
    return _oracle_normalize(pred) == _oracle_normalize(gold)


# Words chosen to hit the rules often: articles in every case, words containing articles, punctuation,
# accented letters and digits; separators mix spaces, tabs, newlines and punctuation.
_WORDS = st.sampled_from(
    ["a", "A", "an", "An", "the", "The", "THE", "theory", "anna", "cat", "Cat", "dog", "dog.", "U.S.", "'s",
     "é", "Été", "42", "4.2", "-", "_", "x_y", "naïve", "(the)", "a-b", "ß", "İ"]
)
_SEPARATORS = st.sampled_from([" ", "  ", "\t", "\n", ",", "-", "", " . "])
_TEXT = st.lists(st.tuples(_WORDS, _SEPARATORS), max_size=8).map(lambda parts: "".join(w + s for w, s in parts))
_ANY_TEXT = st.one_of(_TEXT, st.text(alphabet=st.characters(codec="latin-1"), max_size=20))


@settings(max_examples=400, deadline=None)
@given(prediction=_ANY_TEXT, references=st.lists(_ANY_TEXT, min_size=1, max_size=3))
def test_matches_official_v11_algorithm(prediction: str, references: list[str]) -> None:
    if not any(r.strip() for r in references):
        references = references + ["cat"]  # keep the question answerable: the v1.1 rules apply
    assert normalize_answer(prediction) == _oracle_normalize(prediction)
    assert exact_match(prediction, references) == float(max(_oracle_em(prediction, r) for r in references))
    assert f1(prediction, references) == max(_oracle_f1(prediction, r) for r in references)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.tuples(_TEXT, st.lists(_TEXT, min_size=1, max_size=2)
                                                                 .filter(lambda refs: any(r.strip() for r in refs))),
                       min_size=1))
def test_squad_scores_match_official_totals(rows: dict[str, tuple[str, list[str]]]) -> None:
    predictions = {qid: pred for qid, (pred, _) in rows.items()}
    references = {qid: refs for qid, (_, refs) in rows.items()}
    total = len(rows)
    em = 100.0 * sum(max(_oracle_em(predictions[q], r) for r in references[q]) for q in rows) / total
    f1_total = 100.0 * sum(max(_oracle_f1(predictions[q], r) for r in references[q]) for q in rows) / total
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(em) and scores["f1"] == pytest.approx(f1_total)
    assert scores["count"] == total and "NoAns_count" not in scores


# --- token accuracy --------------------------------------------------------------------------------------

def test_token_accuracy_on_lists_skips_ignored_positions() -> None:
    predicted = [[5, 6, 7, 0], [1, 2, 3, 4]]
    labels = [[5, 9, -100, -100], [1, 2, 3, -100]]
    assert token_accuracy(predicted, labels) == (4, 5)
    assert token_accuracy(predicted, [[0, 0, 0, 0], [-1, -1, -1, -1]], ignore_index=-1) == (1, 4)


def test_token_accuracy_on_tensors_equals_lists() -> None:
    torch = pytest.importorskip("torch")
    predicted = [[5, 6, 7, 0], [1, 2, 3, 4]]
    labels = [[5, 9, -100, -100], [1, 2, 3, -100]]
    assert token_accuracy(torch.tensor(predicted), torch.tensor(labels)) == (4, 5)
    assert token_accuracy(torch.tensor(predicted), labels) == (4, 5)
    result = token_accuracy(torch.tensor(predicted), torch.tensor(labels))
    assert all(type(v) is int for v in result)


def test_token_accuracy_all_ignored_and_shape_mismatch() -> None:
    assert token_accuracy([[1, 2]], [[-100, -100]]) == (0, 0)
    with pytest.raises(ValueError, match="shape"):
        token_accuracy([[1, 2, 3]], [[1, 2]])
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, t5qa.metrics; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- real Chinese data -----------------------------------------------------------------------------------

CMRC_TRIAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmrc2018" / "cmrc2018_trial.json"


@pytest.mark.shared_data
def test_cmrc2018_half_answers_get_partial_credit() -> None:
    if not CMRC_TRIAL.is_file():
        pytest.skip(f"{CMRC_TRIAL} not found (the shared QA data is only on the project's machines)")
    data = json.loads(CMRC_TRIAL.read_text(encoding="utf-8"))
    references = {qa["id"]: [a["text"] for a in qa["answers"]]
                  for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    assert len(references) == 1002
    # Each first reference scores 100 against its own list: the normalisation never breaks real answers.
    assert squad_scores({q: refs[0] for q, refs in references.items()}, references)["exact_match"] == 100.0
    # The first half of each answer: whitespace tokens give almost nothing (2.4 F1 with the v1.1 algorithm),
    # character-level tokens give about 61.
    halves = {q: refs[0][: max(1, len(refs[0]) // 2)] for q, refs in references.items()}
    whitespace_f1 = 100 * sum(max(_oracle_f1(halves[q], r) for r in refs) for q, refs in references.items()) / 1002
    scores = squad_scores(halves, references)
    assert whitespace_f1 < 5 and 50 < scores["f1"] < 70
