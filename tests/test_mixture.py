"""Mixing recipes after the fact: the mean of their recorded out-of-fold probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import mixture

IMAGES = ["Covid/a.png", "Covid/b.png", "Normal/c.png", "Viral Pneumonia/d.png"]
TRUE = ["COVID-19", "COVID-19", "Normal", "Viral Pneumonia"]


def _run(probabilities: list[list[float]]) -> dict:
    """A training.evaluate run of two folds over the four images; the mirrored images are all
    taken for the true class with p = 0.5."""
    rows = [{"path": f"/data/train/{image}", "true": true, "probabilities": p,
             "flipped_probabilities": [0.5 if label == true else 0.25
                                       for label in ["COVID-19", "Normal", "Viral Pneumonia"]]}
            for image, true, p in zip(IMAGES, TRUE, probabilities, strict=True)]
    return {"folds": [{"predictions": rows[:2]}, {"predictions": rows[2:]}]}


# Each recipe is wrong on one image, on different images, and unsure where the other errs.
EDGE = _run([[0.4, 0.6, 0.0], [0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]])
PROBE = _run([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8]])


def test_the_mean_of_probabilities_can_beat_both_members() -> None:
    assert mixture.mixed_accuracy([EDGE]) == (0.75, 1)
    assert mixture.mixed_accuracy([PROBE]) == (0.75, 1)
    assert mixture.mixed_accuracy([EDGE, PROBE]) == (1.0, 0)


def test_rows_pair_the_seeds_every_member_ran(tmp_path: Path) -> None:
    for name, run in {"edge": EDGE, "edge@seed1": PROBE, "probe": PROBE, "probe@seed1": EDGE,
                      "probe@seed2": EDGE}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    rows = mixture.mixture_rows(mixture.load_by_recipe(tmp_path), ["edge", "probe"], baseline=["edge"])
    assert [r["name"] for r in rows] == ["edge", "probe", "edge + probe"]
    mixed = rows[-1]
    assert mixed["seeds"] == [0, 1] and mixed["accuracy"] == [1.0, 1.0] and mixed["errors"] == [0, 0]
    assert mixed["paired"] == pytest.approx([25.0, 25.0]) and rows[0]["paired"] is None
    table = mixture.markdown(rows, "edge")
    assert "| edge + probe | 0, 1 | 100.0% / 100.0% | 0 / 0 | 100.0% ± 0.0% | +25.0 ± 0.0 |" in table


def test_runs_without_probabilities_or_on_other_images_are_refused(tmp_path: Path) -> None:
    old = {"folds": [{"predictions": [{"path": "/d/train/Covid/a.png", "true": "COVID-19",
                                       "predicted": "COVID-19", "confidence": 0.9}]}]}
    with pytest.raises(mixture.MixtureError, match="no per-image probabilities"):
        mixture.mixed_accuracy([old])
    fewer = {"folds": EDGE["folds"][:1]}
    with pytest.raises(mixture.MixtureError, match="different images"):
        mixture.mixed_accuracy([EDGE, fewer])
    assert mixture.main(["--runs", str(tmp_path / "none"), "--members", "a,b"]) == 2


def test_a_flip_member_averages_with_the_mirrored_image(tmp_path: Path) -> None:
    # EDGE's one error (0.4 vs 0.6) becomes right once averaged with a mirrored 0.5 vs 0.25
    assert mixture.mixed_accuracy([EDGE], views=["flip"]) == (1.0, 0)
    (tmp_path / "edge.json").write_text(json.dumps(EDGE))
    rows = mixture.mixture_rows(mixture.load_by_recipe(tmp_path), ["edge:flip"], baseline=["edge"])
    assert [(r["name"], r["accuracy"]) for r in rows] == [("edge", [0.75]), ("edge:flip", [1.0])]
    plain = {"folds": [{"predictions": [{k: v for k, v in row.items()
                                         if k != "flipped_probabilities"}
                                        for row in fold["predictions"]]} for fold in EDGE["folds"]]}
    assert mixture.mixed_accuracy([plain]) == (0.75, 1)
    with pytest.raises(mixture.MixtureError, match="flipped probabilities"):
        mixture.mixed_accuracy([plain], views=["flip"])


def test_int8_answers_and_the_agreement_of_two_mixtures(tmp_path: Path) -> None:
    quantized = json.loads(json.dumps(PROBE))
    for fold in quantized["folds"]:
        for row in fold["predictions"]:
            row["int8_probabilities"] = row["probabilities"]
    quantized["folds"][0]["predictions"][0]["int8_probabilities"] = [0.2, 0.8, 0.0]  # one flip
    for name, run in {"edge": EDGE, "probe": quantized}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    runs = mixture.load_by_recipe(tmp_path)
    assert mixture.agreement(runs, ["probe"], ["probe:int8"]) == {0: (0.75, 1)}
    assert mixture.agreement(runs, ["edge", "probe"], ["edge", "probe:int8"]) == {0: (0.75, 1)}
    with pytest.raises(mixture.MixtureError, match="unknown view"):
        mixture.parse_member("probe:fp16")
    with pytest.raises(mixture.MixtureError, match="without --int8"):
        mixture.agreement(runs, ["edge"], ["edge:int8"])
    assert mixture.main(["--runs", str(tmp_path), "--members", "edge,probe",
                         "--versus", "edge,probe:int8", "--baseline", "edge"]) == 0


def _ensemble(members: list[list[list[float]]]) -> dict:
    """EDGE's run as an ensemble whose members answered `members` (one list per member)."""
    run = json.loads(json.dumps(EDGE))
    rows = [row for fold in run["folds"] for row in fold["predictions"]]
    for i, row in enumerate(rows):
        row["member_probabilities"] = [member[i] for member in members]
    return run


def test_first_members_of_ensembles_of_any_size_mix_by_pattern(tmp_path: Path) -> None:
    right = [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]]
    wrong = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    # member 0 right everywhere, members 1-2 wrong: k1 is right, k3's mean is wrong everywhere
    runs = {"edge+ens3": _ensemble([right, wrong, wrong]),
            "edge+ens5@seed1": _ensemble([right, wrong, wrong, right, right]),
            "probe": PROBE, "probe@seed1": PROBE}
    for name, run in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    assert mixture.mixed_accuracy([runs["edge+ens3"]], views=["k1"]) == (1.0, 0)
    assert mixture.mixed_accuracy([runs["edge+ens3"]], views=["k3"]) == (0.0, 4)
    by_name = mixture.load_by_recipe(tmp_path)
    rows = mixture.mixture_rows(by_name, ["edge+ens*:k3", "probe"], baseline=["edge+ens*:k1", "probe"])
    assert [r["name"] for r in rows] == ["edge+ens*:k1 + probe", "edge+ens*:k3", "probe",
                                         "edge+ens*:k3 + probe"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["paired"] is None
    assert rows[1]["errors"] == [4, 4]
    with pytest.raises(mixture.MixtureError, match="no answers of 6 members"):
        mixture.mixed_accuracy([runs["edge+ens5@seed1"]], views=["k6"])
    with pytest.raises(mixture.MixtureError, match="unknown view"):
        mixture.parse_member("edge:k0")
    (tmp_path / "edge+ens2.json").write_text(json.dumps(_ensemble([right, right])))
    with pytest.raises(mixture.MixtureError, match="matches two runs of seed 0"):
        mixture.mixture_rows(mixture.load_by_recipe(tmp_path), ["edge+ens*:k1"], baseline=["probe"])
    assert mixture.main(["--runs", str(tmp_path), "--members", "probe", "--baseline", "nothing*"]) == 2
