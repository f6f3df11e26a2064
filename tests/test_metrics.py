import numpy as np
import pytest
import torch

from pipeline.core.metrics import IGNORE, FewShotMeter, binary_target


def reference(preds, targets, classes):
    """Brute force, one pixel at a time."""
    inter, union, fb_i, fb_u = {}, {}, [0, 0], [0, 0]
    for pred, target, c in zip(preds, targets, classes, strict=True):
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
            if t == IGNORE:
                continue
            inter[c] = inter.get(c, 0) + (p == 1 and t == 1)
            union[c] = union.get(c, 0) + (p == 1 or t == 1)
            for k in (0, 1):
                fb_i[k] += p == k and t == k
                fb_u[k] += p == k or t == k
    ious = [inter[c] / union[c] for c in sorted(union) if union[c]]
    return 100 * np.mean(ious), 100 * np.mean([fb_i[k] / fb_u[k] for k in (0, 1)])


def random_batch(seed, n=12, size=9, ignore=0.1):
    rng = np.random.default_rng(seed)
    target = (rng.random((n, size, size)) < 0.4).astype(np.uint8)
    target[rng.random(target.shape) < ignore] = IGNORE
    pred = rng.random((n, size, size)) < 0.5
    return pred, target, rng.integers(1, 5, n)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_reference(seed):
    pred, target, classes = random_batch(seed)
    meter = FewShotMeter(num_classes=4)
    meter.update(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(classes))
    miou, fbiou = reference(pred, target, classes)
    assert meter.miou() == pytest.approx(miou)
    assert meter.fbiou() == pytest.approx(fbiou)


def test_miou_is_not_the_mean_of_episode_ious():
    target = np.zeros((2, 4, 4), np.uint8)
    target[0, :2] = 1  # 8 px
    target[1, 0, 0] = 1  # 1 px
    pred = target.astype(bool).copy()
    pred[1] = False  # miss the tiny one
    meter = FewShotMeter(1)
    meter.update(pred, target, np.array([1, 1]))
    assert meter.miou() == pytest.approx(100 * 8 / 9)  # not (100 + 0) / 2


def test_perfect_prediction_is_100_and_disjoint_is_0():
    _, target, classes = random_batch(1)
    perfect = FewShotMeter(4)
    perfect.update(target == 1, target, classes)
    assert perfect.miou() == pytest.approx(100) and perfect.fbiou() == pytest.approx(100)
    disjoint = FewShotMeter(4)
    disjoint.update(target == 0, target, classes)
    assert disjoint.miou() == 0 and disjoint.fbiou() == 0


def test_episode_order_and_batching_do_not_matter():
    pred, target, classes = random_batch(2)
    whole = FewShotMeter(4)
    whole.update(pred, target, classes)
    order = np.random.default_rng(0).permutation(len(classes))
    parts = FewShotMeter(4), FewShotMeter(4)
    parts[0].update(pred[order[:5]], target[order[:5]], classes[order[:5]])
    parts[1].update(pred[order[5:]], target[order[5:]], classes[order[5:]])
    merged = parts[1] + parts[0]
    assert merged.miou() == pytest.approx(whole.miou())
    assert merged.fbiou() == pytest.approx(whole.fbiou())
    assert merged.class_iou() == pytest.approx(whole.class_iou())


def test_ignore_pixels_change_nothing():
    pred, target, classes = random_batch(3, ignore=0.3)
    base = FewShotMeter(4)
    base.update(pred, target, classes)
    flipped = FewShotMeter(4)
    flipped.update(np.where(target == IGNORE, ~pred, pred), target, classes)
    assert flipped.miou() == pytest.approx(base.miou())
    assert flipped.fbiou() == pytest.approx(base.fbiou())


def test_binary_target_and_shape_check():
    label = torch.tensor([[[0, 3, 255], [5, 3, 0]]])
    assert binary_target(label, torch.tensor([3])).tolist() == [[[0, 1, 255], [0, 1, 0]]]
    with pytest.raises(ValueError, match="differ"):
        FewShotMeter(2).update(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3), torch.tensor([1]))


def test_episode_counts_add_up_to_the_meter_and_precision_recall_match_a_reference():
    pred, target, classes = random_batch(7, n=20)
    meter = FewShotMeter(4, per_episode=True)
    for part in (slice(0, 7), slice(7, 20)):  # two batches: rows stay in update order
        meter.update(*(torch.from_numpy(a[part]) for a in (pred, target, classes)))
    counts = meter.episode_counts()
    assert list(counts["class_id"]) == classes.tolist()
    for c in set(classes.tolist()):
        rows = counts[counts["class_id"] == c]
        assert rows["inter"].sum() == meter.inter[c] and rows["union"].sum() == meter.union[c]
    valid = target != IGNORE
    precision, recall = [], []
    for c in sorted(set(classes.tolist())):
        p, t = pred[classes == c] & valid[classes == c], (target[classes == c] == 1)
        precision.append(100 * (p & t).sum() / p.sum())
        recall.append(100 * (p & t).sum() / t.sum())
    assert meter.precision_recall() == pytest.approx((np.mean(precision), np.mean(recall)))
    merged = FewShotMeter(4, per_episode=True) + meter
    assert merged.episode_counts().equals(counts)
    with pytest.raises(ValueError, match="per_episode"):
        FewShotMeter(4).episode_counts()


def test_a_class_without_episodes_counts_zero_or_is_skipped():
    """A fold of 5 classes whose episodes drew classes 1 and 2 only. Class 1: 3 of 4 predicted pixels
    right over a 4-px object (inter 3, union 5: 60 %); class 2: perfect (100 %). ``zero`` (HSNet's
    ``max(union, 1)``, PFENet's ``+ 1e-10``): classes 3-5 count 0 and the mean divides by 5 ->
    (60 + 100) / 5 = 32; ``skip``: (60 + 100) / 2 = 80."""
    target = np.zeros((2, 3, 3), np.uint8)
    target[0, 0, :2] = target[0, 1, :2] = 1  # 4 px of class 1
    target[1, 2, 2] = 1  # 1 px of class 2
    pred = target.astype(bool).copy()
    pred[0, 0, 0] = False  # one missed ...
    pred[0, 2, 0] = True  # ... and one false positive: inter 3, union 5
    meter = FewShotMeter(5)
    meter.update(pred, target, np.array([1, 2]))
    fold = [1, 2, 3, 4, 5]
    assert meter.class_iou(fold, "zero") == {1: pytest.approx(60), 2: pytest.approx(100), 3: 0, 4: 0, 5: 0}
    assert meter.miou(fold, "zero") == pytest.approx(32)
    assert meter.miou(fold, "skip") == pytest.approx(80)
    assert meter.miou(fold, "skip") == meter.miou()  # skip: the classes drawn, as before
