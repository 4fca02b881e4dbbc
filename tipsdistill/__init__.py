"""tipsdistill: patch-level distillation of vision-language encoders (the TIPSv2 recipe).

The stages are subpackages, each one folder of the repository (setup.cfg ``package_dir``):

- ``tipsdistill.teachers``: frozen teachers behind one interface (TIPS ``.npz``, transformers, timm).
- ``tipsdistill.cache``: stage 1, a teacher's patch / global / caption features cached to HDF5.
- ``tipsdistill.students``: the students (timm models with a text interface) and ``load_student``.
- ``tipsdistill.distill``: stage 2 (training from a cache) and evaluation (``tipsdistill.distill.evaluation``).
- ``tipsdistill.scripts``: the command lines (``tipsdistill-cache``, ``-train``, ``-eval``, ``-export``,
  ``-demo``; or ``python -m tipsdistill.scripts.<name>``).

Importing this package imports none of them (nothing heavy happens on ``import tipsdistill``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tipsdistill")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
