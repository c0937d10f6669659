"""pytest-benchmark cases over the same harness and case definitions as `python -m flashquant.bench`.

pytest bench/ --benchmark-json=out.json            # CUDA cases skip cleanly without a GPU
pytest bench/ -k quant_matmul --benchmark-only
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # bench_utils
