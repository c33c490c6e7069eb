"""train.py with glibc's default allocator, for timing config.keep_freed_memory against it (session 16).

    python results/time-to-accuracy/levers-s16/keep_memory_ab.py --default-malloc TRAIN_FLAGS...   # lever off
    python results/time-to-accuracy/levers-s16/keep_memory_ab.py TRAIN_FLAGS...                    # as train.py

The numbers of the two are the same to the last bit (the allocator changes where tensors live, not what they
hold); only the time differs.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import config  # noqa: E402
import train  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--default-malloc" in argv:
        argv.remove("--default-malloc")
        config.keep_freed_memory = lambda: False  # configure_backends looks it up at call time
    train.main(argv)
