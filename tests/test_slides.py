"""The slide's consensus: a field called otherwise than most of its slide is flagged for a person,
in `bcc classify`'s report from the shipped model on real images, and as a slide fills up."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import openpyxl
import pytest
from typer.testing import CliRunner

from bcc_desk.bundle import load_bundle
from bcc_desk.cli import app
from bcc_desk.prediction import REVIEW_DISAGREES, REVIEW_LOW_CONFIDENCE, REVIEW_UNFAMILIAR, Prediction, error_prediction
from bcc_desk.slides import disagrees_with_slide, with_slide_consensus

from conftest import CLASSES


def test_an_image_outside_its_slides_majority_is_flagged_and_a_split_slide_wholly() -> None:
    slides = ["a"] * 4 + ["b"] * 2 + ["c"] + ["d"] * 3
    labels = ["Pre-B", "Pre-B", "Pre-B", "Pro-B",  # a: 3 of 4 agree, the fourth disagrees
              "Benign", "Pro-B",  # b: one each, no majority: both
              "Pro-B",  # c: alone, nothing to disagree with
              "Benign", None, "Benign"]  # d: an unreadable image neither votes nor is flagged
    assert disagrees_with_slide(slides, labels) == [False, False, False, True, True, True, False, False, False, False]
    # Exactly half is not more than half: a 2-2 slide is split.
    assert disagrees_with_slide(["s"] * 4, ["A", "A", "B", "B"]) == [True] * 4
    with pytest.raises(ValueError, match="3 slides but 2 labels"):
        disagrees_with_slide(["s"] * 3, ["A", "B"])


def _pred(slide: str, name: str, label: str, confidence: float, reason: str = "") -> Prediction:
    path = Path("/case") / slide / name
    return Prediction(path=path, file=f"{slide}/{name}", slide=slide, label=label, confidence=confidence, margin=0.1,
                      probabilities={label: confidence}, needs_review=bool(reason), review_reason=reason, error=None,
                      model="m", model_sha256="0" * 64)


def test_flags_follow_the_slide_as_it_fills_up_and_keep_the_other_reasons() -> None:
    """A daemon's slide grows image by image: the flags are judged again each time, so a flag
    comes and goes with the slide; low confidence is judged by the slide cut-off once the image
    has company, by the model's own cut-off while it is alone; unfamiliar stays."""
    alone, in_slide = 0.9, 0.5
    first = _pred("s1", "1.jpg", "Pro-B", 0.7, REVIEW_LOW_CONFIDENCE)  # as the classifier flagged it alone
    assert with_slide_consensus([first], alone, in_slide) == [first]
    two = with_slide_consensus([first, _pred("s1", "2.jpg", "Pre-B", 0.95)], alone, in_slide)
    assert [p.review_reason for p in two] == [REVIEW_DISAGREES, REVIEW_DISAGREES]  # split 1-1: both
    three = with_slide_consensus([*two, _pred("s1", "3.jpg", "Pre-B", 0.99, REVIEW_UNFAMILIAR)], alone, in_slide)
    assert [(p.needs_review, p.review_reason) for p in three] == [
        (True, REVIEW_DISAGREES), (False, ""), (True, REVIEW_UNFAMILIAR)]  # 0.7 passes the slide cut-off
    # A fourth image, Pro-B at 0.4: the slide is split 2-2 now, and it is below the slide cut-off too.
    four = with_slide_consensus([*three, _pred("s1", "4.jpg", "Pro-B", 0.4)], alone, in_slide)
    assert [p.review_reason for p in four] == [REVIEW_DISAGREES, REVIEW_DISAGREES,
                                               f"{REVIEW_UNFAMILIAR}; {REVIEW_DISAGREES}",
                                               f"{REVIEW_LOW_CONFIDENCE}; {REVIEW_DISAGREES}"]
    # Settled twice, the same: nothing is flagged twice over.
    assert with_slide_consensus(four, alone, in_slide) == four
    # Unreadable images are left as they are, and do not count towards a slide.
    bad = error_prediction(Path("/case/s2/x.jpg"), Path("/case"), "not an image", "m", "0" * 64)
    lone = _pred("s2", "y.jpg", "Benign", 0.6)
    assert with_slide_consensus([bad, lone], alone, in_slide) == [bad, replace(
        lone, needs_review=True, review_reason=REVIEW_LOW_CONFIDENCE)]


def test_one_review_policy_from_the_classifier_to_the_run_record(tmp_path: Path) -> None:
    """#38: every front end flags through `ReviewPolicy.apply`; the policy the classifier makes is
    the one its run record keeps (the app's review session applies that again), and with the
    consensus off each image stays as it was flagged alone."""
    from bcc_desk.classifier import Classifier
    from bcc_desk.review_policy import ReviewPolicy
    from bcc_desk.run_record import run_info

    from bundles import make_bundle

    bundle = make_bundle(tmp_path / "m")
    two = [_pred("s1", "1.jpg", "Pro-B", 0.99), _pred("s1", "2.jpg", "Pre-B", 0.99)]
    for consensus in (True, False):
        clf = Classifier(load_bundle(bundle), device="cpu", compile=False, slide_consensus=consensus)
        policy = clf.review_policy
        assert policy == run_info(clf, root=tmp_path, command="test").review_policy
        assert policy.consensus is consensus and policy.alone == clf.review_threshold
        flagged = [p.review_reason for p in policy.apply(two)]
        assert flagged == ([REVIEW_DISAGREES] * 2 if consensus else ["", ""])
    assert ReviewPolicy(0.9, 0.5).apply(two) == with_slide_consensus(two, 0.9, 0.5)


