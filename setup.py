"""Build hook for the optional compiled cores (metadata lives in pyproject.toml).

``kvactors._manager_core`` (native/manager_core.c and one file per built-in
policy, native/policy_*.c) is the manager's state machine; ``kvactors._io_core``
(native/io_core.c) issues the NVMe store's vectored reads and writes with the
GIL released; ``kvactors._key_checks`` (native/key_checks.c) checks the async
API's keys and slot ids in one pass; ``kvactors._nvme_index``
(native/nvme_index.c) holds the NVMe index's live table in compact arrays. All
are optional: where no C compiler is found the build goes on without them and
kvactors uses its Python code, which behaves the same.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

# The manager core and its policies: a new policy is one more native/policy_*.c
# here and one more entry in POLICY_TABLE (native/manager_core.c).
MANAGER_SOURCES = [
    "native/manager_core.c",
    "native/policy_lru.c",
    "native/policy_arc.c",
    "native/policy_weighted_lru.c",
    "native/policy_prefix_admit.c",
    "native/policy_python.c",
]

setup(
    ext_modules=[
        Extension(
            "kvactors._manager_core",
            sources=MANAGER_SOURCES,
            depends=["native/manager_core.h", "native/key_table.h", "native/index_api.h"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "kvactors._nvme_index",
            sources=["native/nvme_index.c"],
            depends=["native/index_api.h"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "kvactors._io_core",
            sources=["native/io_core.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "kvactors._key_checks",
            sources=["native/key_checks.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
