"""The study driver (pipeline.studies): units, their params and resume, and the collected results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.params import Params
from pipeline.studies import definitions
from pipeline.studies import results as collected
from pipeline.studies import units as runner


def committed() -> dict:
    return json.loads(Params().model_dump_json())


def fake_unit(unit: runner.Unit, quality: float) -> None:
    """What train + evaluate leave: the fold's metrics and per-episode counts (2 test seeds)."""
    rng = np.random.default_rng(1000 * unit.fold + unit.seed)  # the same draws for every row
    n = 40
    union = rng.integers(50, 150, 2 * n)
    counts = pd.DataFrame({"shot": np.repeat([1, 5], n), "seed": np.tile(np.repeat([0, 1], n // 2), 2),
                           "episode": np.tile(np.arange(n), 2), "class_id": np.tile([1, 2, 3, 4], n // 2),
                           "inter": rng.binomial(union, quality), "union": union})
    (unit.dir / "metrics").mkdir(parents=True, exist_ok=True)
    counts.to_parquet(unit.dir / "metrics" / f"fold{unit.fold}_episodes.parquet")
    metrics = {"best_val_miou": 100 * quality, **{f"shot{s}": {"miou": 100 * quality} for s in (1, 5)}}
    (unit.dir / "metrics" / f"fold{unit.fold}.json").write_text(json.dumps(metrics))


def test_units_have_validated_params_and_equal_configurations_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = definitions.STUDIES["ablation"]
    units = runner.plan(study, list(study.rows), [0, 1], [0, 1], committed(), "inputs")
    assert len(units) == len(study.rows) * 2 * 2 and len({u.dir for u in units}) == len(study.rows) * 2
    params = yaml.safe_load((units[0].dir / "params.yaml").read_text())
    assert params["model"]["dps"] is False and params["model"]["pseudo_masks"] == "initial"
    assert params["train"]["seed"] == 0 and not any(u.done for u in units)
    again = runner.plan(study, list(study.rows), [0], [0], committed(), "inputs")
    assert again[0].dir == units[0].dir  # a re-run finds its units
    other = runner.plan(study, list(study.rows), [0], [0], committed(), "changed code")
    assert other[0].dir != units[0].dir  # other code or data: other units
    elsewhere = committed()
    elsewhere["prepare"]["synthetic"]["seed"] = 7  # reaches a unit through its data's hashes only
    assert runner.plan(study, list(study.rows), [0], [0], elsewhere, "inputs")[0].dir == units[0].dir
    bad = definitions.Study({"typo": {"model.dps": "sometimes"}}, "typo")
    with pytest.raises(SystemExit, match="row 'typo': model.dps: Input should be a valid boolean"):
        runner.plan(bad, ["typo"], [0], [0], committed(), "inputs")
    with pytest.raises(SystemExit, match="no such param"):
        definitions.with_overrides(committed(), {"train.epochz": 3})


def test_collect_summarizes_compares_and_lists_what_is_pending(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = definitions.Study({"full": {}, "worse": {"model.dps": False}, "later": {"model.vvp": False}},
                              "full", (("DPS", "full", "worse"),))
    units = runner.plan(study, list(study.rows), [0, 1, 2], [0, 1], committed(), "inputs")
    for unit in units:
        if unit.row != "later":
            fake_unit(unit, 0.6 if unit.row == "full" else 0.5)
    fake_unit(next(u for u in units if u.row == "later"), 0.6)  # one fold of one seed: not a row yet
    results = collected.collect("ablation", study, units, committed(), replicates=200)
    assert [r["name"] for r in results["rows"]] == ["full", "worse"] and results["pending"] == ["later"]
    full, worse = results["rows"]
    assert full["train_seeds"] == [0, 1, 2] and full["shots"]["1"]["train_seeds"] == 3
    assert full["shots"]["1"]["test_seeds"] == 2 and "vs_reference" not in full["shots"]["1"]
    assert full["val_miou"] == {"mean": 60.0, "train_std": 0.0}
    one = collected.collect("ablation", study, [u for u in units if u.seed == 0], committed(), replicates=50)
    assert one["rows"][0]["shots"]["1"]["train_std"] is None  # JSON has no NaN
    diff = worse["shots"]["5"]["vs_reference"]
    assert diff["delta"] == pytest.approx(worse["shots"]["5"]["mean"] - full["shots"]["5"]["mean"], abs=0.02)
    assert diff["delta"] < -5 and diff["mark"] == "**" and diff["train_seeds"] == [0, 1, 2]
    contrast = results["contrasts"][0]
    assert contrast["component"] == "DPS" and contrast["shots"]["1"]["delta"] > 5  # full - worse
    assert contrast["val"] == {"delta": 10.0, "wins": 6, "pairs": 6, "p": 0.0312}  # 3 seeds x 2 folds
    assert worse["metrics"]["seed2"]["fold1"]["shot1"]["miou"] == 50.0
    assert Path("data/ablation_runs").is_dir()


def test_a_study_on_a_benchmark_of_its_own_refuses_params_without_it():
    parts = definitions.STUDIES["parts"]
    with pytest.raises(SystemExit, match="the parts study needs prepare.synthetic.parts: True .it is False.; "
                                         "`make parts-study`"):
        definitions.check_requires("parts", parts, Params())
    made = Params.model_validate({"prepare": {"synthetic": {"parts": True}}})
    definitions.check_requires("parts", parts, made)
    definitions.check_requires("ablation", definitions.STUDIES["ablation"], Params())  # requires nothing


def test_default_parallelism_is_one_unit_per_gpu_or_a_few_cpu_jobs(monkeypatch):
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    assert runner.default_jobs() == (2, 8, 2)  # never two units on one GPU
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 0)
    assert runner.default_jobs() == (4, 4, 0)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    assert runner.default_jobs() == (2, 1, 0)
