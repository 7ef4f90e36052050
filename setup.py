"""Builds the one compiled piece: the keyed-mutex and seqlock core (texbridge._synccore)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "texbridge._synccore",
            sources=["src/texbridge/_synccore.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
        )
    ]
)
