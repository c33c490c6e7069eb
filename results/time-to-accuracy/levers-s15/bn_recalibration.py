"""Offline (session 15): test accuracy of trained nets with their BatchNorm statistics recomputed on training images.

    cd runs && python ../results/time-to-accuracy/levers-s15/bn_recalibration.py N clean,2,4 CKPT ...

N training images (batches of 128, a cumulative average: momentum None), each either clean (no crop, no flip) or
cropped from a padding of P pixels and flipped, as in training; then the 10,000 test images. The weights are the
same in every column, only the statistics differ. The tables in bn-recalibration.txt came from two throwaway
scripts whose code this one joins.
"""
import sys

import torch

sys.path.insert(0, "..")  # run from runs/: the repository root
from data import Loader, load_cifar  # noqa: E402
from runs import load_model  # noqa: E402
from train import evaluate  # noqa: E402

data = load_cifar("../data", "cifar10")
test = Loader(data.test_x, data.test_y, 500, "cpu", train=False, channels_last=True, mean=data.mean, std=data.std)


def recalibrated(path: str, n: int, how: str) -> torch.nn.Module:
    model = load_model(path).to(memory_format=torch.channels_last)
    train = Loader(data.train_x, data.train_y, 128, "cpu", train=True, seed=123, channels_last=True,
                   crop_flip=how != "clean", pad=0 if how == "clean" else int(how), mean=data.mean, std=data.std)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(train.batches(0)):
            if i * 128 >= n:
                break
            model(x)
    return model.eval()


n, kinds = int(sys.argv[1]), sys.argv[2].split(",")
for path in sys.argv[3:]:
    stored = 100 * evaluate(load_model(path).to(memory_format=torch.channels_last), test, 10)["acc"]
    deltas = [100 * evaluate(recalibrated(path, n, how), test, 10)["acc"] - stored for how in kinds]
    print(f"{path:<40} stored {stored:.2f}  " + "  ".join(f"{h} {d:+.2f}" for h, d in zip(kinds, deltas)),
          flush=True)
