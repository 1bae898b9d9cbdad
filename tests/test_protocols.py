"""The pure protocol functions on planted numbers (no model)."""

from __future__ import annotations

import pytest
import torch

from tvedit.errors import GateError, UsageError
from tvedit.evaluate import protocols as P


def test_alpha_grid_default_and_sparse_widening() -> None:
    grid = P.alpha_grid()
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0 and grid[3] == 0.15
    assert P.alpha_grid(density=0.1)[-1] == pytest.approx(10.0)
    assert P.alpha_grid(density=0.1)[1] == pytest.approx(0.5)
    with pytest.raises(UsageError):
        P.alpha_grid(step=0)
    with pytest.raises(UsageError):
        P.alpha_grid(density=0)


def test_square_grid_contains_zero_for_odd_sizes() -> None:
    g = P.square_grid(-3, 3, 7)
    assert g == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    assert len(P.square_grid()) == 20


def test_accuracy_and_normalised() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert P.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert P.normalized({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == {"a": 0.5, "b": 1.0}


def test_addition_choice_maximises_mean_normalised_accuracy() -> None:
    single = {"a": 0.5, "b": 1.0}
    # raw mean accuracy prefers 0.5 (0.75 vs 0.7), normalised prefers 0.3 (0.8 vs 0.75)
    val = {
        0.0: {"a": 0.1, "b": 0.2},
        0.3: {"a": 0.5, "b": 0.6},  # normalised 1.0, 0.6 -> 0.8
        0.5: {"a": 0.25, "b": 1.0},  # 0.5, 1.0 -> 0.75 (raw mean 0.625)
        1.0: {"a": 0.3, "b": 0.5},
    }
    choice = P.choose_addition_alpha(val, single)
    assert choice.alpha == 0.3 and choice.criterion == pytest.approx(0.8)
    assert choice.criterion == max(choice.curve.values())
    # ties go to the smallest alpha
    tie = {0.2: {"a": 0.5, "b": 0.5}, 0.1: {"a": 0.5, "b": 0.5}}
    assert P.choose_addition_alpha(tie, {"a": 1.0, "b": 1.0}).alpha == 0.1


def test_addition_summary_reports_gain_over_zero_shot() -> None:
    choice = P.AdditionChoice(alpha=0.3, criterion=0.8)
    test = {0.3: {"a": 0.6, "b": 0.7}}
    s = P.addition_summary(
        choice, test, zero_shot={"a": 0.2, "b": 0.3}, single_test={"a": 0.8, "b": 0.7}
    )
    assert s.normalized == pytest.approx({"a": 0.75, "b": 1.0})
    assert s.means["gain"] == pytest.approx(0.4)
    assert s.to_dict()["mean"]["normalized"] == pytest.approx(0.875)


def test_negation_respects_control_constraint() -> None:
    target = {0.0: 0.9, 0.5: 0.5, 1.0: 0.2, 1.5: 0.1}
    control = {0.0: 0.80, 0.5: 0.79, 1.0: 0.77, 1.5: 0.70}  # 0.95 * 0.8 = 0.76
    c = P.choose_negation_alpha(target, control, control_zero_shot=0.8, threshold=0.95)
    assert c.alpha == 1.0 and c.feasible  # 1.5 has lower target accuracy but breaks the constraint
    assert c.control_val >= 0.95 * 0.8
    # brute force over every feasible alpha
    feasible = [a for a in target if control[a] >= 0.76]
    assert c.target_val == min(target[a] for a in feasible)
    # nothing feasible (control already below at alpha 0): alpha 0, flagged
    c2 = P.choose_negation_alpha({0.0: 0.9, 1.0: 0.1}, {0.0: 0.5, 1.0: 0.4}, control_zero_shot=0.8)
    assert c2.alpha == 0.0 and not c2.feasible


def test_disentanglement_terms_by_construction() -> None:
    g = torch.Generator().manual_seed(0)
    grid = P.square_grid(-1, 1, 5)
    n, k = 50, 4
    single = [torch.randint(0, k, (5, n), generator=g) for _ in range(2)]
    joint = [torch.randint(0, k, (5, 5, n), generator=g) for _ in range(2)]
    z = grid.index(0.0)
    # consistency of the planted predictions: at alpha2 = 0 the joint model IS theta0 + alpha1 tau1,
    # at alpha1 = 0 it is theta0 + alpha2 tau2, and at the origin both are theta0
    for i in range(5):
        joint[0][i, z] = single[0][i]
        joint[1][z, i] = single[1][i]
    joint[1][:, z] = torch.randint(0, k, (5, n), generator=g)
    joint[1][z, z] = single[1][z]
    joint[0][z, z] = single[0][z]
    terms = P.disentanglement_terms(single, joint)
    xi = P.disentanglement_error(single, joint)
    assert torch.equal(xi, terms.sum(0))
    assert bool((terms[0][:, z] == 0).all())  # task 1's term vanishes on alpha2 = 0
    assert bool((terms[1][z, :] == 0).all())  # task 2's term vanishes on alpha1 = 0
    assert float(xi[z, z]) == 0.0
    # hand check of one cell
    i, j = 1, 3
    expect = (joint[0][i, j] != single[0][i]).float().mean() + (
        joint[1][i, j] != single[1][j]
    ).float().mean()
    assert float(xi[i, j]) == pytest.approx(float(expect))


def test_gates() -> None:
    th = P.parse_thresholds(["a=0.9", "b=0.5"])
    assert th == {"a": 0.9, "b": 0.5}
    assert P.gate_failures({"a": 0.95, "b": 0.5}, th) == []
    with pytest.raises(
        GateError, match=r"task a: accuracy 0\.8000 is below the threshold 0\.9000"
    ) as exc:
        P.check_gates({"a": 0.8, "b": 0.6}, th)
    assert exc.value.exit_code == 7
    with pytest.raises(UsageError):
        P.parse_thresholds(["a"])
    with pytest.raises(UsageError):
        P.gate_failures({"a": 1.0}, {"zz": 0.5})
