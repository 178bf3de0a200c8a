"""Maps the spine's top-level folders into the single `lenpred.*` namespace.

The folders stay where a newcomer looks for them (tap/, proto/, sidecar/, router/, bench/), but
installed code imports as `lenpred.sidecar`, `lenpred.router`, ... so nothing claims generic
top-level module names such as `router` or `proto`.
"""
from setuptools import find_packages, setup

ROOTS = {
    "lenpred": "lenpred",
    "lenpred.tap": "tap",
    "lenpred.proto": "proto",
    "lenpred.sidecar": "sidecar",
    "lenpred.router": "router",
    "lenpred.bench": "bench",
}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS)
