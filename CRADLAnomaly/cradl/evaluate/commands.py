"""CLI subcommands of the evaluation package (benchmarks), registered by cradl.cli."""


def register(sub) -> None:
    """Evaluation subcommands are added here as they are built."""
