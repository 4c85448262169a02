"""Build hook for the optional compiled core (metadata lives in pyproject.toml).

``kvactors._manager_core`` (native/manager_core.c) is the manager's state
machine with the built-in eviction policies, in C; ``kvactors._io_core``
(native/io_core.c) issues the NVMe store's vectored reads and writes with the
GIL released. Both are optional: where no C compiler is found the build goes
on without them and kvactors uses its Python code, which behaves the same.
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
        ),
        Extension(
            "kvactors._io_core",
            sources=["native/io_core.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ]
)
