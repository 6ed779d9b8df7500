"""Corollary 3.3, Corollary F.2, Remark F.3 and Appendix G.2 on one small AdamW run.

    python examples/corollaries.py [--steps 24]

1. the loss of each test input, and the margin between its two top classes, decomposed (h∘f);
2. a hidden activation decomposed by module name; later layers contribute exactly zero;
3. influence per class of training samples (partition: K buffers instead of M);
4. checkpoints only: one simulated update per checkpoint, exact; with the geometric persistence
   estimate, labelled as such;
5. step subsampling: fidelity of reconstructions from the top fraction of steps.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math import targets
from explaind_math.demo import make_blobs


def main(steps: int = 24) -> None:
    g = torch.Generator().manual_seed(0)
    X, Y = make_blobs(120, 3, 6, g)
    X_test, Y_test = make_blobs(6, 3, 6, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.05)
    recorder = em.TrajectoryRecorder(model, optimizer)
    checkpoints, checkpoint_batches = [], []
    for t in range(steps):
        ids = torch.randperm(120, generator=g)[:20]
        if t % 8 == 0:  # what a large-model run would keep: a checkpoint now and then
            checkpoints.append(em.checkpoint_from_optimizer(model, optimizer))
            checkpoint_batches.append(ids)
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    trajectory = recorder.trajectory()
    loss_fn = lambda out, y: F.cross_entropy(out, y)
    data = (X, Y)

    print("1. Corollary 3.3 (i): test loss L(f(x), y) and margin f_0 − f_1")
    r = em.decompose_function_of_output(model, trajectory, loss_fn, data, X_test, targets.per_sample_loss(loss_fn),
                                        test_labels=Y_test)
    print(f"   loss of test 0: {float(r.f_initial[0, 0]):.4f} → {float(r.f_final[0, 0]):.4f}, "
          f"certified residual {r.max_residual:.1e}; samples lowering it most: "
          f"{[i for i, s in sorted(r.top_units(0, 0, k=20), key=lambda p: p[1])[:3]]}")
    r = em.decompose_function_of_output(model, trajectory, loss_fn, data, X_test, targets.margin(0, 1))
    print(f"   margin residual {r.max_residual:.1e}")

    print("2. Corollary 3.3 (ii): the GELU activation (module '3'), 16 units per test input")
    r = em.decompose_activation(model, trajectory, loss_fn, data, X_test, "3")
    print(f"   residual {r.max_residual:.1e}; influence per parameter tensor: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in r.per_parameter().items()))

    print("3. Corollary F.2: influence of each class of training samples on each test logit")
    r = em.decompose_by_partition(model, trajectory, loss_fn, data, X_test, Y, keep=("unit",))
    per_class = r.kernel_sum(("test", "unit", "output"))
    for x in range(3):
        o = int(Y_test[x])
        print(f"   test {x} (class {o}) logit {o}: " + ", ".join(
            f"class {c}: {float(per_class[x, k, o]):+.3f}" for k, c in enumerate(r.units)))
    print(f"   residual {r.max_residual:.1e}")

    print("4. Remark F.3: checkpoints only")
    exact = em.decompose_from_checkpoints(model, checkpoints, checkpoint_batches, loss_fn, data, X_test)
    estimated = em.decompose_from_checkpoints(model, checkpoints, checkpoint_batches, loss_fn, data, X_test,
                                              persistence_steps=[8] * len(checkpoints))
    for k, (a, b) in enumerate(zip(exact, estimated)):
        print(f"   checkpoint {k}: simulated update residual {a.max_residual:.1e}, first-moment unit "
              f"{float(a.carried_state_sum().abs().sum()):.3f}; with persistence: estimated={b.estimated}")

    print("5. Appendix G.2: step subsampling (held-out batch of 30)")
    rows = em.step_subsampling_fidelity(model, trajectory, loss_fn, data, X_test, (X[90:], Y[90:]),
                                        fractions=(0.1, 0.25, 0.5, 1.0))
    print(f"   {'q':>5s} {'steps':>5s} {'agreement':>9s} {'KL':>9s} {'max error':>9s}")
    for row in rows:
        print(f"   {row['fraction']:5.2f} {row['steps_kept']:5d} {row['agreement']:9.3f} {row['kl']:9.2e} "
              f"{row['max_abs_error']:9.2e}{'  (estimate)' if row['estimated'] else ''}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    main(parser.parse_args().steps)
