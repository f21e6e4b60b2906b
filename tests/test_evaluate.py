"""Cross-validated evaluation: recipes, the tables made from runs, and one tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ct_edge.preprocess import PreprocessSpec
from training import cv_runs, evaluate, mixture
from training.data import DataError
from training.train import TrainConfig


def _run(fold_accuracies: list[float], n_test: int = 10, wrong: list[str] = ()) -> dict:
    folds = [{"accuracy": a, "n_test": n_test, "loss": 0.5,
              "errors": [{"path": f"/d/train/Covid/{name}", "true": "COVID-19",
                          "predicted": "Normal", "confidence": 0.9}
                         for name in (wrong if i == 0 else [])]}
             for i, a in enumerate(fold_accuracies)]
    return {"folds": folds, "params": 1234}


def test_every_experiment_is_base_plus_its_change() -> None:
    cosine = evaluate.experiment_config(TrainConfig(spec=PreprocessSpec().to_dict()),
                              evaluate.EXPERIMENTS["cos-ls"])
    assert cosine.schedule == "cosine" and cosine.label_smoothing == 0.1
    assert cosine.arch == "edge-gap" and cosine.preprocess_spec().aspect == "crop"
    stretch = evaluate.experiment_config(TrainConfig(), evaluate.EXPERIMENTS["reference-stretch"])
    assert stretch.arch == "reference" and stretch.preprocess_spec().aspect == "stretch"
    assert stretch.schedule == "plateau" and stretch.augment


def test_seed_table_pools_images_and_pairs_seeds() -> None:
    runs = {"base": _run([0.9, 1.0]), "base@seed1": _run([0.8, 0.9]),
            "better": _run([1.0, 1.0]), "better@seed1": _run([0.9, 1.0]),
            "one-seed-only": _run([1.0, 1.0])}
    assert cv_runs.pooled_accuracy(runs["base"]) == pytest.approx(0.95)
    table = cv_runs.seed_table(runs, baseline="base")
    (better,) = [line for line in table.splitlines() if line.startswith("| better ")]
    assert "100.0% / 95.0%" in better and "97.5% ± 3.5%" in better
    assert "+7.5 ± 3.5 (2 seeds)" in better  # +5 and +10 points
    assert "one-seed-only" not in table


def test_hard_images_are_the_ones_every_run_gets_wrong() -> None:
    runs = {"a": _run([0.9], wrong=["x.png", "y.png"]), "b": _run([0.9], wrong=["x.png"])}
    text = cv_runs.hard_images(runs)
    assert text.startswith("1 image(s)") and "Covid/x.png: wrong 2x, taken for Normal 2x" in text
    assert "y.png" not in text


def test_a_tiny_cross_validation_with_an_ensemble_and_flip(synthetic_root: Path,
                                                           tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, patience=1, cache=str(tmp_path / "cache"))
    run = evaluate.cross_validate(synthetic_root, config, folds=2, cache=tmp_path / "cache",
                                  members=2, tta=True)
    assert [f["fold"] for f in run["folds"]] == [0, 1] and run["k"] == 2
    assert sum(f["n_test"] for f in run["folds"]) == run["n_images"] == 36
    for fold in run["folds"]:
        assert fold["epochs"] == 1
        assert len(fold["errors"]) == round((1 - fold["accuracy"]) * fold["n_test"])
    assert 0.0 <= run["summary"]["accuracy"]["mean"] <= 1.0
    # every image once, out of fold, with its temperature-scaled confidence
    predictions = [p for fold in run["folds"] for p in fold["predictions"]]
    assert len({p["path"] for p in predictions}) == len(predictions) == 36
    assert all(1 / 3 - 1e-6 <= p["confidence"] <= 1.0 for p in predictions)
    assert cv_runs.out_of_fold(run)[1].mean() == pytest.approx(cv_runs.pooled_accuracy(run))
    # ...and the ensemble's own probabilities, before the temperature, for training.mixture
    assert all(len(p["probabilities"]) == 3 and abs(sum(p["probabilities"]) - 1) < 1e-4
               and max(p["probabilities"]) == p["probabilities"][["COVID-19", "Normal",
               "Viral Pneumonia"].index(p["predicted"])] for p in predictions)
    assert mixture.mixed_accuracy([run])[0] == pytest.approx(cv_runs.pooled_accuracy(run))
    assert all(len(p["flipped_probabilities"]) == 3 for p in predictions)
    # each member's own answer: their mean is the ensemble's, k = 2 of 2 is its accuracy
    assert all(np.allclose(np.mean(p["member_probabilities"], axis=0), p["probabilities"],
                           atol=2e-6) for p in predictions)
    assert run["accuracy_by_members"]["2"] == pytest.approx(cv_runs.pooled_accuracy(run))
    # the members table agrees with the run's own figures, per fold and over all images
    table = cv_runs.members_table({"tiny@seed0": run}).splitlines()
    for k in ("1", "2"):
        (row,) = [line for line in table if f"(k = {k})" in line]
        cells = [cell.strip() for cell in row.split("|")]
        assert sum(map(int, cells[3].split(" / "))) == int(cells[4]) == round(
            (1 - run["accuracy_by_members"][k]) * 36)
        if k == "2":  # all members: the ensemble the run scored, fold by fold
            assert list(map(int, cells[3].split(" / "))) == [len(f["errors"]) for f in run["folds"]]
    assert "each member alone" in table[-1]
    assert cv_runs.members_table({"single": {"folds": [{"predictions": [{}]}]}}) == ""
    assert cv_runs.members_table({"unstored": {"folds": [{"n_test": 3}]}}) == ""
    single = evaluate.cross_validate(synthetic_root, config, folds=2, cache=tmp_path / "cache")
    assert "accuracy_by_members" not in single
    assert "member_probabilities" not in single["folds"][0]["predictions"][0]
    assert single["folds"][0]["n_test"] == run["folds"][0]["n_test"]  # the same folds...
    assert [f["loss"] for f in single["folds"]] != [f["loss"] for f in run["folds"]]  # ...averaged


def test_int8_check_converts_each_fold_and_runs_it_in_the_runtime(synthetic_root: Path,
                                                                   tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, patience=1, cache=str(tmp_path / "cache"))
    run = evaluate.cross_validate(synthetic_root, config, folds=2, cache=tmp_path / "cache",
                                  int8=True)
    for fold in run["folds"]:
        assert 0.0 <= fold["int8_accuracy"] <= 1.0 and 0.0 <= fold["int8_agreement"] <= 1.0
    assert "int8_agreement" in run["summary"]
    # each image's int8 answers too, so training.mixture can mix the artifacts' answers
    for fold in run["folds"]:
        int8_top1 = [int(np.argmax(p["int8_probabilities"])) for p in fold["predictions"]]
        keras_top1 = [int(np.argmax(p["probabilities"])) for p in fold["predictions"]]
        assert np.mean(np.equal(int8_top1, keras_top1)) == pytest.approx(fold["int8_agreement"])
    with pytest.raises(ValueError, match="single model"):
        evaluate.cross_validate(synthetic_root, config, folds=2, members=2, int8=True)


def _predicting_run(seed: int, n: int = 40) -> dict:
    """A run whose folds recorded every image: wrong answers are the less confident ones."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.4, 1.0, n)
    wrong = confidence < 0.55
    predictions = [{"path": f"/d/train/Normal/{i}.png", "true": "Normal",
                    "predicted": "COVID-19" if w else "Normal", "confidence": float(c)}
                   for i, (c, w) in enumerate(zip(confidence, wrong, strict=True))]
    folds = [{"accuracy": 1 - wrong[:20].mean(), "n_test": 20, "loss": 0.5,
              "predictions": predictions[:20]},
             {"accuracy": 1 - wrong[20:].mean(), "n_test": 20, "loss": 0.5,
              "predictions": predictions[20:]}]
    return {"folds": folds, "params": 1, "k": 2, "n_images": n, "config": {"data": "/d/xray"}}


