"""``kvactors bench``: speed benchmarks, one module per subcommand.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> Report`` and
is registered in :data:`kvactors.cli.BENCHES`. A benchmark prints its figures
beside a baseline measured in the same run (the ratio is what to compare
across machines), and states whether its goals are met.
"""
