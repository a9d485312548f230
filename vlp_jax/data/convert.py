"""`python -m vlp_jax.data.convert` still works: the converter is vlp_jax/datasets/convert.py."""

import sys

from vlp_jax.datasets.convert import main

if __name__ == "__main__":
    sys.exit(main())
