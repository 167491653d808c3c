"""Build script: the package is pure Python plus the optional compiled extension `ul_fast._C`.

The extension (C++ with OpenMP always, CUDA when nvcc is found) is described in csrc/ and README.md.
"""

from setuptools import setup

setup()
