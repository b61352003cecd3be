"""``python -m metakernels.train ...`` (what ``torchrun`` launches): ``metakernels train ...``."""

import os
import sys

from metakernels.train.cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank leaves without running the interpreter's and the C++ libraries'
        # teardown: everything it writes is written and closed by now, and the process group is
        # destroyed. In that teardown torch's distributed runtime (gloo on the CPU) sometimes
        # destroys a thread that is still running, and the rank dies of SIGABRT ("terminate
        # called without an active exception") after a run that succeeded: about 1 run in 10 on a
        # loaded 2-core machine, with every output already on disk, and torchrun then reports the
        # whole job as failed (tests/test_train_distributed.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