@pytest.fixture(scope="module")
def mixed_slide(tmp_path_factory, all4: Path) -> Path:
    """One slide of three real Benign fields and one real Pro-B field, and a second slide of one
    Pro-B field alone."""
    root = tmp_path_factory.mktemp("consensus") / "case"
    (root / "slide-1").mkdir(parents=True)
    (root / "slide-2").mkdir()
    for f in sorted((all4 / CLASSES[0]).glob("*.jpg"))[:3]:
        shutil.copy(f, root / "slide-1" / f.name)
    pro = sorted((all4 / CLASSES[3]).glob("*.jpg"))
    shutil.copy(pro[0], root / "slide-1" / pro[0].name)
    shutil.copy(pro[1], root / "slide-2" / pro[1].name)
    return root


def _classify(root: Path, out: Path, *args: str) -> tuple[list[dict], dict]:
    result = CliRunner().invoke(app, ["classify", str(root), "--out", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    wb = openpyxl.load_workbook(out)
    ws = wb["Images"]
    header = [c.value for c in ws[1]]
    rows = [dict(zip(header, r)) for r in ws.iter_rows(min_row=2, values_only=True)]
    run = {r[0]: r[1] for r in wb["Run"].iter_rows(values_only=True)}
    return rows, run


def test_bcc_classify_flags_the_field_that_disagrees_with_its_slide(mixed_slide: Path, tmp_path: Path) -> None:
    """The shipped model on real fields: the Pro-B field among three Benign ones is flagged, the
    Benign ones are not for that reason, the lone Pro-B field has nothing to disagree with."""
    rows, run = _classify(mixed_slide, tmp_path / "on.xlsx")
    by_file = {r["file"]: r for r in rows}
    labels = {f: r["label"] for f, r in by_file.items()}
    assert sorted(labels[f] for f in labels if f.startswith("slide-1/")) == ["Benign"] * 3 + ["Pro-B"], labels
    for f, r in by_file.items():
        disagrees = REVIEW_DISAGREES in (r["review_reason"] or "")
        assert disagrees == (f.startswith("slide-1/") and r["label"] == "Pro-B"), (f, r["review_reason"])
        assert r["needs_review"] is True or not disagrees
    assert run["slide consensus"].startswith("on")
    assert isinstance(run["review threshold, agreeing with its slide"], float)

    rows, run = _classify(mixed_slide, tmp_path / "off.xlsx", "--no-slide-consensus")
    assert not any(REVIEW_DISAGREES in (r["review_reason"] or "") for r in rows)
    assert run["slide consensus"].startswith("off")


def test_the_review_session_judges_a_slide_again_as_it_grows() -> None:
    """The desktop app's table (watching a folder, or a batch arriving) shows the flags as the
    slide stands: a field that later turns out to disagree is flagged and its row is redrawn; a
    field that agrees with its slide is held to the slide cut-off; the slide counts follow."""
    from bcc_desk.review import ReviewSession
    from bcc_desk.run_record import RunInfo

    info = RunInfo.collect(models=[("m", "0" * 64)], classes=["Pre-B", "Pro-B"], review_threshold=0.9,
                           ood_check="off", tta=False, device="cpu", root="/case", slide_review_threshold=0.5)
    session = ReviewSession()
    session.classes = list(info.classes)
    session.start(Path("/case"))
    session.run_info = info
    changed: list[tuple[int, int]] = []
    session.changed.connect(lambda a, b: changed.append((a, b)))
    session.add([_pred("s1", "1.jpg", "Pro-B", 0.95)])
    assert not session.prediction(0).needs_review and changed == []
    session.add([_pred("s1", "2.jpg", "Pre-B", 0.95), _pred("s1", "3.jpg", "Pre-B", 0.7, REVIEW_LOW_CONFIDENCE)])
    assert [session.prediction(i).review_reason for i in range(3)] == [REVIEW_DISAGREES, "", ""]
    assert changed and min(a for a, _ in changed) == 0  # the first row is redrawn
    assert session.slide_counts()["s1"].flagged == 1
    # The consensus off (the Run sheet has no slide cut-off): rows stay as the classifier made them.
    plain = ReviewSession()
    plain.start(Path("/case"))
    plain.run_info = replace(info, slide_review_threshold=None)
    plain.add([_pred("s1", "1.jpg", "Pro-B", 0.95), _pred("s1", "2.jpg", "Pre-B", 0.95)])
    assert not any(plain.prediction(i).needs_review for i in range(2))
