"""Build hook for the optional compiled core (metadata lives in pyproject.toml).

``kvactors._lru_core`` (native/lru_core.c) is the LRU manager's state machine
in C. It is optional: where no C compiler is found the build goes on without
it and kvactors uses the pure-Python manager, which has the same behaviour.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvactors._lru_core",
            sources=["native/lru_core.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
