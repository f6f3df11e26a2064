"""Training and evaluation on a tiny synthetic fold: the loss falls, resume is exact, the
priors-only baseline and the metrics behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.params import ModelParams, TrainParams
from pipeline.core.tensors import mask_to_grid
from pipeline.fewshot.data import EpisodeTable, ImageBank
from pipeline.fewshot.evaluate import best_prior_threshold, evaluate_table, prior_meter
from pipeline.fewshot.train import State, fit
from pipeline.model.lfss import LFSS

NUM_CLASSES, GRID, LABEL, C = 4, 8, 16, 10


def tiny_fold(images: int = 24, episodes: int = 96) -> tuple[ImageBank, EpisodeTable, EpisodeTable]:
    """Images with one square of class 1..4 whose features carry the class's direction;
    pseudo-masks are the true masks with 30 % of the cells flipped; VTP is the truth, pooled, plus noise.
    Returns the bank and two disjointly drawn episode tables (training, validation)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(NUM_CLASSES + 1, C, generator=g)
    feats = 0.8 * torch.randn(images, C, GRID, GRID, generator=g) + directions[0][:, None, None]
    labels, classes = [], []
    for i in range(images):
        c = i % NUM_CLASSES + 1
        y, x = torch.randint(0, LABEL // 2, (2,), generator=g).tolist()
        label = np.zeros((LABEL, LABEL), np.uint8)
        label[y : y + LABEL // 2, x : x + LABEL // 2] = c
        cells = mask_to_grid(torch.from_numpy(label == c), (GRID, GRID)) > 0.5
        feats[i, :, cells] += 2 * directions[c][:, None]
        labels.append(label)
        classes.append(c)
    tokens = feats.flatten(2).transpose(1, 2)[:, None].repeat(1, 2, 1, 1)[..., :6]  # (I, 2, 64, 6)
    bank = ImageBank({str(i): i for i in range(images)}, feats.half(), tokens.half(), labels)
    masks = [torch.from_numpy(lab == c) for lab, c in zip(labels, classes, strict=True)]
    truth = mask_to_grid(torch.stack(masks), (GRID, GRID))
    flip = torch.rand(images, GRID, GRID, generator=g) < 0.3
    pseudo = torch.where(flip, 1 - truth.round(), truth).half()
    noise = 0.6 * torch.rand(images, 4, 4, generator=g)
    vtp = torch.nn.functional.avg_pool2d(truth[:, None], 2)[:, 0] + noise
    vtp = (vtp / vtp.amax((1, 2), keepdim=True)).half()  # (I, 4, 4): a coarse, noisy prior

    def table(name: str) -> EpisodeTable:
        query = torch.randint(0, images, (episodes,), generator=g)
        other = NUM_CLASSES * torch.randint(1, images // NUM_CLASSES, (episodes,), generator=g)
        supports = ((query + other) % images)[:, None]  # another image of the same class
        cls = torch.tensor([classes[q] for q in query.tolist()])
        return EpisodeTable(name, query, supports, cls, pseudo[query], pseudo[supports], vtp[query],
                            vtp[supports])

    return bank, table("train"), table("val")


CFG = ModelParams(hidden=8, seeds=3, cluster_iterations=2)
TRAIN = TrainParams(epochs=3, batch_size=8, lr=1e-2, label_size=LABEL, dtype="fp32")


class Crash(Exception):
    pass


def trained(checkpoint=None, epochs: int = 3, fold=None, cfg: ModelParams = CFG,
            stop_after: int | None = None, **train: object) -> tuple[LFSS, State]:
    """A model trained on ``fold``; ``stop_after``: crash in the first step after that many epochs."""
    bank, train_table, val = fold or tiny_fold()
    torch.manual_seed(0)
    model = LFSS(C, cfg)
    params = TRAIN.model_copy(update={"epochs": epochs, **train})

    def progress(done: int, total: int) -> None:
        if stop_after is not None and done > stop_after * total // epochs:
            raise Crash

    return model, fit(model, train_table, val, bank, NUM_CLASSES, params, checkpoint=checkpoint,
                      log=lambda r: None, progress=progress)


def test_a_tiny_run_lowers_the_loss_and_beats_its_priors():
    bank, train, val = fold = tiny_fold()
    model, state = trained(epochs=4, fold=fold)
    losses = [r["loss"] for r in state.history]
    assert losses[-1] < 0.5 * losses[0]
    assert state.best_miou == pytest.approx(max(r["val_miou"] for r in state.history), abs=1e-3)
    model.load_state_dict(state.best_state)
    threshold, _ = best_prior_threshold(train, bank, NUM_CLASSES)  # chosen on training episodes
    model_miou = evaluate_table(model, val, bank, NUM_CLASSES, circle_inference=True, batch_size=64).miou()
    assert model_miou == pytest.approx(state.best_miou)
    assert model_miou > prior_meter(val, bank, NUM_CLASSES, threshold).miou() + 5


@pytest.mark.parametrize("schedule", ["constant", "poly"])
def test_resume_continues_exactly_where_it_stopped(tmp_path, schedule):
    straight, full = trained(tmp_path / "a.pt", epochs=2, lr_schedule=schedule)
    # "crashes" after one epoch of two, its checkpoint written (the schedule still spans two epochs)
    with pytest.raises(Crash):
        trained(tmp_path / "b.pt", epochs=2, lr_schedule=schedule, stop_after=1)
    resumed, state = trained(tmp_path / "b.pt", epochs=2, lr_schedule=schedule)  # a fresh process
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert full.history == state.history


@pytest.mark.parametrize("damage", ["truncated", "crafted", "another model"])
def test_a_bad_resume_checkpoint_is_named_set_aside_and_the_fold_restarts(tmp_path, capsys, damage):
    """A resume checkpoint that does not load used to end the run in a traceback naming no file,
    and every later run the same until it was deleted by hand: it is named in one line, renamed
    (not deleted) and training starts over, to the very result of a run that never had one."""
    fold = tiny_fold()
    straight, full = trained(epochs=2, fold=fold)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Crash):
        trained(ckpt, epochs=2, fold=fold, stop_after=1)
    good = ckpt.read_bytes()
    if damage == "truncated":  # a crash or a full disk mid-write
        ckpt.write_bytes(good[: len(good) // 2])
    elif damage == "crafted":  # unpickling it would run code
        torch.save({"model": _Payload(), "state": {"epoch": 1}}, ckpt)
    else:  # loads, but its weights are of another model
        saved = torch.load(ckpt, weights_only=True)
        torch.save({**saved, "model": LFSS(C, ModelParams(hidden=4, seeds=3)).state_dict()}, ckpt)
    bad = ckpt.read_bytes()
    capsys.readouterr()
    restarted, state = trained(ckpt, epochs=2, fold=fold)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"{ckpt}: unreadable resume checkpoint (") and "\n" not in err, err
    assert err.endswith(f"; set aside as {ckpt}.bad; training starts from scratch"), err
    assert "pwned" not in captured.out
    assert (tmp_path / "checkpoint.pt.bad").read_bytes() == bad  # kept for a look
    for key, value in straight.state_dict().items():
        assert torch.equal(value, restarted.state_dict()[key]), key
    assert state.history == full.history
    assert torch.load(ckpt, weights_only=True)["state"]["epoch"] == 2  # a good one written anew
    ckpt.write_bytes(b"")  # a second bad one does not overwrite the first
    trained(ckpt, epochs=1, fold=fold)
    assert (tmp_path / "checkpoint.pt.bad1").read_bytes() == b"" and f"set aside as {ckpt}.bad1" in \
        capsys.readouterr().err


def test_training_moves_only_the_decoder_and_never_its_inputs():
    bank, train, val = fold = tiny_fold()
    inputs = (bank.features.clone(), bank.tokens.clone(), train.support_mask.clone(), train.query_vtp.clone())
    model, _ = trained(epochs=1, fold=fold)
    after = (bank.features, bank.tokens, train.support_mask, train.query_vtp)
    assert all(torch.equal(a, b) for a, b in zip(inputs, after, strict=True))  # frozen features, fixed priors
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"decoder"}
    torch.manual_seed(0)
    untouched = LFSS(C, CFG)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters(), strict=True))


