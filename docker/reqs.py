"""Print the requirements of serverless-vllm (core + the given extras), one per line.

Used by the Dockerfiles to install the heavy dependencies in their own cached layer before
the package source is copied: ``python3 reqs.py pyproject.toml ray > requirements.txt``.
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project.get("dependencies", []))
for extra in sys.argv[2:]:
    reqs += project.get("optional-dependencies", {})[extra]
print("\n".join(reqs))
