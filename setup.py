"""Package list for setuptools (everything else is in pyproject.toml).

Here rather than in pyproject.toml because the bundled sample problems in `data/` ship inside
the package as `latentmas.sample_data` (read by latentmas/tasks/loading.py), which needs a
`package_dir` entry beside the discovered packages; pyproject's `packages.find` cannot add one.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["latentmas*", "capture*", "render*"]), "latentmas.sample_data"],
    package_dir={"latentmas.sample_data": "data"},
    package_data={"latentmas.sample_data": ["*.jsonl"], "render.viewer": ["*.js", "*.css", "*.html"]},
)
