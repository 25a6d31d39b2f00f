"""`python -m serverless_vllm.worker [flags]`: the same as `svllm worker [flags]`."""

import sys

from ..cli import main

main(["worker", *sys.argv[1:]])
