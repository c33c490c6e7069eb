"""Does keeping freed memory in the process (config.keep_freed_memory) speed up training? Interleaved rounds.

    python results/time-to-accuracy/levers-s16/keep_memory_rounds.py DATA_DIR [ROUNDS]

Four worker processes, one per (loop, allocator): our loop (bench.ours_images_per_s: train.py's
train_one_epoch over the uint8 Loader) and the classic DataLoader loop (bench.classic_images_per_s), each with
glibc's default allocator and with freed memory kept. Only one worker runs at a time: in every round each
times one window of steps in turn, so a host that drifts over minutes slows all four alike. Prints each
round's images/s, page faults and kernel seconds, then the median per-round ratio kept/default of each loop.
"""

import os
import resource
import statistics
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)

WORKERS = [("ours", "default"), ("ours", "kept"), ("classic", "default"), ("classic", "kept")]


def worker(data_dir: str, loop: str, memory: str) -> None:
    import torch

    import bench
    import config
    from data import load_cifar10

    if memory == "kept":
        assert config.keep_freed_memory()
    d = load_cifar10(data_dir, download=False)
    x, y = d.train_x[:25_600], d.train_y[:25_600]
    run = dict(device=torch.device("cpu"), warmup=5, steps=20, windows=1)
    timed = bench.ours_images_per_s if loop == "ours" else bench.classic_images_per_s
    for _ in sys.stdin:  # one line: one timed round
        before = resource.getrusage(resource.RUSAGE_SELF)
        ips = timed(x, y, "resnet18", 16, 128, **run)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(ips, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime, flush=True)


def main(data_dir: str, rounds: int) -> None:
    import subprocess

    procs = {w: subprocess.Popen([sys.executable, __file__, "--worker", data_dir, *w], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT) for w in WORKERS}
    results = {w: [] for w in WORKERS}
    for r in range(rounds):
        for w, p in procs.items():
            p.stdin.write("go\n")
            p.stdin.flush()
            ips, faults, sys_s = p.stdout.readline().split()
            results[w].append(float(ips))
            print(f"round {r + 1} {w[0]:<8}{w[1]:<8}{float(ips):8.1f} images/s {int(faults):>9} page faults "
                  f"{float(sys_s):6.2f} s in the kernel", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    for loop in ("ours", "classic"):
        kept, default = results[(loop, "kept")], results[(loop, "default")]
        ratio = statistics.median(k / d for k, d in zip(kept, default))
        print(f"{loop}: median images/s default {statistics.median(default):.1f}, kept {statistics.median(kept):.1f};"
              f" median per-round ratio kept/default {ratio:.3f} over {rounds} rounds")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
