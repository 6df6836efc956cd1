"""The shared training runtime: early stopping, run state in checkpoints, resume, logger,
the epoch loops and the divergence stop."""
import math

import pytest
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import CheckpointError, InputError, ReportedError, TrainingDiverged
from runtime.training import (EarlyStopping, EpochCheckpoints, MetricLogger, RunState, batch_sums,
                              check_finite_training, evaluate, per_sample_mean,
                              restart_from_checkpoint, train_one_epoch)


def test_early_stopping_min_rule_counts_and_stops_after_patience():
    state, stopper = RunState(), EarlyStopping(patience=2)
    decisions = [stopper.step(state, v) for v in (0.5, 0.6, 0.5)]
    assert [(d.improved, d.stop) for d in decisions] == [(True, False), (False, False),
                                                         (False, True)]
    assert (state.epoch, state.best_value, state.best_epoch, state.no_improve) == (3, 0.5, 1, 2)
    assert stopper.stopped(state)


def test_early_stopping_max_rule_with_min_delta_keeps_the_loss_of_the_best_epoch():
    state, stopper = RunState(), EarlyStopping(patience=5, mode="max", min_delta=1e-6)
    stopper.step(state, 0.70, loss=0.4)
    assert not stopper.step(state, 0.70 + 1e-7, loss=0.3).improved   # within min_delta
    assert stopper.step(state, 0.80, loss=0.35).improved
    assert (state.best_value, state.best_loss, state.best_epoch) == (0.80, 0.35, 3)
    with pytest.raises(ValueError):
        EarlyStopping(3, mode="median")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def test_run_state_round_trips_through_the_epoch_checkpoints(tmp_path):
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    ckpts = EpochCheckpoints(tmp_path / "best.pt", tmp_path / "last.pt", "Toy", {"width": 4},
                             {"lr": 1e-2})
    state, stopper = RunState(extra={"diagnostics": [{"epoch": 1}]}), EarlyStopping(3)
    for value in (0.9, 0.7, 0.8):
        decision = stopper.step(state, value)
        state.history.append({"epoch": state.epoch, "val_loss": value})
        ckpts.save(state, decision.improved, model, optimizer, scheduler, extra={"lr": 0.1})
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert (best["epoch"], last["epoch"]) == (2, 3)
    assert last["best_loss"] == 0.7 and last["num_epoch_no_improvement"] == 1
    assert last["extra"]["lr"] == 0.1 and last["arch"] == "Toy"

    fresh = _net()
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    restored = restart_from_checkpoint(tmp_path / "last.pt", fresh, opt2,
                                       torch.optim.lr_scheduler.StepLR(opt2, 2),
                                       expect={"width": 4})
    assert (restored.epoch, restored.best_value, restored.best_epoch, restored.no_improve) == \
        (3, 0.7, 2, 1)
    assert restored.history == state.history
    assert restored.extra["diagnostics"] == [{"epoch": 1}]
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match=r"made with --width 4, this run has --width 8"):
        restart_from_checkpoint(tmp_path / "last.pt", _net(), expect={"width": 8})


def test_published_counters_alone_restore_the_best_value(tmp_path):
    save_checkpoint(tmp_path / "pub.pt", _net(), epoch=7, best_loss=0.25,
                    num_epoch_no_improvement=3)
    state = restart_from_checkpoint(tmp_path / "pub.pt", _net())
    assert (state.epoch, state.best_value, state.best_loss, state.no_improve) == (7, 0.25, 0.25, 3)


def test_damaged_run_state_is_a_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path / "bad.pt", _net(), extra={"history": 5})
    with pytest.raises(CheckpointError, match="bad.pt: the run state in 'extra' is damaged"):
        restart_from_checkpoint(tmp_path / "bad.pt", _net())


def test_logger_creates_its_tensorboard_folder_at_first_use_and_only_on_rank_0(tmp_path):
    with MetricLogger(tmp_path / "tb", verbose=0) as log:
        assert log.curves and not (tmp_path / "tb").exists()
        log.scalars({"loss": 1.0, "auc": None}, 1)
        assert (tmp_path / "tb").is_dir()
    silent = MetricLogger(tmp_path / "other", enabled=False)
    silent.scalars({"loss": 1.0}, 1)
    silent.line("not printed")
    assert not silent.curves and not (tmp_path / "other").exists()


def test_epoch_loops_sum_step_statistics_on_the_device(capsys):
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]

    def step(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach() * 4, torch.tensor(4.0)])

    assert batch_sums(torch.tensor(0.5, requires_grad=True), 4).tolist() == [2.0, 4.0]
    assert batch_sums(torch.tensor(3.0), 4, summed=True).tolist() == [3.0, 4.0]
    log = MetricLogger(verbose=1)
    sums = train_one_epoch(model, step, batches, log, "train", torch.zeros(2), log_every=0)
    assert model.training and sums[1] == 12 and math.isfinite(per_sample_mean(sums))
    none = evaluate(model, step, [], log, "val", torch.zeros(2))   # a rank without batches
    assert not model.training and none.tolist() == [0.0, 0.0]
    log.line("epoch 1 done")
    assert "epoch 1 done" in capsys.readouterr().out


def test_without_a_terminal_a_long_pass_prints_plain_progress_lines(capsys):
    """Under pytest the output is no terminal, so the bar is off; heartbeat lines replace it."""
    model = nn.Linear(2, 1)
    step = lambda batch: torch.tensor([float(batch), 1.0])          # noqa: E731
    evaluate(model, step, [1, 2, 3], MetricLogger(heartbeat_s=0.0), "epoch 4 val",
             torch.zeros(2))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  epoch 4 val: 1/3 batches, loss 1.0000",
                     "  epoch 4 val: 2/3 batches, loss 1.5000",
                     "  epoch 4 val: 3/3 batches, loss 2.0000"]
    evaluate(model, step, [1, 2], MetricLogger(heartbeat_s=0.0, verbose=0), "quiet",
             torch.zeros(2))
    assert capsys.readouterr().out == ""


def test_diverged_run_is_its_own_reported_error():
    model = _net()
    check_finite_training(model, 1, 0.5, 0.4, "lower --lr")
    with pytest.raises(TrainingDiverged, match=r"epoch 2: non-finite loss .* lower --lr"):
        check_finite_training(model, 2, math.nan, 0.4, "lower --lr")
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match="non-finite weights") as err:
        check_finite_training(model, 3, 0.5, 0.4, "lower --lr")
    assert isinstance(err.value, ReportedError) and not isinstance(err.value, InputError)
