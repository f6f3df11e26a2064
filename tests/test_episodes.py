import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import PipelineError
from pipeline.datasets.episodes import (
    EPISODE_SCHEMA,
    check_shots,
    draw_epoch_episodes,
    draw_pool_episodes,
    draw_test_episodes,
    query_pairs,
)

# 3 classes; class 2 has 3 images, the others 8. Images may hold two classes.
PAIRS = pd.DataFrame(
    [(f"img{i}", 1) for i in range(8)] + [(f"img{i}", 2) for i in (1, 4, 9)]
    + [(f"img{i}", 3) for i in range(10, 18)], columns=["image_id", "class_id"])


def test_hsnet_queries_in_order_and_cycled():
    table = draw_test_episodes(PAIRS, fold=1, shot=1, seed=0, n=50, protocol="hsnet")
    assert table.schema == EPISODE_SCHEMA and table.num_rows == 50
    df = table.to_pandas()
    expected = [PAIRS.iloc[i % len(PAIRS)] for i in range(50)]
    assert list(df["query"]) == [r.image_id for r in expected]
    assert list(df["class_id"]) == [r.class_id for r in expected]
    assert list(df["episode"]) == list(range(50))
    assert set(df["fold"]) == {1} and set(df["shot"]) == {1} and set(df["seed"]) == {0}


@pytest.mark.parametrize("protocol", ["hsnet", "pfenet"])
@pytest.mark.parametrize("shot", [1, 2])
def test_supports_are_distinct_same_class_never_the_query(protocol, shot):
    df = draw_test_episodes(PAIRS, 0, shot, 3, 300, protocol).to_pandas()
    members = PAIRS.groupby("class_id")["image_id"].apply(set)
    for row in df.itertuples():
        assert len(row.supports) == shot == len(set(row.supports))
        assert row.query not in row.supports
        assert set(row.supports) <= members[row.class_id]
    # random supports: every candidate is drawn at some point
    class1 = df[df.class_id == 1]
    assert {s for sup in class1.supports for s in sup} == members[1]


def test_pfenet_seeds_draw_different_queries_and_supports():
    a = draw_test_episodes(PAIRS, 0, 1, 0, 10, "pfenet").to_pandas()
    b = draw_test_episodes(PAIRS, 0, 1, 1, 10, "pfenet").to_pandas()
    assert list(a["query"]) != list(b["query"])
    assert list(a["query"]) != list(PAIRS["image_id"][:10])  # not in list order
    assert a.equals(draw_test_episodes(PAIRS, 0, 1, 0, 10, "pfenet").to_pandas())  # seeded


def test_rebuild_is_byte_identical(tmp_path):
    for name in ("a", "b"):
        pq.write_table(draw_test_episodes(PAIRS, 2, 2, 0, 100, "hsnet"), tmp_path / f"{name}.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_training_pool_is_seeded_and_random():
    a = draw_pool_episodes(PAIRS, 0, 1, 0, 200, "train").to_pandas()
    assert a.equals(draw_pool_episodes(PAIRS, 0, 1, 0, 200, "train").to_pandas())
    assert not a.equals(draw_pool_episodes(PAIRS, 0, 1, 1, 200, "train").to_pandas())
    assert not a.equals(draw_pool_episodes(PAIRS, 0, 1, 0, 200, "val").to_pandas())
    assert set(np.unique(a["class_id"])) == {1, 2, 3}


def test_too_many_shots_names_param_and_class():
    check_shots(PAIRS, [1, 2, 3], 2, ["circle", "star", "ring"], "fold 0 test")
    with pytest.raises(PipelineError) as err:
        check_shots(PAIRS, [1, 2, 3], 3, ["circle", "star", "ring"], "fold 0 test")
    assert str(err.value) == (
        "episodes.shots: 3-shot needs 4 images of class 'star' (fold 0 test) but only 3 have it")
    with pytest.raises(PipelineError, match="class 'void' .* only 0"):
        check_shots(PAIRS, [4], 1, ["a", "b", "c", "void"], "fold 0 test")


def test_epoch_sampling_visits_every_pair_once_with_fresh_supports_each_epoch():
    pairs = set(PAIRS.itertuples(index=False, name=None))
    first, second = (draw_epoch_episodes(PAIRS, 2, 1, 0, epoch).to_pandas() for epoch in (0, 1))
    for table in (first, second):
        assert table.episode.tolist() == list(range(len(PAIRS)))
        assert sorted(zip(table["query"], table["class_id"], strict=True)) == sorted(pairs)
        assert all(q not in s for q, s in zip(table["query"], table["supports"], strict=True))
    assert first["query"].tolist() != second["query"].tolist()  # a fresh order every epoch
    by_pair = [{(q, c): s[0] for q, c, s in zip(t["query"], t["class_id"], t["supports"], strict=True)}
               for t in (first, second)]
    assert sum(by_pair[0][p] != by_pair[1][p] for p in pairs) > len(pairs) // 3  # and fresh supports
    shuffled = PAIRS.sample(frac=1, random_state=1)  # the pairs' order does not matter: their set does
    assert draw_epoch_episodes(shuffled, 2, 1, 0, 1).equals(draw_epoch_episodes(PAIRS, 2, 1, 0, 1))
    assert draw_epoch_episodes(query_pairs(first), 2, 1, 0, 0).to_pandas().equals(first)  # manifest -> pairs


@pytest.mark.parametrize("n", [5, 40])
def test_epoch_sampling_takes_n_episodes_of_the_epochs_order(n):
    every = draw_epoch_episodes(PAIRS, 0, 1, 0, 3).to_pandas()
    table = draw_epoch_episodes(PAIRS, 0, 1, 0, 3, n).to_pandas()
    assert len(table) == n
    assert table["query"].tolist()[: min(n, len(PAIRS))] == every["query"].tolist()[:n]
