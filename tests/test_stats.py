"""stats.py: token-length percentiles, answers lost to truncation, unknown-token rate, recommendations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t5qa.config import EncodeConfig
from t5qa.data import QAExample, load_dataset
from t5qa.stats import compute_stats, percentiles

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
T5_TOKENIZER = SHARED_DATA / "t5-small-tokenizer"
FILLER = "alpha bravo charlie echo foxtrot golf hotel india juliet mike november oscar papa romeo"


def make(context: str, question: str, answer: str | None, id: str) -> QAExample:
    if answer is None:
        return QAExample(id, context, question, (), ())
    return QAExample(id, context, question, (answer,), (context.index(answer),))


def prompt(template: str, ex: QAExample) -> str:
    return template.format(question=ex.question, context=ex.context)


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles(list(range(100, 0, -1))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {}


def test_source_and_target_lengths_match_tokenising_whole_prompts(tiny_tokenizer) -> None:
    examples = [
        make(f"the code is kilo . {FILLER}", "what is the code?", "kilo", "a"),
        make("the city is oslo .", "what is the city?", "oslo", "b"),
        make(f"{FILLER} {FILLER} the fruit is mango lemon .", "what is the fruit?", "mango lemon", "c"),
    ]
    encode = EncodeConfig()
    stats = compute_stats(examples, tiny_tokenizer, encode)
    full = [len(tiny_tokenizer(prompt(encode.prompt_template, e))["input_ids"]) for e in examples]
    targets = [len(tiny_tokenizer(e.answers[0])["input_ids"]) for e in examples]
    assert stats.source_tokens == percentiles(full)
    assert stats.target_tokens == percentiles(targets)
    assert (stats.examples, stats.contexts) == (3, 3)


def test_answers_past_the_input_limit_are_counted(tiny_tokenizer) -> None:
    long_context = f"the code is kilo . {FILLER} {FILLER} the city is oslo ."
    examples = [
        make(long_context, "what is the code?", "kilo", "early"),
        make(long_context, "what is the city?", "oslo", "late"),
        make("the color is amber .", "what is the color?", "amber", "short"),
        make("the planet is mars .", "what is the animal?", None, "unanswerable"),
    ]
    encode = EncodeConfig(max_source_tokens=64, stride_tokens=8)
    stats = compute_stats(examples, tiny_tokenizer, encode)
    # Independent check: truncate each whole prompt as a plain trainer would and look for the answer.
    lost = 0
    for e in examples[:3]:
        ids = tiny_tokenizer(prompt(encode.prompt_template, e), truncation=True, max_length=64)["input_ids"]
        lost += e.answers[0] not in tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert lost == 1
    assert stats.answers_lost_to_truncation == lost
    assert stats.answers_checked == 3  # the unanswerable question has nothing to lose
    assert stats.sources_over_limit == 2
    assert any("1 answers (33.3%) lie past the 64-token limit" in r and "--max-source-tokens" in r
               for r in stats.recommendations)


def test_unknown_characters_give_a_tokenizer_recommendation(tiny_tokenizer) -> None:
    chinese = [make("北京是中国的首都。上海是最大的城市。", "中国的首都是哪里？", "北京", "zh")]
    stats = compute_stats(chinese, tiny_tokenizer)
    assert stats.unk_rate > 0.9  # the synthetic vocabulary has no Chinese characters
    assert stats.cjk_share > 0.8  # all but the punctuation
    assert any("map to <unk>" in r and "mT5 or ByT5" in r for r in stats.recommendations)

    english = [make("the code is kilo .", "what is the code?", "kilo", "en")]
    clean = compute_stats(english, tiny_tokenizer)
    assert clean.unk_rate == 0.0
    assert not any("<unk>" in r for r in clean.recommendations)


def test_long_answers_are_counted_against_max_target_tokens(tiny_tokenizer) -> None:
    answer = FILLER
    examples = [make(f"the code is {answer} .", "what is the code?", answer, "long"),
                make("the code is kilo .", "what is the code?", "kilo", "short")]
    limit = len(tiny_tokenizer(answer)["input_ids"]) - 1
    stats = compute_stats(examples, tiny_tokenizer, EncodeConfig(max_target_tokens=limit))
    assert stats.targets_over_limit == 1
    assert any(f"--max-target-tokens {limit}" in r for r in stats.recommendations)
    assert json.loads(json.dumps(stats.to_dict()))["targets_over_limit"] == 1


needs_shared = pytest.mark.skipif(not T5_TOKENIZER.is_dir(), reason="../shared/data (real QA data) is absent")


@pytest.mark.shared_data
@needs_shared
def test_cmrc2018_is_mostly_unknown_to_the_t5_vocabulary() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(T5_TOKENIZER))
    examples, _ = load_dataset(SHARED_DATA / "cmrc2018" / "cmrc2018_trial.json")
    stats = compute_stats(examples, tokenizer)
    assert stats.unk_rate > 0.5
    assert any("Chinese" in r and "mT5 or ByT5" in r for r in stats.recommendations)


@pytest.mark.shared_data
@needs_shared
def test_covid_qa_answers_lie_past_512_tokens_as_whole_prompt_truncation_shows() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(T5_TOKENIZER))
    examples, _ = load_dataset(SHARED_DATA / "covid_qa" / "200423_covidQA.json")
    subset = examples[:150]
    encode = EncodeConfig()
    stats = compute_stats(subset, tokenizer, encode)
    lost = 0
    for e in subset:
        text = prompt(encode.prompt_template, e)
        enc = tokenizer(text, truncation=True, max_length=512, return_offsets_mapping=True, verbose=False)
        last_char = max(end for _, end in enc["offset_mapping"])
        answer_end = text.index(" context: ") + len(" context: ") + e.answer_starts[0] + len(e.answers[0])
        lost += answer_end > last_char
    assert lost > 50
    assert stats.answers_lost_to_truncation == lost


def test_byte_tokenizer_statistics_check_truncation_without_fast_offsets() -> None:
    from transformers import ByT5Tokenizer

    context = "异常检测用于发现罕见的事件。" * 30 + "例如信用卡欺诈检测。"  # 1,272 bytes
    early, late = "异常检测", "信用卡欺诈检测"
    examples = [QAExample("a", context, "是什么？", (early,), (0,)),
                QAExample("b", context, "示例是什么？", (late,), (context.index(late),))]
    stats = compute_stats(examples, ByT5Tokenizer(), EncodeConfig(max_source_tokens=256, stride_tokens=64))
    # Every byte is one token: the late answer lies past 256 bytes of input, the early one inside it.
    assert stats.answers_checked == 2 and stats.answers_lost_to_truncation == 1
    assert stats.unk_rate == 0.0 and stats.cjk_share > 0.9
