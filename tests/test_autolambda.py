"""The target-driven lambda controller and the masked penalty, against references written here."""

from __future__ import annotations

import math

import pytest
import torch
from lightning_helpers import tiny_resnet

from nam_lightning import AutoLambda, PruneConfig, inject_nam, prune_channels
from nam_lightning.autolambda import PlannedDecay, sgd_step_size
from nam_lightning.sparsity import add_masked_decay_, masked_share

TOTAL = 400


def test_schedule_falls_along_a_cosine_from_the_first_share_to_the_final_one() -> None:
    auto = AutoLambda(warmup=0.1, settle=0.7, final_share=1e-3)
    assert auto.target_share(40, TOTAL) == math.inf  # before the first plan: no target
    auto.update(0.4, 40, TOTAL)
    end = round(0.7 * TOTAL)
    for step in (40, 100, 200, end, end + 50):
        progress = min(1.0, (step - 40) / (end - 40))
        expected = 1e-3 + (0.4 - 1e-3) * (1 + math.cos(math.pi * progress)) / 2
        assert auto.target_share(step, TOTAL) == pytest.approx(expected, rel=1e-12)


def test_lambda_moves_by_the_rate_towards_the_schedule() -> None:
    auto = AutoLambda(start=1e-3, rate=0.1)
    assert auto.update(0.5, 10, TOTAL) == 1e-3  # the first call only starts the schedule
    target = auto.target_share(11, TOTAL)
    assert auto.update(target * 2, 11, TOTAL) == pytest.approx(1.1e-3)  # lagging: up
    # far ahead (the share fell to 0: more than twice what was wanted): down three times
    assert auto.update(0.0, 12, TOTAL) == pytest.approx(1.1e-3 / 1.1**3)


def toy_training(
    auto: AutoLambda, step_size: float | None = None
) -> tuple[list[float], list[float]]:
    """A stand-in for the planned channels' mass: the decay shrinks it by a factor
    1 - 2 * lambda per step (a step size of 2), the loss pulls it back towards its starting
    value; the share is mass / (mass + 1)."""
    mass, shares, lambdas = 1.0, [], []
    for step in range(TOTAL):
        if step < round(auto.warmup * TOTAL):
            continue
        share = mass / (mass + 1.0)
        lam = auto.update(share, step, TOTAL, step_size=step_size)
        mass = max(0.0, mass * (1.0 - 2.0 * lam) + 0.01 * (1.0 - mass) * share)
        shares.append(share)
        lambdas.append(lam)
    return shares, lambdas


