"""``python -m metakernels.train ...`` (what ``torchrun`` launches): ``metakernels train ...``."""

import sys

from metakernels.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
