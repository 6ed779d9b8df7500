"""The §4 recurrence as the engine runs it equals the recurrence unit by unit (MATH.md §4, §7).

The engine advances every unit's buffer at once: ``scale_buffer`` on the stacked buffers (A ⊙ buffer),
then each chunk of a batch's gradients fed into its units' rows (``feed_buffer`` with rows, repeated rows
accumulating, as a partition maps many samples to one group), the direct part ``subtract_direct`` by rows,
and finally ``subtract_buffered`` (−D ⊙ buffer). These are the same functions that ``buffer_step`` and
``unit_update`` compose, and that every other proof check calls with symbols. Proved here, for symbolic
A, C, D, E over 3 steps, 4 unit rows and batches with repeated rows split into chunks:

    stacked, chunked, by rows  ==  buffer_t(u) = A ⊙ buffer_{t−1}(u) + C ⊙ Σ_{i→u} grad_t(i),
                                   update_t(u) = −(D ⊙ buffer_t(u) + E ⊙ Σ_{i→u} grad_t(i))

and the same kernels run on float64 tensors (in place, ``index_put_`` by rows) give the symbolic values.
"""

from __future__ import annotations

import sympy as sp
import torch

from explaind_math.optimizers import template
from explaind_math.optimizers.template import StepCoefficients

STEPS, ROWS = 3, 4
#: per step: the unit row of each sample of the batch (repeated rows: a partition), and the chunks
BATCH_ROWS = [[0, 2, 2, 3], [1, 1, 0], [3, 0, 2, 2, 1]]
CHUNKS = [[slice(0, 3), slice(3, 4)], [slice(0, 1), slice(1, 3)], [slice(0, 2), slice(2, 5)]]

A = sp.symbols(f"A0:{STEPS}")
C = sp.symbols(f"C0:{STEPS}")
D = sp.symbols(f"D0:{STEPS}")
E = sp.symbols(f"E0:{STEPS}")
G = [[sp.Symbol(f"g{t}_{k}") for k in range(len(BATCH_ROWS[t]))] for t in range(STEPS)]


def table(t: int) -> StepCoefficients:
    return StepCoefficients(A=A[t], C=C[t], D=D[t], E=E[t])


def engine_form(values_of, zeros, grads_of, rows_of):
    """The engine's order of operations (RuleBuffers._feed_units, advance) on stacked per-row buffers."""
    buffer, out = zeros(), []
    for t in range(STEPS):
        c = values_of(t)
        buffer = template.scale_buffer(buffer, c.A)
        direct = zeros()
        for sl in CHUNKS[t]:
            rows, grads = rows_of(t, sl), grads_of(t, sl)
            buffer = template.feed_buffer(buffer, c.C, grads, rows)
            direct = template.subtract_direct(direct, c.E, grads, rows)
        out.append(template.subtract_buffered(direct, c.D, buffer))
    return out


def unit_by_unit(t_max: int):
    """buffer_step / unit_update for each row separately, its gradient the sum of the batch's entries."""
    buffers = [sp.Integer(0)] * ROWS
    out = []
    for t in range(t_max):
        c = table(t)
        updates = []
        for u in range(ROWS):
            grad = sum((G[t][k] for k, r in enumerate(BATCH_ROWS[t]) if r == u), sp.Integer(0))
            buffers[u] = template.buffer_step(buffers[u], grad, c)
            updates.append(template.unit_update(buffers[u], grad, c))
        out.append(updates)
    return out


def symbolic_engine():
    return engine_form(table, lambda: sp.zeros(ROWS, 1), lambda t, sl: sp.Matrix(G[t][sl]),
                       lambda t, sl: BATCH_ROWS[t][sl])


def test_stacked_chunked_recurrence_equals_unit_by_unit():
    engine, reference = symbolic_engine(), unit_by_unit(STEPS)
    for t in range(STEPS):
        for u in range(ROWS):
            assert sp.expand(engine[t][u] - reference[t][u]) == 0, (t, u)


def test_the_same_kernels_on_tensors_give_the_symbolic_values():
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3)
    coeff = {s: torch.rand(shape, generator=gen, dtype=torch.float64) for s in (*A, *C, *D, *E)}
    grads = [[torch.randn(shape, generator=gen, dtype=torch.float64) for _ in row] for row in BATCH_ROWS]

    def tensor_table(t: int) -> StepCoefficients:
        return StepCoefficients(A=coeff[A[t]], C=coeff[C[t]], D=coeff[D[t]], E=coeff[E[t]])

    engine = engine_form(tensor_table, lambda: torch.zeros((ROWS, *shape), dtype=torch.float64),
                         lambda t, sl: torch.stack(grads[t][sl]),
                         lambda t, sl: torch.tensor(BATCH_ROWS[t][sl], dtype=torch.long))
    symbolic = symbolic_engine()
    for t in range(STEPS):
        for u in range(ROWS):
            for idx in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
                values = {s: float(v[tuple(idx)]) for s, v in coeff.items()}
                values.update({G[s][k]: float(grads[s][k][tuple(idx)])
                               for s in range(STEPS) for k in range(len(BATCH_ROWS[s]))})
                expected = float(symbolic[t][u].subs(values))
                assert abs(float(engine[t][u][tuple(idx)]) - expected) <= 1e-12 * (1 + abs(expected)), (t, u, idx)
