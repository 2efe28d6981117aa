"""lopfast in a plain PyTorch loop with mixed precision and DistributedDataParallel.

    python examples/ddp_amp_loop.py --world 2                  # 2 processes on the CPU (gloo), bf16 autocast
    torchrun --nproc_per_node 2 examples/ddp_amp_loop.py       # the same, started by torchrun

The student is the DDP-wrapped expanded model: ``SPDistiller`` hooks the inner module and calls
the wrapper, so DDP's gradient all-reduce runs as usual. bf16 autocast needs no GradScaler; for
fp16 on a GPU add ``torch.amp.GradScaler`` around ``backward`` / ``step`` as usual. On a GPU use
the "nccl" backend and ``device_ids=[local_rank]``. The data here are random tensors: use your
DataLoader with a ``DistributedSampler``.
"""
import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import lopfast


def run(rank, world, args, teacher, pruned, port):
    if port is not None:  # started by mp.spawn (torchrun sets the environment instead)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank draws its own batches
    student = lopfast.expand(pruned, rate=2.0, generator=torch.Generator().manual_seed(0))  # lopfast
    ddp = DDP(student)  # broadcasts rank 0's weights: every rank starts from the same student
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gamma = lopfast.distill.DEFAULT_GAMMA
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16")
    with lopfast.SPDistiller(teacher, ddp) as distiller:  # lopfast: hooks on ddp.module, calls ddp
        for step in range(args.steps):
            x, y = torch.randn(args.batch_size, 1, 8, 8), torch.randint(0, 10, (args.batch_size,))
            with amp:
                logits, sp = distiller(x)  # teacher and student forward, bf16 where autocast says
            loss = F.cross_entropy(logits.float(), y) + gamma * sp  # the SP loss is float32 already
            opt.zero_grad()
            loss.backward()  # DDP all-reduces the gradients here
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 5.0)
            opt.step()
            if rank == 0:
                print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} (SP {sp.item():.5f})", flush=True)
    # every rank holds the same weights; rank 0 contracts and saves the deployable model
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    assert torch.equal(flat, ref), "ranks diverged"
    if rank == 0:
        final = lopfast.contract(student)  # lopfast: plain compact layers
        os.makedirs(args.out, exist_ok=True)
        lopfast.save(final, os.path.join(args.out, "final.pt"))
        print(f"{world} ranks agree; contracted model saved to {args.out}/final.pt", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    p.add_argument("--out", default="runs/ddp-lop")
    args = p.parse_args()
    torch.manual_seed(0)
    # your trained model (here lopfast's small digits ResNet on 8x8 inputs, random weights)
    teacher = lopfast.build_model("digitsnet", width=16, num_classes=10).eval()
    pruned, _ = lopfast.prune(teacher, torch.randn(2, 1, 8, 8), ratio=0.5)  # lopfast: half the channels
    if "RANK" in os.environ:  # torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, teacher, pruned, None)
        return
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world, args, teacher, pruned, port), nprocs=args.world)


if __name__ == "__main__":
    main()
