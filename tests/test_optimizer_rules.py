"""The shared properties of MATH.md §4, run for every registered optimizer rule (Optax-style enrolment:
a rule added with one file plus one line in ``explaind_math/optimizers/__init__.py`` is tested here).

For each rule: replay against its real torch optimizer for every example setting (≤ 1e-10 relative),
the decomposition identity on random smooth models (≤ 1e-9 · (1 + |Δf|), 8 Gauss–Legendre nodes,
float64), and the flag checks (defaults accepted, unknown options refused by name).
"""

import pytest
import torch

from explaind_math.errors import UnsupportedOptimizerError
from explaind_math.optimizers import RULES, rule_for_optimizer
from explaind_math.testing.rule_checks import check_rule

VERIFIES = "template"

try:
    from explaind_math.verification import record_residual
except ImportError:  # pragma: no cover
    record_residual = None


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_passes_shared_properties(name, device):
    results = check_rule(RULES[name], examples=4, device=device)
    failures = [r.row() for r in results if not r.passed]
    assert not failures, "\n".join(failures)
    worst = {r.name: r.worst for r in results}
    assert worst["replay"] <= 1e-10
    assert worst["decomposition"] <= 1e-9
    if record_residual is not None:
        record_residual("template", worst["decomposition"])


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: torch.optim.Rprop(p), "sign"),
        (lambda p: torch.optim.LBFGS(p), "line search"),
        (lambda p: torch.optim.ASGD(p), "not supported"),
    ],
)
def test_unsupported_optimizers_are_refused_with_reason(make, why):
    opt = make([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(UnsupportedOptimizerError, match=why):
        rule_for_optimizer(opt)


@pytest.mark.parametrize("name", ["Lion", "Muon", "SignSGD"])
def test_nonlinear_optimizers_are_refused_by_name(name):
    cls = type(name, (torch.optim.Optimizer,), {"step": lambda self, closure=None: None})
    opt = cls([torch.nn.Parameter(torch.zeros(2))], {"lr": 0.1})
    with pytest.raises(UnsupportedOptimizerError, match="not linear in the gradients") as info:
        rule_for_optimizer(opt)
    assert name in str(info.value) and "no per-sample decomposition exists" in str(info.value)


def test_a_user_rule_is_checked_and_enrolled():
    """examples/custom_optimizer.py: a user-written optimizer and its rule pass the shared checks."""
    import pathlib

    from explaind_math.testing.scripts import load_script

    module = load_script(pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_optimizer.py",
                         "custom_optimizer_example")
    results = check_rule(module.AdaBeliefRule(), examples=3)
    assert all(r.passed for r in results), [r.row() for r in results]
    assert "adabelief" not in RULES  # check_rule leaves the registry as it found it
