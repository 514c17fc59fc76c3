"""The one compiled part of the package, outLoop's header walk (ioc/_headerwalk.c).

Everything else is declared in pyproject.toml; setuptools takes extension modules
without warnings only from here.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ioc._headerwalk", ["ioc/_headerwalk.c"])])
