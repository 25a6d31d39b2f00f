"""The worker: one per machine; runs vLLM engines as subprocesses and forwards inference to them."""
