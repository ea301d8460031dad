"""User-facing failure families.

Each message names the input that is wrong and the fix; the CLI prints it on one line
and exits with status 2.
"""


class KvantError(Exception):
    """Base of every error a user can cause and mend."""


class ModelError(KvantError):
    """A model folder or id that cannot be used (missing, malformed, unsupported)."""


class DataError(KvantError):
    """A text set that cannot be fetched, verified or read."""


class ArtifactError(KvantError):
    """An output folder that cannot be written (exists, disk full, interrupted)."""


class SettingsError(KvantError, ValueError):
    """A setting outside its valid range or set."""


def run_script(main, name: str) -> None:
    """Run a `python -m kvant.bench.X` script's ``main`` as the CLI runs its commands: bad
    input is one line on stderr and exit status 2."""
    import sys

    try:
        main()
    except KvantError as exc:
        sys.stderr.write(f"{name}: error: {exc}\n")
        sys.exit(2)
