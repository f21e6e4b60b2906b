"""One exception family: the CLI maps InputError to exit 1 (per file), BundleError to exit 2."""

from __future__ import annotations

# What to do about a broken bundle: a device has no Makefile, so say what works there first.
REBUILD_BUNDLE = "reinstall or re-copy the bundle (on the build machine: `make convert`)"
# An empty command-line argument: Path('') would be read as '.', the current folder.
EMPTY_PATH = "empty path: name a file or folder"


class CtEdgeError(Exception):
    """Base of every error ct-edge raises on purpose."""


class InputError(CtEdgeError):
    """An input file cannot be classified; other files in a batch still are."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedFormat(InputError):
    """A well-formed file of a kind ct-edge does not read (HTTP 415, not 400)."""


class BundleError(CtEdgeError):
    """The model bundle is missing, unknown, tampered with or unusable."""


def parity_warning(name: str, status: str) -> str | None:
    """The warning for running artifact `name` of parity status `status`; None when it passed.

    Every front end prints it, and `ct-edge results` and listen's reports repeat it (a
    warning, not a refusal: the artifact was chosen by name or as the bundle's default)."""
    if status == "passed":
        return None
    return (f"artifact {name!r} has parity status {status!r}; its answers may differ from the "
            "reference model")


def one_line(exc: BaseException) -> str:
    """An exception as one short line: library messages can span lines or be empty."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
