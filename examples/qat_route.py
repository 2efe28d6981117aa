"""Quantization-aware LOP: prune -> expand -> QAT fine-tuning with SP distillation -> contract -> int8.

    python examples/qat_route.py                        # digits (embedded data set), about a minute on a CPU
    python examples/qat_route.py --teacher-epochs 1 --epochs 1 --steps 2    # a smoke run

The expanded student is prepared with torch's FX quantization and lopfast's configs: every
expanded conv is fused with its BatchNorm (and ReLU) and trained on its fake-quantized collapsed
kernel. The teacher is fused the same way, so the distiller pairs the same fused outputs.
``lopfast.contract`` turns the trained student into torch's QAT layers holding the collapsed
kernels and ``convert_fx`` into the int8 compact model. Eager-mode QAT works too (see
``lopfast.qat``); bench/qat_digits.py measures this route against QAT fine-tuning.
"""
import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.ao import quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_qat_fx

import lopfast


def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).sum().item() for x, y, _ in loader.epoch(0)]
    return 100.0 * sum(hits) / loader.num_samples


def fit(model, loader, epochs, steps, lr, distiller=None, on_epoch=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gamma = lopfast.distill.DEFAULT_GAMMA
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        for i, (x, y, _) in enumerate(loader.epoch(epoch)):
            if steps is not None and i == steps:
                break
            if distiller is None:
                loss = F.cross_entropy(model(x), y)
            else:
                logits, sp = distiller(x)  # lopfast: SP distillation from the (fused) teacher
                loss = F.cross_entropy(logits, y) + gamma * sp
            opt.zero_grad()
            loss.backward()
            opt.step()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="at most this many steps an epoch")
    p.add_argument("--remove", type=float, default=0.8, help="fraction of the weights to prune")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao points to torchao's pt2e flow
    warnings.filterwarnings("ignore", message=".*(reduce_range|quantize_per_tensor|_aminmax).*")
    torch.manual_seed(0)
    data = lopfast.load_data("digits", batch_size=128)
    example = data.example_inputs(2)

    teacher = lopfast.build_model("digitsnet", num_classes=10)  # your trained model; trained briefly here
    fit(teacher, data.train, args.teacher_epochs, args.steps, lr=0.1)
    pruned, _ = lopfast.prune(teacher.eval(), example, target_removed=args.remove)  # lopfast
    student = lopfast.expand(pruned, rate=3.0)  # lopfast

    qconfig = tq.get_default_qat_qconfig_mapping("x86")
    qat = prepare_qat_fx(student.train(), qconfig, (example,),
                         prepare_custom_config=lopfast.qat.prepare_custom_config(),  # lopfast: one module per layer
                         backend_config=lopfast.qat.backend_config())  # lopfast: fusion, QAT layers
    fused_teacher = fuse_fx(teacher.eval())  # BatchNorm folded the way the student's is

    def schedule(epoch):  # the usual last phase of QAT: fixed ranges, frozen BatchNorm statistics
        if epoch == max(1, (3 * args.epochs) // 4):
            qat.apply(tq.disable_observer)
            qat.apply(lopfast.qat.freeze_bn_stats)

    with lopfast.SPDistiller(fused_teacher, qat) as distiller:
        fit(qat, data.train, args.epochs, args.steps, lr=0.01, distiller=distiller, on_epoch=schedule)
    qat.eval()
    qat.apply(tq.disable_observer)
    int8 = convert_fx(lopfast.contract(qat))  # lopfast: torch's QAT layers on the collapsed kernels -> int8

    x = next(data.test.epoch(0))[0]
    fq_out, int8_out = qat(x), int8(x)
    agree = (fq_out.argmax(1) == int8_out.argmax(1)).float().mean().item()
    print(f"teacher {accuracy(teacher, data.test):.2f}%  pruned {accuracy(pruned, data.test):.2f}%  "
          f"QAT fake-quant {accuracy(qat, data.test):.2f}%  int8 {accuracy(int8, data.test):.2f}%")
    print(f"int8 vs fake-quant: predictions agree on {100 * agree:.1f}% of a test batch, "
          f"max |logit difference| {(fq_out - int8_out).abs().max().item():.4f}")
    assert not any(isinstance(m, (lopfast.ExpandedConv2d, lopfast.ExpandedLinear)) for m in int8.modules())


if __name__ == "__main__":
    main()
