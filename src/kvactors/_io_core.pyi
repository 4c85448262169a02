"""Types of the compiled I/O loop (native/io_core.c); see kvactors.media."""

def vectored(
    write: bool,
    fds: list[int],
    offsets: list[int],
    counts: list[int],
    buffers: list[memoryview],
    faults: list[int] | None = None,
    align: int = 0,
    depth: int = 1,
    /,
) -> list[int]: ...
