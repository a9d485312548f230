"""`python -m vlp_jax.data.emoji` still works: the emoji converter is vlp_jax/datasets/emoji.py."""

import sys

from vlp_jax.datasets.emoji import main

if __name__ == "__main__":
    sys.exit(main())
