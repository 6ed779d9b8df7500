"""More than one process: the steps split across ``torch.distributed`` ranks (MATH.md §4, §11).

The buffers of the §4 template follow a linear recurrence, buffer_t = A_t ⊙ buffer_{t−1} + C_t ⊙ g_t, so the
state S_r entering block r (steps [a_r, b_r)) is

    S_{r+1} = A_{b_r − 1} ⋯ A_{a_r} S_r  +  E_r,        S_0 = the initial state (zero, or carried in),

where E_r is block r's own part: the buffers at its end when started from zero. Every rank computes its E_r
(per-sample gradients of its own steps only), the states are passed along the ranks (a sequential scan: each
rank applies its block's A's to the state it receives, adds E_r and sends the result on; that costs no
gradients and works for any linear A, matrix preconditioners included), and then every rank decomposes its
block from the exact state S_r. Every step sees exactly the buffers the single-process run sees, so results
agree with it to rounding (the only difference is the order of the final sums over ranks).

Which optimizer buffers exist at a block's start (PyTorch's SGD creates its momentum buffer at the first step
with μ ≠ 0, undamped) depends only on hyper-parameters; it is gathered first.

Launch with ``torchrun --nproc_per_node R script.py`` (gloo on CPU, NCCL on GPUs), call
``torch.distributed.init_process_group`` in the script, and pass ``distributed=True`` to a theorem function.
Every rank needs the model, the trajectory (an on-disk trajectory is read only where a rank needs it) and the
data; every rank returns the whole result.
"""

from __future__ import annotations

import torch

from .blocks import BlockResult, StepAccumulator, run_block
from .buffers import RuleBuffers
from .context import DecompositionContext
from .gradients import step_gradients
from .plan import chunks
from ..errors import ExplaindError

__all__ = ["block_of_rank", "run_distributed", "scan_buffers", "run_adjoint_distributed"]

_MODES = ("jvp", "jacobian", "skipped")


