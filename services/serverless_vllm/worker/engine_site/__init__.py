"""The site hook of CPU engines' processes (sitecustomize.py, first on their PYTHONPATH: worker/engine.py)."""
