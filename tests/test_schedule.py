"""Learning-rate, resolution and sampling schedules of bcc-train fit."""

from __future__ import annotations

import pytest
import torch

from trainer.recipes import RECIPES, recipe_settings
from trainer.schedule import class_weights, epoch_cost, epoch_order, lr_factor, parse_size_schedule, seconds_left, train_size


def test_lr_warms_up_then_decays_to_one_percent() -> None:
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(total, total, warmup) == pytest.approx(0.01)


def test_size_schedule_parses_and_picks_the_size_of_each_epoch() -> None:
    schedule = parse_size_schedule("112@31, 96@1")
    assert schedule == [(1, 96), (31, 112)]
    assert [train_size(schedule, e, 128) for e in (1, 30, 31, 70)] == [96, 96, 112, 112]
    assert train_size([], 5, 128) == 128
    for bad, why in (("96", "SIZE@EPOCH"), ("96@0", "SIZE@EPOCH"), ("x@1", "SIZE@EPOCH"), ("96@5", "start at epoch 1"),
                     ("96@1,112@1", "one epoch twice")):
        with pytest.raises(ValueError, match=why):
            parse_size_schedule(bad)


def test_time_left_weighs_the_epochs_still_to_come_at_a_higher_resolution() -> None:
    # Two epochs at 112 px took 100 s; the third and fourth run at 160 px, about twice the pixels.
    schedule = parse_size_schedule("112@1,160@3")
    left = seconds_left(100.0, range(1, 3), range(3, 5), schedule, 160)
    assert left == pytest.approx(2 * 50 * (160 / 112) ** 2)
    # Without a schedule it is the plain pace, and nothing is left after the last epoch.
    assert seconds_left(100.0, range(1, 3), range(3, 5), [], 160) == pytest.approx(100.0)
    assert seconds_left(100.0, range(1, 3), range(3, 3), schedule, 160) == 0.0
    # The run's progress bar advances by the same weights (an epoch at 112 px is half of one at 160).
    assert [epoch_cost(schedule, e, 160) for e in (1, 2, 3)] == pytest.approx([(112 / 160) ** 2] * 2 + [1.0])


def test_balanced_sampler_draws_each_class_about_equally_and_repeatably() -> None:
    # The data set's imbalance: Benign is about half as common as each other class.
    labels = torch.tensor([0] * 300 + [1] * 600 + [2] * 600 + [3] * 480)
    draws = torch.cat([epoch_order(labels, 4, "sampler", torch.Generator().manual_seed(e)) for e in range(5)])
    share = torch.bincount(labels[draws], minlength=4).float() / len(draws)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.02)
    again = epoch_order(labels, 4, "sampler", torch.Generator().manual_seed(0))
    assert torch.equal(again, epoch_order(labels, 4, "sampler", torch.Generator().manual_seed(0)))
    plain = epoch_order(labels, 4, "none", torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(len(labels)))  # a permutation: every image once


def test_class_weights_give_every_class_the_same_total() -> None:
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    w = class_weights(labels, 3)
    totals = torch.bincount(labels, weights=w[labels], minlength=3)
    assert torch.allclose(totals, torch.full((3,), totals[0].item()))


def test_recipes_name_real_settings_and_unknown_names_are_refused() -> None:
    from dataclasses import fields

    from trainer.config import FitConfig

    known = {f.name for f in fields(FitConfig)}
    for name in RECIPES:
        assert set(recipe_settings(name)) <= known, name
        # A schedule ends at the size the model is validated and shipped at.
        if "size_schedule" in RECIPES[name]:
            assert RECIPES[name]["size_schedule"][-1][1] == RECIPES[name]["image_size"], name
    assert recipe_settings(None) == {}
    with pytest.raises(ValueError, match="unknown recipe 'fast'; choose one of: study, cpu, gpu"):
        recipe_settings("fast")


def test_a_zoom_range_is_read_and_a_bad_one_refused_in_one_line(tmp_path, all4) -> None:
    from typer.testing import CliRunner

    from trainer import cli as train_cli
    from trainer.schedule import parse_zoom

    assert parse_zoom("0.8,1.25") == (0.8, 1.25) and parse_zoom(" 1 , 1.15") == (1.0, 1.15)
    for bad in ("1.25,0.8", "0.1,1", "0.8", "a,b", "0.8,1,1.2"):
        with pytest.raises(ValueError, match="--zoom"):
            parse_zoom(bad)
    out = tmp_path / "run"
    r = CliRunner().invoke(train_cli.app, ["fit", str(all4), "--out", str(out), "--zoom", "1.25,0.8"], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "--zoom: '1.25,0.8' must satisfy" in " ".join(r.output.split())
    assert not out.exists()
