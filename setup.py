"""Build hook for the optional compiled core (metadata lives in pyproject.toml).

``kvactors._manager_core`` (native/manager_core.c) is the manager's state
machine with the built-in eviction policies, in C. It is optional: where no C compiler is found the build goes on without
it and kvactors uses the pure-Python manager, which has the same behaviour.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvactors._manager_core",
            sources=["native/manager_core.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
