from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.core.errors import PipelineError
from pipeline.core.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_match_the_schema_defaults():
    shipped = load_params(REPO / "params.yaml")
    assert shipped == Params()  # params.yaml spells out the defaults, nothing else


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return keys


def test_params_yaml_spells_out_every_key_of_the_schema():
    """DVC tracks params by their values in params.yaml, so a stage need not depend on the schema
    file: a default that params.yaml did not spell out could change a stage behind DVC's back."""
    written = leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert written == leaf_keys(Params().model_dump())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"episodes": {"shots": [1, 0]}}, "episodes.shots[1] = 0: should be greater than 0"),
        ({"episodes": {"seeds": [3, 3]}}, "episodes.seeds = [3, 3]: values must be distinct"),
        ({"split": {"min_pixels": 0}}, "split.min_pixels = 0: should be 'auto' or greater than"),
        ({"split": {"novel_in_train": "keep"}}, "split.novel_in_train = 'keep': should be 'drop' or 'mask'"),
        ({"prepare": {"synthetic": {"image_size": 8}}}, "prepare.synthetic.image_size = 8"),
        ({"episodes": {"shotz": [1]}}, "unknown key 'episodes.shotz'"),
        ({"train": {"augment": "papers"}}, "train.augment = 'papers': needs train.features = 'online'"),
        ({"train": {"features": "online", "augment": "papers", "augment_scale": [1.2, 0.8]}},
         "train.augment_scale = [1.2, 0.8]: should be [low, high]"),
        ({"train": {"sampling": "fresh"}}, "train.sampling = 'fresh': should be 'pool' or 'epoch'"),
        # renamed keys: an error naming the new key, never a silent alias
        ({"model": {"fcm": False}}, "model.fcm is now model.ccm: rename the key"),
        ({"train": {"precision": "fp32"}}, "train.precision is now train.dtype"),
        ({"priors": {"precision": "fp32"}}, "priors.precision is now priors.dtype"),
        ({"clip": {"tiny": {"precision": "auto"}}}, "clip.tiny.precision is now clip.tiny.dtype"),
    ],
)
def test_bad_value_is_one_line_naming_key_value_and_allowed(raw, expected):
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and message.startswith("params.yaml: ")


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(PipelineError, match="missing.yaml: not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(PipelineError, match=r"bad.yaml:2:1: not valid YAML \(expected .,. or .\]."):
        load_params(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PipelineError, match="list.yaml: expected a mapping"):
        load_params(listed)


STAGES = ("prepare", "clip_model", "split", "episodes", "priors", "features", "pseudo_masks", "train",
          "evaluate", "report")


@pytest.mark.parametrize("text", ["", "\n  \n", "# every line a comment\n# dataset: {}\n", "---\n"])
def test_an_empty_params_file_is_one_line_through_every_entry_point(tmp_path, monkeypatch, capsys, text):
    """An empty (or comments-only) params.yaml used to run on the schema's defaults (`python -m
    stages.split`: exit 0): every way in reads it through `load_params` and says so in one line."""
    import importlib

    from pipeline.config import check, presets
    from pipeline.studies.__main__ import main as study
    from stages._deps import main as deps

    empty = tmp_path / "params.yaml"
    empty.write_text(text)
    with pytest.raises(PipelineError, match=f"^{empty}: empty \\(expected a mapping of params sections"):
        load_params(empty)
    runs = {name: lambda name=name: importlib.import_module(f"stages.{name}").main(
        ["--params", str(empty), *(["--fold", "0"] if name in ("train", "evaluate") else [])])
        for name in STAGES}
    runs["pipeline.config.check"] = lambda: check.main([str(empty)])
    runs["pipeline.config.presets"] = lambda: presets.main(["--set", "train.epochs=3",
                                                            "--params", str(empty)])
    runs["stages._deps"] = lambda: deps(["--check", "--params", str(empty)])
    monkeypatch.chdir(tmp_path)  # the studies read ./params.yaml
    runs["pipeline.studies"] = lambda: study(["ablation", "--collect"])
    for name, run in runs.items():
        assert run() == 1, name
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("error: ") and "params.yaml: empty" in err and "\n" not in err, (name, err)
        assert not captured.out, name
    assert empty.read_text() == text


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.episodes.shots = [1]  # type: ignore[misc]


def test_yaml_errors_give_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  name: synthetic\ntrain:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(PipelineError) as err:
        load_params(bad)
    assert str(err.value).startswith(f"{bad}:5:") and "not valid YAML" in str(err.value)


def test_the_params_check_make_repro_runs_first(tmp_path, capsys):
    """`python -m pipeline.config.check`: the shipped file passes; a typo'd section, a missing
    section (DVC would delete outputs before failing), a bad orchestration value (no stage lists
    those params, so DVC never runs a stage that would see it) and a bad dataset (the schema does not
    know the registry's names) each fail with one line."""
    from pipeline.config import check as schema

    assert schema.main([str(REPO / "params.yaml")]) == 0
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    cases = [
        ({**{k: v for k, v in shipped.items() if k != "train"}, "trian": shipped["train"]},
         "unknown key 'trian'"),
        ({k: v for k, v in shipped.items() if k != "evaluate"}, "section 'evaluate' is missing"),
        ({**shipped, "orchestration": {**shipped["orchestration"], "task_runner": "thread"}},
         "orchestration.task_runner = 'thread'"),
        ({**shipped, "dataset": {"name": "voc"}},
         "dataset.name = 'voc': should be 'synthetic', 'pascal' or 'coco'"),
        ({**shipped, "dataset": {"name": "pascal"}}, "dataset.root: required for dataset.name = 'pascal'"),
        ({**shipped, "dataset": {"root": "/elsewhere"}}, "dataset.root = '/elsewhere': the synthetic"),
    ]
    for raw, expected in cases:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert schema.main([str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert expected in err and err.startswith("error: ") and "\n" not in err, err
