"""Adding an optimizer: a user-written AdaBelief, its rule in the template of MATH.md §4, and checks.

    python examples/custom_optimizer.py                                   # train, decompose, print residual
    python -m explaind_math verify-rule examples.custom_optimizer:AdaBeliefRule   # the shared checks

AdaBelief (Zhuang et al., 2020) with decoupled weight decay, as written below, per parameter:

    m_t = β1 m_{t−1} + (1 − β1) g_t
    s_t = β2 s_{t−1} + (1 − β2) (g_t − m_t)² + ε            (the "belief" in the gradient)
    θ_{t+1} = θ_t − η λ θ_t − η / (1 − β1^k) · m_t / (sqrt(s_t / (1 − β2^k)) + ε)

s_t is not linear in the gradients, but it is recorded (like Adam's v_t), and given s_t the update is
linear in m_t, which is linear in the gradients. So the rule is the table

    A = β1,  C = 1 − β1,  D = η / ((1 − β1^k)(sqrt(s_t / (1 − β2^k)) + ε)),  E = 0,  ρ = η λ  (decoupled decay)

and the rule reads ``exp_avg_var`` (s_t) and ``step`` (k) from the optimizer's state after each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.optimizers import register_rule
from explaind_math.optimizers.template import LinearOptimizerRule, StepCoefficients, scalar, sqrt


class AdaBelief(torch.optim.Optimizer):
    """A plain torch optimizer, written by the user, nothing explaind_math-specific in it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_var"] = torch.zeros_like(p)
                state["step"] += 1
                k, g = state["step"], p.grad
                m, s = state["exp_avg"], state["exp_avg_var"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                s.mul_(beta2).addcmul_(g - m, g - m, value=1 - beta2).add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (s / (1 - beta2**k)).sqrt().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**k))


class AdaBeliefRule(LinearOptimizerRule):
    """The exact decomposition of :class:`AdaBelief`: one table, the rest is shared."""

    name = "adabelief"
    optimizer_classes = (AdaBelief,)
    buffer_state_key = "exp_avg"  # optimizer state that carries gradients forward (a resumed run)
    example_settings = ({"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)})

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(group, {"lr", "betas", "eps", "weight_decay"})  # anything else is refused
        beta1, beta2 = group["betas"]
        return {"lr": scalar(group["lr"]), "beta1": scalar(beta1), "beta2": scalar(beta2),
                "eps": scalar(group["eps"]), "weight_decay": scalar(group["weight_decay"])}

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("exp_avg_var",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        beta1, beta2, k = hyper["beta1"], hyper["beta2"], state["step"]
        D = hyper["lr"] / ((1 - beta1**k) * (sqrt(state["exp_avg_var"] / (1 - beta2**k)) + hyper["eps"]))
        return StepCoefficients(A=beta1, C=1 - beta1, D=D, E=0, decay_decoupled=hyper["lr"] * hyper["weight_decay"])


def main() -> float:
    register_rule(AdaBeliefRule())  # the one line that makes the recorder and the shared checks know it
    torch.manual_seed(0)
    X, Y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    optimizer = AdaBelief(model.parameters(), lr=1e-2, weight_decay=0.05)
    recorder = em.TrajectoryRecorder(model, optimizer)
    for t in range(15):
        ids = torch.randperm(64)[:16]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    result = em.decompose_training(model, recorder.trajectory(), lambda o, y: F.cross_entropy(o, y), (X, Y), X[:4])
    print(result.summary())
    return result.max_residual


if __name__ == "__main__":
    main()