def block_of_rank(num_steps: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s consecutive steps: the first num_steps mod R ranks take one step more."""
    base, extra = divmod(num_steps, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rank_layout(ctx: DecompositionContext, group) -> tuple:
    """(group, rank, communication device, every rank's block of steps) of an initialized process group
    (``True``: the default group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ExplaindError("distributed=... needs torch.distributed.init_process_group() to have been called "
                            "(launch the script with torchrun)")
    group = None if group is True else group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    blocks = [block_of_rank(ctx.trajectory.num_steps, world, r) for r in range(world)]
    return group, rank, comm, blocks


def run_distributed(ctx: DecompositionContext, group, progress: bool | None = False) -> tuple[BlockResult, list[int]]:
    """Decompose ``ctx``'s trajectory with one block of steps per rank of ``group`` (``True``: the default
    group); returns the whole run's :class:`BlockResult` on every rank."""
    group, rank, comm, blocks = rank_layout(ctx, group)
    num_steps, mine = ctx.trajectory.num_steps, blocks[rank]

    buffers = scan_buffers(ctx, group, blocks, rank, comm)

    # 3. this block from the exact state, then 4. every rank gets the whole run
    local = run_block(ctx, buffers, mine, progress) if len(mine) else None
    return _gather(ctx, local, buffers.pseudo_names, blocks, rank, group, comm), list(range(num_steps))


def scan_buffers(ctx: DecompositionContext, group, blocks: list[range], rank: int, comm: torch.device) -> RuleBuffers:
    """The rule's buffers S_r at the start of this rank's block, by the forward scan (module docstring)."""
    import torch.distributed as dist

    world, mine = len(blocks), blocks[rank]
    # 0. which optimizer buffers exist when each block starts (hyper-parameters only)
    buffers = RuleBuffers(ctx)  # the initial state S_0; rank r > 0 replaces it by the S_r it receives
    created = torch.zeros(len(ctx.names), dtype=torch.float64, device=comm)
    for t in mine:
        for n in buffers.creates_buffers(ctx.trajectory.steps[t]):
            created[ctx.names.index(n)] = 1.0
    gathered = [torch.zeros_like(created) for _ in range(world)]
    dist.all_gather(gathered, created, group=group)
    before = sum((gathered[r] for r in range(rank)), torch.zeros_like(created))
    start_flags = {n: buffers.has_buffer[n] or bool(before[k] > 0) for k, n in enumerate(ctx.names)}
    buffers.has_buffer = dict(start_flags)

    # 1. this block's own part E_r: its buffers at the end when started from zero
    own = RuleBuffers(ctx, zero_state=True)
    own.has_buffer = dict(start_flags)
    theta_t = ctx.theta(mine.start) if len(mine) else None
    for t in mine:
        theta_next = ctx.theta(t + 1)
        own.advance(t, step_gradients(ctx, t, theta_t), theta_t, theta_next, checks=False)
        theta_t = theta_next

    # 2. the scan: receive S_r, send S_{r+1} = A_{b−1} ⋯ A_a S_r + E_r
    if rank > 0:
        received = []
        for template in buffers.state():
            buffer = torch.empty(template.shape, dtype=template.dtype, device=comm)
            dist.recv(buffer, src=_global_rank(group, rank - 1), group=group)
            received.append(buffer.to(ctx.device))
        buffers.load_state(received)
    if rank < world - 1:
        carry = RuleBuffers(ctx)
        carry.load_state([s.clone() for s in buffers.state()])
        carry.has_buffer = dict(start_flags)
        for t in mine:
            carry.propagate(t)
        carry.add_state(own.state())
        for tensor in carry.state():
            dist.send(tensor.to(comm).contiguous(), dst=_global_rank(group, rank + 1), group=group)
        del carry
    del own

    return buffers


def _global_rank(group, rank: int) -> int:
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


def _gather(ctx: DecompositionContext, local: BlockResult | None, pseudo_names, blocks, rank, group, comm) -> BlockResult:
    import torch.distributed as dist

    world = len(blocks)
    longest = max(len(b) for b in blocks)
    X, O = ctx.xs_test.shape[0], ctx.num_outputs
    rows = ctx.num_rows
    kernel_shape = (rows, X, len(ctx.unit_labels), O) if ctx.keep_units else (rows, X, O)
    pseudo_shape = (rows, X, O)
    zeros = lambda shape, dtype=ctx.dtype: torch.zeros(shape, dtype=dtype, device=comm)  # noqa: E731

    def gather_steps(per_step: list[torch.Tensor], shape, dtype=ctx.dtype) -> list[torch.Tensor]:
        """Every rank's per-step tensors, in step order (padded to the longest block for all_gather)."""
        padded = zeros((longest, *shape), dtype)
        for k, v in enumerate(per_step):
            padded[k] = v.to(comm)
        out = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(out, padded, group=group)
        return [out[r][k].to(ctx.device) for r in range(world) for k in range(len(blocks[r]))]

    def per_step_tensors(acc: StepAccumulator | None, shape) -> list[torch.Tensor]:
        if acc is None:
            return []
        return [zeros(shape) if v is None else v for v in acc.steps]

    def summed(acc: StepAccumulator | None, shape) -> torch.Tensor:
        total = zeros(shape) if acc is None or acc.total is None else acc.total.to(comm).clone()
        dist.all_reduce(total, group=group)
        return total.to(ctx.device)

    def numbers(values: list) -> list:
        column = gather_steps([torch.tensor(float(v), dtype=torch.float64) for v in values], (), torch.float64)
        return [float(v) for v in column]

    kernel = StepAccumulator(ctx.keep_steps)
    pseudo = {p: StepAccumulator(ctx.keep_steps) for p in pseudo_names}
    if ctx.keep_steps:
        kernel.steps = gather_steps(per_step_tensors(local and local.kernel, kernel_shape), kernel_shape)
        for p in pseudo_names:
            pseudo[p].steps = gather_steps(per_step_tensors(local and local.pseudo[p], pseudo_shape), pseudo_shape)
    else:
        kernel.total = summed(local and local.kernel, kernel_shape)
        for p in pseudo_names:
            pseudo[p].total = summed(local and local.pseudo[p], pseudo_shape)
    residuals = gather_steps(local.residuals if local else [], (X, O))
    replay = numbers(local.replay_errors if local else [])
    nodes = [int(v) for v in numbers(local.nodes if local else [])]
    probes = [int(v) for v in numbers(local.probe_nodes if local else [])]
    modes = [_MODES[int(v)] for v in numbers([_MODES.index(m) for m in local.modes] if local else [])]
    scales = numbers(local.scales if local else [])

    def from_rank(value: torch.Tensor | None, src: int) -> torch.Tensor:
        buffer = value.to(comm).clone() if rank == src else zeros((X, O))
        dist.broadcast(buffer, src=_global_rank(group, src), group=group)
        return buffer.to(ctx.device)

    last = max(r for r in range(world) if len(blocks[r])) if any(len(b) for b in blocks) else 0
    f_start = from_rank(local.f_start if local and rank == 0 else None, 0)
    f_end = from_rank(local.f_end if local and rank == last else None, last)
    return BlockResult(kernel, pseudo, residuals, replay, nodes, probes, modes, scales, f_start, f_end)


# ---------------------------------------------------------------------------------------------- the adjoint
def run_adjoint_distributed(ctx: DecompositionContext, group, progress: bool | None = False) -> tuple[BlockResult, list[int]]:
    """The adjoint (MATH.md §12) with one block of steps per rank; every rank returns the whole run.

    The forward pass of the checks runs on each block from the summed buffer the forward scan carries in.
    The adjoint entering block r from block r + 1, L_{r+1}, follows the reverse scan

        L_r = O_r + P_r(L_{r+1}),   L_R = 0,

    with O_r block r's own λ carried out of its first step (its backward pass from λ = 0, Φ's included) and P_r
    the block's A's transposed (λ ← A_sᵀ λ for s = b_r − 1 … a_r, no gradients, no Φ). Every rank runs its own
    pass, the L's are passed from the last rank down, and each rank then adds the incoming L_{r+1}'s part
    (κ_s = C_sᵀ P(L_{r+1})_s against its batches' gradients); by linearity the sum is the sequential run's.
    """
    import torch.distributed as dist

    from .adjoint import AdjointTotals, adjoint_pass, replay_summed_buffers, summed_unit_context

    group, rank, comm, blocks = rank_layout(ctx, group)
    N, world = ctx.trajectory.num_steps, len(blocks)
    mine = blocks[rank]
    summed = summed_unit_context(ctx)
    checks = replay_summed_buffers(ctx, mine, scan_buffers(summed, group, blocks, rank, comm), progress)
    totals = AdjointTotals.zeros(ctx, ctx.pseudo_names)
    for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
        own = adjoint_pass(ctx, mine, checks, sl, totals, progress=progress)
        incoming = None
        if rank < world - 1:
            incoming = {n: torch.empty_like(v, device=comm) for n, v in own.items()}
            for n in ctx.names:
                dist.recv(incoming[n], src=_global_rank(group, rank + 1), group=group)
            incoming = {n: v.to(ctx.device) for n, v in incoming.items()}
        if rank > 0:
            out = own if incoming is None else {n: own[n] + _propagate_block(ctx, mine, checks, incoming)[n]
                                                for n in ctx.names}
            for n in ctx.names:
                dist.send(out[n].to(comm).contiguous(), dst=_global_rank(group, rank - 1), group=group)
        if incoming is not None:  # the incoming λ's part of this block (no Φ: already counted in own)
            adjoint_pass(ctx, mine, checks, sl, totals, adjoint=incoming, with_phi=False)
    return _reduce_adjoint(ctx, totals, checks, blocks, rank, group, comm), list(range(N))


def _propagate_block(ctx: DecompositionContext, steps: range, checks, adjoint: dict) -> dict:
    """P_r(λ): λ ← A_sᵀ λ for s = b − 1 … a (a copy; coefficients only, no gradients and no Φ)."""
    from ..optimizers import template as recurrence
    from .buffers import rule_coefficients

    lam = {n: v.clone() for n, v in adjoint.items()}
    for s in reversed(steps):
        step = ctx.trajectory.steps[s]
        before = checks.buffers_before(s)
        for n in ctx.names:
            if n in set(step.updated):
                lam[n] = recurrence.propagate_adjoint(lam[n], rule_coefficients(ctx, step, n, before[n]).A)
    return lam


def _reduce_adjoint(ctx: DecompositionContext, totals, checks, blocks, rank, group, comm) -> BlockResult:
    """Every rank's share summed (each filled its own steps, or its part of the sums), and the per-step facts."""
    import torch.distributed as dist

    N, mine = ctx.trajectory.num_steps, blocks[rank]
    X, O = ctx.xs_test.shape[0], ctx.num_outputs
    facts = torch.zeros((4, N), dtype=torch.float64)
    f_values = torch.zeros((N + 1, X, O), dtype=ctx.dtype)
    for k, t in enumerate(mine):
        facts[:, t] = torch.tensor([checks.replay_errors[k], checks.scales[k], totals.nodes[t],
                                    totals.probe_nodes[t]], dtype=torch.float64)
        f_values[t] = checks.f_at(t).cpu()
    if len(mine) and mine.stop == N:
        f_values[N] = checks.f_at(N).cpu()
    tensors = [totals.kernel, *totals.pseudo.values(), totals.residuals, facts, f_values]
    for k, tensor in enumerate(tensors):
        moved = tensor.to(comm)
        dist.all_reduce(moved, group=group)
        tensors[k] = moved.to(ctx.device if k < len(tensors) - 2 else tensor.device)
    totals.kernel, totals.residuals = tensors[0], tensors[len(totals.pseudo) + 1]
    totals.pseudo = dict(zip(totals.pseudo, tensors[1:len(totals.pseudo) + 1]))
    facts, f_values = tensors[-2], tensors[-1].to(ctx.device)
    totals.nodes, totals.probe_nodes = [int(v) for v in facts[2]], [int(v) for v in facts[3]]
    return totals.to_block(ctx, [float(v) for v in facts[0]], [float(v) for v in facts[1]], f_values[0], f_values[N])