@pytest.mark.parametrize("step_size", [None, 2.0])  # without and with the band
@pytest.mark.parametrize("start", [1e-5, 1e-3, 1e-1])  # 100x too small, default, 100x too large
def test_a_start_100x_off_still_reaches_the_final_share(
    start: float, step_size: float | None
) -> None:
    auto = AutoLambda(start=start)
    shares, _ = toy_training(auto, step_size)
    assert max(shares[-TOTAL // 20 :]) <= 2 * auto.final_share  # when pruning comes


def test_under_sgd_lambda_stays_in_the_band_its_step_size_sets() -> None:
    # first share 0.4 at step 40, settle at 280: mean pace ln(0.4 / 1e-3) / 240 per step
    pace = math.log(0.4 / 1e-3) / (280 - 40)
    size = 0.1 / (1 - 0.9)  # lr 0.1, momentum 0.9
    big = AutoLambda(start=1.0, warmup=0.1, settle=0.7)
    assert big.update(0.4, 40, TOTAL, step_size=size) == pytest.approx(2.0 * pace / size)
    small = AutoLambda(start=1e-6, warmup=0.1, settle=0.7)
    assert small.update(0.4, 40, TOTAL, step_size=size) == pytest.approx(0.1 * pace / size)
    # the floor holds while the schedule runs: a share far ahead of it does not sink lambda
    for step in range(41, 60):
        assert small.update(0.01, step, TOTAL, step_size=size) == pytest.approx(0.1 * pace / size)
    # after `settle` only the cap is left: a share fallen below the final one lowers lambda
    after = small.update(1e-4, 300, TOTAL, step_size=size)
    assert after == pytest.approx(0.1 * pace / size / 1.05**3)
    # no step size (not SGD): no band, the start is kept
    assert AutoLambda(start=1.0).update(0.4, 40, TOTAL) == 1.0


def test_sgd_step_size_is_the_steady_state_step_of_a_unit_gradient() -> None:
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    sgd = torch.optim.SGD(
        [{"params": [a], "lr": 0.1, "momentum": 0.9}, {"params": [b], "lr": 0.5}],
        lr=0.1,
        dampening=0.0,
    )
    assert sgd_step_size(sgd, [a]) == pytest.approx(1.0)
    assert sgd_step_size(sgd, [a, b]) == pytest.approx(1.0)  # the largest of the groups
    assert sgd_step_size(sgd, [b]) == pytest.approx(0.5)  # no momentum
    assert sgd_step_size(sgd, [c]) is None  # not in this optimizer
    # measured: a constant gradient 1 with momentum 0.9 moves `a` by 1.0 per step at last
    a.grad = torch.ones(2)
    for _ in range(300):
        before = a.detach().clone()
        sgd.step()
    torch.testing.assert_close(before - a.detach(), torch.full((2,), 1.0))
    assert sgd_step_size(torch.optim.Adam([a]), [a]) is None


def test_state_dict_resumes_exactly() -> None:
    shares = [0.5, 0.4, 0.3, 0.35, 0.2, 0.1]
    running = AutoLambda(start=1e-4)
    for step, share in enumerate(shares[:3]):
        running.update(share, 100 + step, TOTAL)
    resumed = AutoLambda(start=1e-4)
    resumed.load_state_dict(running.state_dict())
    for step, share in enumerate(shares[3:], start=3):
        assert resumed.update(share, 100 + step, TOTAL) == running.update(share, 100 + step, TOTAL)
    assert resumed.state_dict() == running.state_dict()


def test_plans_start_after_the_warmup_and_repeat() -> None:
    auto = AutoLambda(warmup=0.1, replan=0.05)
    assert not auto.plan_due(39, TOTAL, None)
    assert auto.plan_due(40, TOTAL, None)
    assert not auto.plan_due(59, TOTAL, 40)
    assert auto.plan_due(60, TOTAL, 40)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start": 0.0}, ValueError, "`start`"),
        ({"rate": -1.0}, ValueError, "`rate`"),
        ({"warmup": 1.5}, ValueError, "`warmup`"),
        ({"final_share": "x"}, TypeError, "`final_share`"),
        ({"warmup": 0.8, "settle": 0.7}, ValueError, "`warmup`"),
        ({"max_speed": 0.0}, ValueError, "`max_speed`"),
        ({"min_speed": 3.0, "max_speed": 2.0}, ValueError, "`min_speed`"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AutoLambda(**kwargs)


def test_masked_decay_is_the_gradient_of_the_masked_square() -> None:
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    masks = [torch.tensor([1.0, 0, 1, 0, 0]), torch.tensor([0.0, 1, 1])]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = []
    for p, m in zip(params, masks, strict=True):
        q = p.detach().clone().requires_grad_()
        (0.3 / 2 * (q * m).square().sum()).backward()
        assert p.grad is not None and q.grad is not None
        expected.append(p.grad + q.grad)
    add_masked_decay_(params, 0.3, masks)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_masked_share_is_the_masked_part_of_the_l1_mass() -> None:
    params = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-4.0])]
    masks = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0])]
    assert masked_share(params, masks) == pytest.approx(6.0 / 10.0)


def test_planned_decay_plans_what_pruning_removes_and_decays_only_that() -> None:
    model = tiny_resnet()
    inject_nam(model)
    with torch.no_grad():  # distinct |gamma| so that the ranking is clear
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features) + 0.1)
    x = torch.randn(2, 3, 8, 8)
    decay = PlannedDecay(AutoLambda(start=0.5, warmup=0.1), PruneConfig(amount=0.5))
    decay.step(model, lambda: x, step=0, total_steps=10)
    assert decay.plan is None  # still warming up
    decay.step(model, lambda: x, step=1, total_steps=10)
    assert decay.plan and all("nam." not in name for name in decay.plan)  # backbone only

    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    decay.add_to_gradients_({id(p) for p in params.values()})
    for name, p in params.items():
        expected = torch.zeros_like(p)
        if name in decay.plan:
            expected[decay.plan[name]] = 0.5 * p.detach()[decay.plan[name]]
        torch.testing.assert_close(p.grad, expected, msg=name)

    # The plan is what pruning then removes: the planned channels are the ones that go.
    kept = {name: p.shape[0] for name, p in params.items() if name in decay.plan}
    prune_channels(model, x, 0.5, measure=False)
    after = dict(model.named_parameters())
    for name, lost in decay.plan.items():
        assert after[name].shape[0] == kept[name] - len(lost), name
