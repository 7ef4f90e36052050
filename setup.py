"""Builds the one compiled piece: the futex keyed-mutex core (texbridge._futex)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "texbridge._futex",
            sources=["src/texbridge/_futex.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
        )
    ]
)
