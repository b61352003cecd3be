"""``python -m metakernels``: the same command line as the ``metakernels`` script."""

import sys

from metakernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
