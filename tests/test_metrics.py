"""Scoring must equal the official scripts: SQuAD v1.1 (squad), SQuAD v2.0 (squad_v2) and CMRC 2018 (cmrc)."""

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

from t5qa.metrics import (choose_metric, cmrc_exact, cmrc_f1, has_cjk, is_chinese, mixed_segmentation,
                          normalize_answer, pair_scores, score_predictions, squad_exact, squad_f1, squad_v2_exact,
                          squad_v2_f1, token_accuracy)

exact_match, f1 = squad_exact, squad_f1


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
        # no reference at all (t5qa's extension; the v1.1 script fails): only an answer that normalises to ""
        ("", [], 1.0, 1.0),
        ("The.", [], 1.0, 1.0),
        ("nothing", [], 0.0, 0.0),
        ("", ["", "  "], 1.0, 0.0),                           # v1.1 on blank references: EM 1, F1 0
        ("", ["."], 1.0, 0.0),                                # the same quirk (v2.0 gives 1 and 1)
        ("Paris", "Paris", 1.0, 1.0),                         # a bare string is one reference, not characters
    ],
)
def test_exact_match_and_f1_hand_computed(
    prediction: str, references: list[str], em: float, f1_expected: float
) -> None:
    assert exact_match(prediction, references) == em
    assert f1(prediction, references) == pytest.approx(f1_expected, abs=1e-12)


# --- SQuAD v2.0 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1_expected"),
    [
        ("", ["."], 1.0, 1.0),                   # "." normalises to nothing: dropped, so only "" is right
        ("x", ["."], 0.0, 0.0),
        ("", [], 1.0, 1.0),                      # unanswerable
        ("The.", [], 1.0, 1.0),                  # normalises to ""
        ("foo", [], 0.0, 0.0),
        ("", ["Paris", "!"], 0.0, 0.0),          # "!" dropped, "Paris" stays: an empty prediction is wrong
        ("the", ["an"], 1.0, 1.0),               # both normalise to "": v2.0 F1 is 1 (v1.1 says 0)
        ("big red dog", ["red dog"], 0.0, 0.8),
    ],
)
def test_squad_v2_pairs_hand_computed(prediction: str, references: list[str], em: float, f1_expected: float) -> None:
    assert squad_v2_exact(prediction, references) == em
    assert squad_v2_f1(prediction, references) == pytest.approx(f1_expected, abs=1e-12)


def test_squad_v2_keys_by_id_and_counts_missing_as_zero() -> None:
    entries = [("q1", "x", ["x"]), ("q2", None, ["y"]), ("q3", "", []), ("q1", "x", ["y"])]
    scores = score_predictions("squad_v2", entries)
    # q1's last entry wins (EM 0), q2 has no prediction (0, counted), q3 is a right "no answer" (1)
    assert scores["count"] == 3 and scores["duplicate_ids"] == 1 and scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert (scores["HasAns_count"], scores["NoAns_count"]) == (2, 1)
    assert scores["HasAns_exact_match"] == 0.0 and scores["NoAns_exact_match"] == 100.0
    assert "best_f1" not in scores


def test_squad_v2_no_answer_threshold_and_best_thresholds() -> None:
    entries = [("q1", "x", ["x"]), ("q2", "y", []), ("q3", "", [])]
    probs = {"q1": 0.1, "q2": 0.9, "q3": 0.5}
    scores = score_predictions("squad_v2", entries, no_answer_probs=probs)
    assert scores["exact_match"] == pytest.approx(200 / 3)  # threshold 1.0: no probability exceeds it
    # By rising probability: q1 (+1 -> 3 of 3 at 0.1), q3 (+0), q2 (-1): best 100 at 0.1
    assert scores["best_exact_match"] == 100.0 and scores["best_exact_match_thresh"] == 0.1
    assert scores["best_f1"] == 100.0 and scores["best_f1_thresh"] == 0.1
    # At 0.6, q2 (0.9) counts as "no answer", which is right for it
    assert score_predictions("squad_v2", entries, no_answer_probs=probs, no_answer_threshold=0.6)["exact_match"] \
        == 100.0
    with pytest.raises(ValueError, match="no no-answer probability for question id 'q3'"):
        score_predictions("squad_v2", entries, no_answer_probs={"q1": 0.1, "q2": 0.9})


