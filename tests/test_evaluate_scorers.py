"""`t5qa evaluate --predictions` scores every question of the reference file the way the chosen official
script does: squad (v1.1), squad_v2 (v2.0) and cmrc (CMRC 2018, also DRCD)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from t5qa.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _squad_file(path: Path, paragraphs: list[tuple[str, list[dict]]]) -> Path:
    data = {"version": "test", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas} for context, qas in paragraphs]}]}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _qa(qid: str, question: str, *answers: str, impossible: bool = False) -> dict:
    return {"id": qid, "question": question, "is_impossible": impossible,
            "answers": [{"text": a, "answer_start": 0} for a in answers]}


def _evaluate(capsys, data: Path, predictions: dict, tmp_path: Path, *flags: str) -> dict:
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    assert main(["evaluate", "--data", str(data), "--predictions", str(pred_file), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_squad_counts_duplicate_questions_and_repeated_ids(tmp_path, capsys):
    context = "The cat sat on the mat near the door."
    data = _squad_file(tmp_path / "dup.json", [
        (context, [_qa("q1", "Where did the cat sit?", "on the mat"),
                   _qa("q1", "Where did the cat sit?", "on the mat"),  # the same question twice, same id
                   _qa("q2", "What sat?", "cat"),
                   _qa("q3", "Near what?", "door")]),
    ])
    metrics = _evaluate(capsys, data, {"q1": "mat", "q2": "the cat", "stray": "x"}, tmp_path)
    assert metrics["metric"] == "squad" and metrics["count"] == 4 and metrics["missing"] == 1
    # q1 twice: EM 0, F1 2/3 each (pred [mat] vs [on, mat]); q2: 1 and 1; q3 missing: 0
    assert metrics["exact_match"] == pytest.approx(25.0)
    assert metrics["f1"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 4)
    assert metrics["unmatched_predictions"] == 1


def test_squad_v2_on_empty_punctuation_and_missing(tmp_path, capsys):
    context = "Paris is the capital of France."
    data = _squad_file(tmp_path / "v2.json", [
        (context, [_qa("a", "Capital?", "Paris"),
                   _qa("b", "Punctuation only?", "."),            # normalises to nothing: only "" is right
                   _qa("c", "Impossible?", impossible=True),
                   _qa("d", "Impossible too?", impossible=True),
                   _qa("e", "Missing?", "France"),
                   _qa("f", "Also punctuation?", "!", "?"),
                   _qa("a", "Capital again?", "London")]),       # a repeated id: the last entry wins
    ])
    predictions = {"a": "Paris", "b": "", "c": "", "d": "Lyon", "f": "something"}
    metrics = _evaluate(capsys, data, predictions, tmp_path)
    assert metrics["metric"] == "squad_v2"
    # a: "Paris" vs London -> 0; b: 1; c: 1; d: 0; e: missing -> 0; f: 0
    assert metrics["count"] == 6 and metrics["duplicate_ids"] == 1 and metrics["missing"] == 1
    assert metrics["exact_match"] == pytest.approx(100 * 2 / 6) and metrics["f1"] == pytest.approx(100 * 2 / 6)
    # HasAns is "has a non-empty answers list" (as the script): a, b, e, f
    assert metrics["HasAns_count"] == 4 and metrics["HasAns_exact_match"] == pytest.approx(25.0)
    assert metrics["NoAns_count"] == 2 and metrics["NoAns_exact_match"] == pytest.approx(50.0)

    probs = tmp_path / "na.json"
    probs.write_text(json.dumps({"a": 0.2, "b": 0.9, "c": 0.8, "d": 0.7, "f": 0.1}), encoding="utf-8")
    with_probs = _evaluate(capsys, data, predictions, tmp_path, "--no-answer-probs", str(probs))
    # start at 2 (no-answer questions): f(0.1) +0 -> 2; a(0.2) +0; d(0.7) -1 -> 1; c(0.8) +0; b(0.9) +1 -> 2
    assert with_probs["best_exact_match"] == pytest.approx(100 * 2 / 6) and with_probs["best_exact_match_thresh"] == 0.0
    assert _evaluate(capsys, data, predictions, tmp_path, "--metric", "squad")["count"] == 7


# --- CMRC 2018: hand-computed, and an independent transcription of the official script ----------------------


def test_cmrc_hand_computed_with_mixed_text_and_punctuation(tmp_path, capsys):
    context = "2018年NBA总决赛由金州勇士队夺冠，这是他们第三次在四年内获得总冠军。"
    data = _squad_file(tmp_path / "cmrc.json", [
        (context, [_qa("z1", "谁夺冠？", "金州勇士队"),
                   _qa("z2", "哪一年的总决赛？", "2018年NBA总决赛"),
                   _qa("z3", "第几次？", "第三次"),
                   _qa("z4", "多少年内？", "四年内")]),
    ])
    predictions = {"z1": "勇士队", "z2": "NBA总决赛", "z3": "“第三次”。"}
    metrics = _evaluate(capsys, data, predictions, tmp_path)
    assert metrics["metric"] == "cmrc"  # chosen from the data: the contexts are Chinese
    # z1: F1 0.75; z2: F1 0.8; z3: EM 1, F1 1; z4: missing, 0
    assert metrics["count"] == 4 and metrics["missing"] == 1
    assert metrics["exact_match"] == pytest.approx(25.0)
    assert metrics["f1"] == pytest.approx(100 * (0.75 + 0.8 + 1) / 4)
    assert metrics["average"] == pytest.approx((metrics["exact_match"] + metrics["f1"]) / 2)


_SP_CHAR = ['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=', '，', '。', '：', '？', '！', '“', '”', '；',
            '’', '《', '》', '……', '·', '、', '「', '」', '（', '）', '－', '～', '『', '』']


def _oracle_segments(text: str) -> list[str]:
    """cmrc2018_evaluate.py's mixed_segmentation(rm_punc=True), transcribed."""
    from nltk.tokenize import word_tokenize

    out, temp = [], ""
    for char in str(text).lower().strip():
        if char in _SP_CHAR:
            continue
        if re.search(r"[\u4e00-\u9fa5]", char):
            if temp:
                out.extend(word_tokenize(temp, preserve_line=True))
                temp = ""
            out.append(char)
        else:
            temp += char
    if temp:
        out.extend(word_tokenize(temp, preserve_line=True))
    return out


