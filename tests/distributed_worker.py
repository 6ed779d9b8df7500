"""torchrun worker for tests/test_distributed.py: every case of explaind_math.testing.distributed_cases,
decomposed with the steps split across the ranks (gloo); rank 0 writes the results as safetensors."""

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from explaind_math.testing.distributed_cases import CASES, decompose_case


def tensors_of(result) -> dict[str, torch.Tensor]:
    out = {"kernel": result.kernel, "regularization": result.regularization, "f_initial": result.f_initial,
           "f_final": result.f_final, "step_residuals": result.step_residuals,
           "replay_errors": torch.tensor(result.replay_errors, dtype=torch.float64),
           "nodes_per_step": torch.tensor(result.nodes_per_step, dtype=torch.int64)}
    if result.carried_state is not None:
        out["carried_state"] = result.carried_state
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in CASES:
            result = decompose_case(name, distributed=True)
            if dist.get_rank() == 0:
                save_file(tensors_of(result), os.path.join(args.out, f"{name}.safetensors"),
                          metadata={"contraction": ",".join(result.contraction_per_step)})
        # both ranks done before the group is torn down: a rank destroying it while the other still uses its
        # connections aborted in gloo once ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