def test_priors_equal_to_the_truth_score_100():
    bank, table, _ = tiny_fold()
    truth = [bank.labels[q] == c for q, c in zip(table.query.tolist(), table.classes.tolist(), strict=True)]
    table.query_vtp = torch.from_numpy(np.stack(truth).astype(np.float16))
    assert prior_meter(table, bank, NUM_CLASSES, 0.5).miou() == pytest.approx(100)
    assert best_prior_threshold(table, bank, NUM_CLASSES)[1] == pytest.approx(100)


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from pipeline.fewshot import train

    real, seen = train.episode_loss, []

    def counting(model, step, *args):
        seen.append(len(step.query_target))
        return real(model, step, *args)

    train.episode_loss = counting
    try:
        model, _ = trained(epochs=1, cfg=NO_DROPOUT)
        if rank == 0:
            torch.save({"state": model.state_dict(), "episodes": sum(seen)}, out)
    finally:
        dist.destroy_process_group()


NO_DROPOUT = CFG.model_copy(update={"dropout": 0.0})  # so both runs draw no random masks


def test_distributed_training_equals_one_process_on_the_same_batches(tmp_path):
    """Two DDP ranks, each taking half of every batch, average their gradients: the same step
    as one process on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2)
    single, _ = trained(epochs=1, cfg=NO_DROPOUT)
    saved = torch.load(tmp_path / "ddp.pt")
    assert saved["episodes"] == 96 // 2  # rank 0 trained on half of every batch
    distributed = saved["state"]
    for key, value in single.state_dict().items():
        assert torch.allclose(value, distributed[key], atol=1e-5), key


def test_poly_schedule_decays_the_lr_of_every_step_to_zero():
    fold = tiny_fold(episodes=32)  # 4 steps per epoch
    seen: list[float] = []
    real = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", spy)
        trained(epochs=2, fold=fold, lr_schedule="poly", poly_power=0.9)
    expected = [TRAIN.lr * (1 - step / 8) ** 0.9 for step in range(8)]
    assert seen == pytest.approx(expected)


class _Payload:
    """Unpickling this runs code: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_load_safely_and_are_verified(tmp_path, capsys):
    """model.pt round trips (sha256 checked); a changed file, a missing hash and a crafted
    pickle (even with a matching hash) are each refused with one line, running nothing."""
    import hashlib

    from pipeline.core.errors import PipelineError
    from pipeline.fewshot.checkpoint import load_model, save_model, sha_file

    model, state = trained(tmp_path / "ckpt.pt", epochs=1)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["state"]["epoch"] == 1  # plain data
    path = tmp_path / "model.pt"
    record = save_model(path, state, CFG, C, circle=True, fold=0)
    loaded, saved = load_model(path, torch.device("cpu"))
    assert saved["best_epoch"] == record["best_epoch"] == 1
    assert all(torch.equal(v, state.best_state[k]) for k, v in loaded.state_dict().items())

    def refused(expected: str) -> None:
        with pytest.raises(PipelineError) as err:
            load_model(path, torch.device("cpu"))
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)

    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    refused("differs from model.pt.sha256")
    path.write_bytes(good)
    sha_file(path).unlink()
    refused("model.pt.sha256: missing")
    torch.save({"state_dict": _Payload()}, path)
    sha_file(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  model.pt\n")
    refused("refused: it holds more than tensors and plain data")
    assert "pwned" not in capsys.readouterr().out
    # a checkpoint saved before the CCM switch was renamed
    old = {**record, "state_dict": state.best_state, "model": {**record["model"], "fcm": True}}
    del old["model"]["ccm"]
    torch.save(old, path)
    sha_file(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  model.pt\n")
    refused("made by an earlier version (saved params: model.fcm is now model.ccm: rename the key)")