def _oracle_cmrc(references: dict[str, list[str]], predictions: dict[str, str]) -> tuple[float, float]:
    f1 = em = 0.0
    for qid, answers in references.items():
        if qid not in predictions:
            continue
        prediction = str(predictions[qid])
        scores = []
        for ans in answers:
            a, p = _oracle_segments(ans), _oracle_segments(prediction)
            m = [[0] * (len(p) + 1) for _ in range(len(a) + 1)]
            best = 0
            for i in range(len(a)):
                for j in range(len(p)):
                    if a[i] == p[j]:
                        m[i + 1][j + 1] = m[i][j] + 1
                        best = max(best, m[i + 1][j + 1])
            scores.append(0 if best == 0 else 2 * (best / len(p)) * (best / len(a)) / (best / len(p) + best / len(a)))
        f1 += max(scores)
        strip = lambda s: "".join(c for c in str(s).lower().strip() if c not in _SP_CHAR)  # noqa: E731
        em += any(strip(ans) == strip(prediction) for ans in answers)
    return 100.0 * em / len(references), 100.0 * f1 / len(references)


def _imperfect(answer: str, k: int) -> str | None:
    """A spread of imperfect predictions: exact, half, with punctuation, padded, missing."""
    return [answer, answer[: max(1, len(answer) // 2)], f"“{answer}”。", "答案是" + answer, None][k % 5]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["cmrc2018/cmrc2018_trial.json", "drcd"])
def test_cmrc_equals_the_official_definition_on_real_files(name, tmp_path, capsys):
    if name == "drcd":
        source = SHARED / "cmrc2018" / "cmrc2018_trial.json"
    else:
        source = SHARED / name
    if not source.is_file():
        pytest.skip(f"{source} not found (the shared QA data is only on the project's machines)")
    data = json.loads(source.read_text(encoding="utf-8"))
    if name == "drcd":
        # DRCD is Traditional Chinese in the same SQuAD layout and is scored with the same script; no DRCD file
        # is shared here, so the CMRC trial set is mapped to traditional forms for the characters that differ.
        table = str.maketrans("国华东说这时学为发会经们个来过对开关长门问间听见",
                              "國華東說這時學為發會經們個來過對開關長門問間聽見")
        data = json.loads(json.dumps(data, ensure_ascii=False).translate(table))
        source = tmp_path / "drcd_like.json"
        source.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    references, predictions = {}, {}
    for k, qa in enumerate(qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]):
        references[qa["id"]] = [x["text"] for x in qa["answers"]]
        guess = _imperfect(qa["answers"][0]["text"], k)
        if guess is not None:
            predictions[qa["id"]] = guess
    metrics = _evaluate(capsys, source, predictions, tmp_path)
    em, f1 = _oracle_cmrc(references, predictions)
    assert metrics["metric"] == "cmrc" and metrics["count"] == len(references) == 1002
    assert metrics["exact_match"] == pytest.approx(em, abs=1e-9) and metrics["f1"] == pytest.approx(f1, abs=1e-9)
    assert 30 < metrics["exact_match"] < 70 and metrics["missing"] == sum(1 for q in references if q not in predictions)
