"""``python -m stochastic_attention.train CONFIG.yaml [--resume]`` (e.g. under torchrun -m)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