def test_abstention_table_and_plot_pool_the_seeds_of_a_recipe(tmp_path: Path) -> None:
    runs = {"base": _predicting_run(0), "base@seed1": _predicting_run(1),
            "old": _run([0.9, 0.8])}  # recorded no predictions: left out
    confidence, correct = cv_runs.out_of_fold(runs["base"])
    assert len(confidence) == 40 and (correct == (confidence >= 0.55)).all()
    table = cv_runs.abstention_table(runs)
    (row,) = [line for line in table.splitlines() if line.startswith("| base ")]
    pooled = np.concatenate([cv_runs.out_of_fold(runs[k])[0] for k in ("base", "base@seed1")])
    wrong = pooled < 0.55
    # the rule by brute force: the lowest threshold answering >= 50% with <= 3% of them wrong
    threshold = min(t for t in pooled if (pooled >= t).mean() >= 0.5
                    and wrong[pooled >= t].mean() <= 0.03)
    assert "| 0, 1 | 80 | 20.0% |" in row and f"| {threshold:.3f} |" in row and "| yes |" in row
    assert row.endswith("| yes | — |")  # no int8 answers recorded
    assert "| old " not in table
    # with --int8 answers: the images the int8 confidence puts across that threshold
    answered, unanswered = pooled[pooled >= threshold].min(), pooled[pooled < threshold].max()
    for run in (runs["base"], runs["base@seed1"]):
        for fold in run["folds"]:
            fold["temperature"] = 1.0
            for p in fold["predictions"]:
                c = {answered: threshold - 0.01, unanswered: threshold + 0.01}.get(
                    p["confidence"], p["confidence"])
                p["int8_probabilities"] = [c, (1 - c) / 2, (1 - c) / 2]
    (row,) = [line for line in cv_runs.abstention_table(runs).splitlines()
              if line.startswith("| base ")]
    assert row.endswith("| yes | 97.5% (2 differ) |")
    for fold in runs["base@seed1"]["folds"]:  # only seed 0 run with --int8: its images alone
        for p in fold["predictions"]:
            del p["int8_probabilities"]
    (row,) = [line for line in cv_runs.abstention_table(runs).splitlines()
              if line.startswith("| base ")]
    assert row.endswith("| yes | 97.5% (1 differ; seed 0) |")  # one of the two moved is seed 0's
    (plot,) = cv_runs.abstention_plots(runs, tmp_path)
    assert plot.name == "abstention-base.png" and plot.read_bytes().startswith(b"\x89PNG")


