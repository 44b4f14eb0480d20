"""One of two gloo ranks for test_core's distributed sigma test: ranks of different batch and map
sizes take the paper's sigma together. Prints one JSON line: the running sigma^2 after a step, the
number of all-reduces it made, and what a second step whose rank 1 holds a NaN left behind.

    python sigma_worker.py RANK PORT KERNEL
"""
import json
import sys

import torch
import torch.distributed as dist

from akd_cli import AKDLoss


def features(rank: int):
    """Rank 0: two images of 12 x 10 and 6 x 5; rank 1: one image of 16 x 12 and 8 x 6."""
    g = torch.Generator().manual_seed(100 + rank)
    n, size = (2, (12, 10)) if rank == 0 else (1, (16, 12))
    shapes = [(n, 8, *size), (n, 8, size[0] // 2, size[1] // 2)]
    return [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) * 2 + 0.5 for s in shapes]


def loss(kernel: str) -> AKDLoss:
    # momentum 1: the running sigma^2 is the last step's, which the test recomputes from each rank alone
    return AKDLoss(base="cwd", num_avatars=2, drop_rate=0.3, uncertainty="paper", sigma_momentum=1.0,
                   avatar_kernel=kernel, avatar_rng="counter" if kernel != "loop" else None)


if __name__ == "__main__":
    rank, port, kernel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    reduces = []
    real_all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        reduces.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    akd = loss(kernel)
    student, teacher = features(rank)
    torch.manual_seed(rank)
    akd(student, teacher)
    result = {"sigma2": [akd.sigma2_0.tolist(), akd.sigma2_1.tolist()], "all_reduces": list(reduces)}
    state = {name: value.clone() for name, value in akd.state_dict().items()}
    if rank == 1:
        teacher[0] = teacher[0].clone()
        teacher[0][0, 0, 0, 0] = float("nan")
    try:
        akd(student, teacher)
        result["raised"] = None
    except ValueError as error:
        result["raised"] = str(error)
    result["state_kept"] = all(torch.equal(state[name], value) for name, value in akd.state_dict().items())
    dist.destroy_process_group()
    print(json.dumps(result))
