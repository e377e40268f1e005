"""The benchmarks' scoring rules on the spec's worked examples and hand-made cases (expected values computed by hand)."""
import pytest

from uhd_jax.eval.metrics.anls import anls, levenshtein
from uhd_jax.eval.metrics.exact import ai2d_match, chartqa_match, gqa_prediction
from uhd_jax.eval.metrics.normalize import normalize_answer
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy
from uhd_jax.eval.metrics.yes_no import mme_label, mme_scores, pope_label, pope_scores


@pytest.mark.parametrize("raw, normalized", [
    ("It's a dog!", "it 's dog"), ("U.S.A.", "usa"), ("3,000", "3000"), ("$5.00", "$5.00"),   # the spec's examples
    ("Two  Dogs", "2 dogs"), ("the cat", "cat"), ("dont", "don't"), ("yes.", "yes"), ("left-hand", "left hand"),
    ("(a) red", "red"), ("3.5", "3.5"), ("None\tthanks", "0 thanks"),
])
def test_evalai_normaliser(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_evalai_normaliser_strips_at_most_32_periods():
    """The official `periodStrip.sub("", outText, re.UNICODE)` makes re.UNICODE (32) the replacement count: the first
    32 strippable periods go, later ones stay; periods before a digit are not matched and do not count."""
    assert normalize_answer("x." * 40) == "x" * 32 + "x." * 8
    assert normalize_answer("." * 33) == "."
    assert normalize_answer("3.14" + "." * 33) == "3.14."


def test_soft_accuracy_counts_humans_leave_one_out():
    ten = lambda a, k: [a] * k + ["other"] * (10 - k)  # noqa: E731
    assert soft_accuracy("cat", ten("cat", 3)) == pytest.approx(0.9)       # the spec's example
    assert soft_accuracy("cat", ten("cat", 2)) == pytest.approx(0.6)
    assert soft_accuracy("cat", ten("cat", 1)) == pytest.approx(0.3)
    assert soft_accuracy("cat", ten("cat", 4)) == pytest.approx(1.0)
    assert soft_accuracy("dog", ten("cat", 4)) == 0.0
    assert soft_accuracy("Two.", ten("2", 3)) == pytest.approx(0.9)        # both sides normalised


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert anls(" Hello ", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("abc", ["xyz"]) == 0.0                                      # below 0.5 counts as 0
    assert anls("abcd", ["abxy", "abcx"]) == pytest.approx(0.75)           # the best reference


def test_exact_match_rules():
    assert gqa_prediction("Yes.") == "yes"
    assert ai2d_match(" B ", ["b"]) and not ai2d_match("B.", ["b"])
    assert chartqa_match("3,000", ["3000"]) and not chartqa_match("30", ["3000"])


def test_pope_parsing_and_scores():
    assert pope_label("No, there is not.") == "no"
    assert pope_label("Yes. No dog") == "yes"          # only the text before the first '.'
    assert pope_label("There is no dog") == "no"
    assert pope_label("Nope") == "yes"                 # whole words only
    preds = ["Yes", "Yes", "No", "No", "Yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    s = pope_scores(preds, labels)
    assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)


def test_mme_parsing_and_scores():
    assert [mme_label(a) for a in ("Yes", "no", "Yes, it is.", "Not really", "Maybe")] == [
        "yes", "no", "yes", "no", "other"]
    rows = [("existence", "a.jpg", "Yes", "Yes"), ("existence", "a.jpg", "No", "No"),     # image a: both right
            ("existence", "b.jpg", "Yes", "No"), ("existence", "b.jpg", "No", "No"),      # image b: one right
            ("code_reasoning", "c.png", "Yes", "Maybe"), ("code_reasoning", "c.png", "No", "no")]
    s = mme_scores(rows)
    assert s["existence"] == pytest.approx(100 * 3 / 4 + 100 * 1 / 2)
    assert s["code_reasoning"] == pytest.approx(100 * 1 / 2 + 0)
    assert s["perception"] == pytest.approx(s["existence"]) and s["cognition"] == pytest.approx(s["code_reasoning"])
