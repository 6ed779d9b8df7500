"""Corollary 3.2 on a small CNN trained with SGD + Nesterov momentum, weight decay and OneCycleLR.

Records the user's own training loop, decomposes the final logits of a few test images per training
sample and per layer, and prints the certified residual and the most influential samples.

    python examples/sgd_momentum.py [--steps 30]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em


def main(steps: int = 30) -> float:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # two classes of 8×8 "images": a bright horizontal or vertical bar plus noise
    M = 64
    Y = torch.arange(M) % 2
    X = 0.3 * torch.randn(M, 1, 8, 8, generator=g, dtype=torch.float64)
    for i in range(M):
        k = int(torch.randint(1, 7, (1,), generator=g))
        if Y[i] == 0:
            X[i, 0, k, :] += 1.0
        else:
            X[i, 0, :, k] += 1.0
    X_test, Y_test = X[:4].clone() + 0.1, Y[:4]

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 2),
    ).to(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=steps)
    recorder = em.TrajectoryRecorder(model, optimizer)
    for t in range(steps):
        ids = torch.randperm(M, generator=g)[:16]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
        scheduler.step()

    result = em.decompose_sgd_momentum_training(
        model, recorder.trajectory(), lambda out, y: F.cross_entropy(out, y), (X, Y), X_test,
        params="module",
    )
    print(result.summary())
    for x in range(len(X_test)):
        o = int(Y_test[x])
        top = ", ".join(f"{i}({'h' if Y[i] == 0 else 'v'}) {s:+.3f}" for i, s in result.top_units(x, o, k=3))
        print(f"test {x} (class {o}): logit {float(result.f_final[x, o]):+.4f}; top samples {top}")
    print("influence per layer on all test logits:", {k: round(v, 4) for k, v in result.per_parameter().items()})
    return result.max_residual


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