def _oracle_v2(pred: str, gold_list: list[str]) -> tuple[int, float]:
    """The v2.0 script's compute_exact / compute_f1 and its gold filtering, transcribed."""
    gold = [a for a in gold_list if _oracle_normalize(a)] or [""]

    def toks(s: str) -> list[str]:
        return _oracle_normalize(s).split() if s else []

    def f1_one(a_gold: str) -> float:
        g, p = toks(a_gold), toks(pred)
        same = sum((Counter(g) & Counter(p)).values())
        if len(g) == 0 or len(p) == 0:
            return int(g == p)
        if same == 0:
            return 0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(int(_oracle_normalize(a) == _oracle_normalize(pred)) for a in gold), max(f1_one(a) for a in gold)


# --- CMRC 2018 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1_expected"),
    [
        # [勇 士 队] in [金 州 勇 士 队]: run 3, P=1, R=3/5 -> 0.75
        ("勇士队", ["金州勇士队"], 0.0, 0.75),
        # mixed Chinese/English: gold [2018 年 nba 总 决 赛], pred [nba 总 决 赛]: run 4, P=1, R=2/3 -> 0.8
        ("NBA总决赛", ["2018年NBA总决赛"], 0.0, 0.8),
        ("“金州勇士”。", ["金州勇士"], 1.0, 1.0),     # curly quotes and 。 are in the script's list
        # "…" is not (the list holds "……" as one entry): EM 0; segments [勇 士 …] vs [勇 士]: P=2/3, R=1 -> 0.8
        ("勇士…", ["勇士"], 0.0, 0.8),
        # contiguous run, not a bag: [士 勇] vs [勇 士] share runs of 1 only: P=R=1/2 -> 0.5 (a bag gives 1)
        ("士勇", ["勇士"], 0.0, 0.5),
        # no article removal, lowercase only: [the warriors] vs [warriors]: P=1/2, R=1 -> 2/3
        ("The Warriors", ["warriors"], 0.0, 2 / 3),
        # ASCII comma is not removed, NLTK keeps "1,000" whole: [1,000 元] vs [1000 元]: run 1 -> 0.5
        ("1,000元", ["1000元"], 0.0, 0.5),
        ("金州勇士！", ["金州勇士", "勇士"], 1.0, 1.0),  # full-width ! removed; max over references
        ("上海", ["北京", "上海市"], 0.0, 0.8),
        ("北京", ["Beijing"], 0.0, 0.0),
        ("臺北市", ["臺北"], 0.0, 0.8),               # traditional characters (DRCD), U+81FA is in range
        ("", [], 1.0, 1.0),                          # no reference: t5qa's extension, as squad_v2
        ("北京", [], 0.0, 0.0),
    ],
)
def test_cmrc_pairs_hand_computed(prediction: str, references: list[str], em: float, f1_expected: float) -> None:
    assert cmrc_exact(prediction, references) == em
    assert cmrc_f1(prediction, references) == pytest.approx(f1_expected, abs=1e-12)


def test_mixed_segmentation_splits_chinese_characters_and_english_words() -> None:
    assert mixed_segmentation("2018年，NBA总决赛 won by the Warriors!") == [
        "2018", "年", "nba", "总", "决", "赛", "won", "by", "the", "warriors", "!"]
    # without punctuation removal the script's list characters are segments of their own
    assert mixed_segmentation("a-b", remove_punctuation=False) == ["a", "-", "b"]


def test_cmrc_counts_every_entry_and_missing_as_zero() -> None:
    entries = [("q1", "勇士", ["勇士"]), ("q1", "勇士", ["湖人"]), ("q2", None, ["北京"])]
    scores = score_predictions("cmrc", entries)
    assert scores["count"] == 3 and scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(100 / 3) and scores["f1"] == pytest.approx(100 / 3)
    assert scores["average"] == pytest.approx(100 / 3)