def test_cv_runs_prints_the_tables_of_a_results_folder(tmp_path: Path, capsys) -> None:
    for label in ("base", "base@seed1"):
        run = _predicting_run(0 if label == "base" else 1)
        (tmp_path / f"{label}.json").write_text(json.dumps(run))
    assert cv_runs.main([str(tmp_path), "--baseline", "base"]) == 0
    printed = capsys.readouterr().out
    assert "| base | 0, 1 |" in printed and "int8 same ok / uncertain" in printed
    assert cv_runs.main([str(tmp_path / "empty")]) == 2
    assert "no training.evaluate runs" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch) -> None:
    """Any cross-validation or model fit fails the test: these checks come before training."""
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the arguments were unusable")

    monkeypatch.setattr(evaluate, "cross_validate", refuse)
    monkeypatch.setattr(evaluate, "fit_model", refuse)


@pytest.mark.parametrize(("argv", "message"), [
    (["--folds", "0"], "must be 1 or more"), (["--folds", "-1"], "must be 1 or more"),
    (["--folds", "1"], "2 or more folds"), (["--epochs", "0"], "must be 1 or more"),
    (["--experiments", ","], "names no experiment"), (["--seed", "-1"], "0 or more"),
    (["--int8", "--members", "2"], "single model"),
])
def test_cli_usage_errors_exit_2_before_training(argv: list[str], message: str, tmp_path: Path,
                                                 no_training, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"),
                       "--experiments", "edge-gap-crop", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_every_option_states_its_default() -> None:
    parser = evaluate.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings


def test_cli_checks_out_and_earlier_results_before_training(synthetic_root: Path, tmp_path: Path,
                                                            no_training, capsys) -> None:
    argv = ["--data", str(synthetic_root), "--experiments", "edge-gap-crop", "--folds", "2"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert evaluate.main([*argv, "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {afile / synthetic_root.name}: {afile} is not a folder\n"
    results = tmp_path / "out" / synthetic_root.name
    results.mkdir(parents=True)
    (results / "edge-gap-crop.json").mkdir()  # where this run's result would go
    assert evaluate.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "edge-gap-crop.json is a folder" in capsys.readouterr().err
    (results / "edge-gap-crop.json").rmdir()
    for broken, problem in (("{", "unreadable earlier result"), ("{}", "not a training.evaluate")):
        (results / "old.json").write_text(broken)
        assert evaluate.main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {results / 'old.json'}: {problem}") and err.count("\n") == 1
    assert evaluate.main(["--data", str(afile)]) == 2
    assert capsys.readouterr().err == f"error: data folder {afile} is not a folder (it is a file)\n"


def test_too_many_folds_for_the_images_is_refused_before_training(synthetic_root: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("trained although a fold is empty")

    monkeypatch.setattr(evaluate, "fit_model", refuse)
    config = TrainConfig(epochs=1, cache=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="too few for 13 folds"):
        evaluate.cross_validate(synthetic_root, config, folds=13, cache=tmp_path / "cache")


@pytest.mark.slow
def test_cli_writes_the_run_and_the_summary(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    argv = ["--data", str(synthetic_root), "--experiments", "edge-gap-crop", "--folds", "2",
            "--epochs", "1", "--out", str(tmp_path)]
    assert evaluate.main(argv) == 0
    results = tmp_path / synthetic_root.name
    names = sorted(p.name for p in results.iterdir())
    assert "edge-gap-crop.json" in names and "summary.md" in names
    assert not [n for n in names if n.startswith(".")]  # no temp file left
    assert "| edge-gap-crop |" in (results / "summary.md").read_text()
    assert "fold 2/2" in capsys.readouterr().out
