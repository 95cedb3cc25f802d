"""The one compiled module: sinkhole/dns/_fast.pyx (Cython), the per-packet fast path. Everything else about the
package is in pyproject.toml. Without a C compiler the build goes on without it (optional) and sinkhole runs on
the pure-Python twin, sinkhole/dns/_fastpure.py; tests/dns/test_fast.py then fails unless SINKHOLE_PURE=1 says
that the twin is meant."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = cythonize(
    [Extension("sinkhole.dns._fast", ["sinkhole/dns/_fast.pyx"], extra_compile_args=["-O2"])],
    compiler_directives={"language_level": "3"}, quiet=True)
for extension in extensions:  # cythonize's copies do not keep `optional`: a failed compile must not fail the install
    extension.optional = True

setup(ext_modules=extensions)