# --- SQuAD v1.1 totals, choosing a scorer ------------------------------------------------------------------

def test_squad_counts_every_entry_even_a_repeated_id() -> None:
    entries = [("q1", "x", ["x"]), ("q1", "x", ["y"]), ("q2", None, ["z"])]
    scores = score_predictions("squad", entries)
    assert scores == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 / 3), "count": 3,
                      "missing": 1}


def test_score_of_nothing_is_zero_and_unknown_metric_is_refused() -> None:
    assert score_predictions("squad", []) == {"exact_match": 0.0, "f1": 0.0, "count": 0, "missing": 0}
    with pytest.raises(ValueError, match="--metric must be one of squad, squad_v2, cmrc"):
        pair_scores("bleu", "a", ["a"])


def test_choose_metric_follows_the_data() -> None:
    assert choose_metric(["异常检测用于发现信用卡欺诈。", "臺北是臺灣的首都", "An English context."], False) == "cmrc"
    assert choose_metric(["An English context.", "Another one."], True) == "squad_v2"
    assert choose_metric(["An English context.", "异常检测"], False) == "squad"
    assert is_chinese("2018年NBA总决赛") and is_chinese("臺北是臺灣的首都")
    assert not is_chinese("ひらがなとカタカナ") and not is_chinese("Credit card fraud") and not is_chinese("")


def test_has_cjk_detects_han_kana_hangul_only() -> None:
    assert has_cjk("价格") and has_cjk("ひらがな") and has_cjk("カタカナ") and has_cjk("한국어")
    assert not has_cjk("Ünïcode, ümlaut — ½") and not has_cjk("，。")


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
    assert normalize_answer(prediction) == _oracle_normalize(prediction)
    assert exact_match(prediction, references) == float(max(_oracle_em(prediction, r) for r in references))
    assert f1(prediction, references) == max(_oracle_f1(prediction, r) for r in references)


@settings(max_examples=400, deadline=None)
@given(prediction=_ANY_TEXT, references=st.lists(_ANY_TEXT, max_size=3))
def test_matches_official_v20_algorithm(prediction: str, references: list[str]) -> None:
    assert pair_scores("squad_v2", prediction, references) == _oracle_v2(prediction, references)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.tuples(_TEXT, st.lists(_TEXT, min_size=1, max_size=2)
                                                                 .filter(lambda refs: any(r.strip() for r in refs))),
                       min_size=1))
def test_squad_totals_match_official_totals(rows: dict[str, tuple[str, list[str]]]) -> None:
    predictions = {qid: pred for qid, (pred, _) in rows.items()}
    references = {qid: refs for qid, (_, refs) in rows.items()}
    total = len(rows)
    em = 100.0 * sum(max(_oracle_em(predictions[q], r) for r in references[q]) for q in rows) / total
    f1_total = 100.0 * sum(max(_oracle_f1(predictions[q], r) for r in references[q]) for q in rows) / total
    scores = score_predictions("squad", [(q, predictions[q], references[q]) for q in rows])
    assert scores["exact_match"] == pytest.approx(em) and scores["f1"] == pytest.approx(f1_total)
    assert scores["count"] == total and scores["missing"] == 0


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
    entries = [(q, refs[0], refs) for q, refs in references.items()]
    # Each first reference scores 100 against its own list: the normalisation never breaks real answers.
    assert score_predictions("cmrc", entries)["exact_match"] == 100.0
    # The first half of each answer: whitespace tokens give almost nothing (under 5 F1 with the v1.1
    # algorithm); CMRC's segments give partial credit for every half.
    halves = {q: refs[0][: max(1, len(refs[0]) // 2)] for q, refs in references.items()}
    whitespace_f1 = 100 * sum(max(_oracle_f1(halves[q], r) for r in refs) for q, refs in references.items()) / 1002
    scores = score_predictions("cmrc", [(q, halves[q], refs) for q, refs in references.items()])
    assert whitespace_f1 < 5 and 50 < scores["f1"] < 75 and scores["count"] == 1002
