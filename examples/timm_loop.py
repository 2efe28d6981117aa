"""lopfast inside a timm-style training loop: prune, expand, fine-tune with SP distillation using
timm's optimizer and scheduler factories, an EMA copy and timm's checkpoint saver (with resume),
then contract the student and its EMA into plain compact models.

    python examples/timm_loop.py --out runs/timm-lop                   # a few epochs on stand-in data
    python examples/timm_loop.py --out runs/timm-lop --resume --epochs 4   # continue from the last checkpoint

What lopfast adds to the loop is marked ``# lopfast``; the rest is the usual timm ``train.py``
shape. The data here are random tensors: put your own DataLoader in ``make_loader``.
"""
import argparse
import os

import torch
import torch.nn.functional as F
import timm
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3

import lopfast


def make_loader(n, batch, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                                          torch.randint(0, classes, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=g)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet10t", help="timm model name (CI: test_resnet)")
    p.add_argument("--out", default="runs/timm-lop")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="at most this many steps an epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--remove", type=float, default=0.7, help="fraction of the weights to prune")
    p.add_argument("--rate", type=float, default=2.0, help="expansion rate")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    classes = 10

    # the teacher: your trained model (random weights here)
    teacher = timm.create_model(args.model, num_classes=classes).eval()
    pruned_path = os.path.join(args.out, "pruned.pt")
    if args.resume:  # lopfast: the pruned architecture from its file (no pickle)
        pruned = lopfast.load(pruned_path, model=timm.create_model(args.model, num_classes=classes))
    else:  # lopfast: prune once and keep the result
        pruned, report = lopfast.prune(teacher, torch.randn(2, 3, 32, 32), target_removed=args.remove)
        lopfast.save(pruned, pruned_path)
    student = lopfast.expand(pruned, rate=args.rate)  # lopfast: same function, over-parameterized

    # timm's factories see an ordinary model: the expanded factors are its parameters
    optimizer = create_optimizer_v2(student, opt="adamw", lr=args.lr, weight_decay=0.05)
    loader = make_loader(8 * args.batch_size, args.batch_size, classes)
    steps = min(len(loader), args.steps or len(loader))
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                                warmup_epochs=1, updates_per_epoch=steps)
    start_epoch = 0
    last = os.path.join(args.out, "last.pth.tar")
    if args.resume:
        start_epoch = resume_checkpoint(student, last, optimizer=optimizer)
    gamma = lopfast.distill.DEFAULT_GAMMA  # lopfast: SP weight per layer pair
    with lopfast.SPDistiller(teacher, student) as distiller:  # lopfast: hooks on the paired layers
        ema = ModelEmaV3(student, decay=0.99)  # a deep copy: it carries none of the distiller's hooks
        if args.resume:
            load_checkpoint(ema.module, last, use_ema=True)
        saver = CheckpointSaver(student, optimizer, model_ema=ema, checkpoint_dir=args.out,
                                recovery_dir=args.out, max_history=2)
        for epoch in range(start_epoch, num_epochs):
            student.train()
            for i, (x, y) in enumerate(loader):
                if i == steps:
                    break
                logits, sp = distiller(x)  # lopfast: teacher + student forward, SP loss
                loss = F.cross_entropy(logits, y) + gamma * sp
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ema.update(student, step=epoch * steps + i)
                scheduler.step_update(num_updates=epoch * steps + i + 1)
            scheduler.step(epoch + 1)
            saver.save_checkpoint(epoch, metric=-loss.item())  # the student is saved mid-distillation
            print(f"epoch {epoch + 1}/{num_epochs}: loss {loss.item():.4f} (SP {sp.item():.5f})", flush=True)

    # lopfast: the deployable compact models (plain timm layers, the pruned widths)
    final, final_ema = lopfast.contract(student), lopfast.contract(ema.module)
    x = torch.randn(2, 3, 32, 32)
    student.eval(), final.eval()
    torch.testing.assert_close(final(x), student(x), rtol=1e-4, atol=1e-4)
    lopfast.save(final_ema, os.path.join(args.out, "final_ema.pt"))
    print(f"contracted: {sum(p.numel() for p in final.parameters())} parameters (expanded: "
          f"{sum(p.numel() for p in student.parameters())}); EMA model saved to {args.out}/final_ema.pt")


if __name__ == "__main__":
    main()
