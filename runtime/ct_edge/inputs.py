"""Which files a list of command-line paths names, and their predictions in order.

Shared by `ct-edge classify`, `explain` and `batch` (whose Ray actors run this very code), so
every front end finds and reads files the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import IMAGE_SUFFIXES
from .budget import ByteBudget
from .errors import EMPTY_PATH, CtEdgeError
from .limits import DECODE_BUDGET_BYTES

if TYPE_CHECKING:
    from .classifier import Classifier, Prediction

DECODE_WORKERS = 2  # decode the next file while the engine runs the current one


def display_path(path: str) -> str:
    """A path as valid text for JSON and CSV: bytes that are not UTF-8 (a name from another
    system) as `\\xff`, as `printable` spells them; other characters are left to the format.

    Such names reach Python as lone surrogates, which no UTF-8 stream or JSON parser accepts.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def expand_inputs(args: Iterable[str]) -> list[tuple[str, str | None]]:
    """Command-line paths -> (path, error or None), in order, without duplicates.

    A folder is searched recursively for image files (hidden files and folders skipped); a path
    that does not exist but holds a wildcard is a glob. A folder with no images and a glob that
    matches nothing are input errors. Missing or unreadable files are left to the library, which
    says what is wrong with them.
    """
    import glob

    items: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: str, error: str | None = None) -> None:
        key = os.path.normpath(path) if path else ""  # normpath('') is '.', the current folder
        if key not in seen:
            seen.add(key)
            items.append((path, error))

    def add_folder(folder: str) -> None:
        problems: list[OSError] = []
        found = list(walk_images(folder, problems.append))
        for problem in problems:
            add(problem.filename or folder, f"cannot read folder ({problem.strerror or problem})")
        if not found and not problems:
            add(folder, "folder contains no PNG, JPEG or DICOM images")
        for path in found:
            add(path)

    for arg in args:
        if not arg:
            add(arg, EMPTY_PATH)
        elif os.path.isdir(arg):
            add_folder(arg)
        elif os.path.lexists(arg) or not any(c in arg for c in "*?["):
            add(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                add(arg, "no files match this pattern")
            for match in matches:
                if os.path.isdir(match):
                    add_folder(match)
                else:
                    add(match)
    return items


def walk_images(folder: str, onerror: Any) -> Iterator[str]:
    """Image files below `folder`, sorted, hidden files and folders skipped (`onerror`: os.walk's).

    Links to folders are followed, each folder searched once: a link back up (a loop) or a
    second link to one folder adds nothing.
    """
    searched: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, onerror=onerror, followlinks=True):
        if not first_visit(root, searched):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):  # also skips macOS '._scan.png' resource-fork files
                continue
            path = os.path.join(root, name)
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES or (not suffix and has_dicom_magic(path)):
                yield path


def first_visit(folder: str, searched: set[tuple[int, int]]) -> bool:
    """Whether `folder` (its device and inode) is not in `searched`; adds it."""
    try:
        status = os.stat(folder)
    except OSError:  # gone since os.walk listed it: nothing of it will be found anyway
        return True
    key = (status.st_dev, status.st_ino)
    if key in searched:
        return False
    searched.add(key)
    return True


def has_dicom_magic(path: str) -> bool:
    """DICOM files often have no suffix; their bytes 128..132 say 'DICM'."""
    if not os.path.isfile(path):  # opening a FIFO would block
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def predictions(classifier: Classifier, items: list[tuple[str, str | None]],
                workers: int = DECODE_WORKERS,
                budget: int = DECODE_BUDGET_BYTES) -> Iterator[Prediction]:
    """One Prediction per item, in order; files are decoded a few ahead in a small thread pool.

    Pillow and pydicom's numpy work release the GIL and the engine call is serialised by the
    backend's lock, so decoding the next file overlaps inference on the current one. Files in
    flight together cost at most `budget` bytes by their headers (`decode_cost`); a file over it,
    or one whose header cannot be read, is decoded alone (limits.MEMORY_BOUND_MB).
    """
    if workers <= 1 or len(items) <= 1:
        yield from (classify_one(classifier, path, error) for path, error in items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    room = ByteBudget(budget)
    with ThreadPoolExecutor(workers, thread_name_prefix="ct-edge-decode") as pool:
        pending: deque[Future] = deque()
        for path, error in items:
            cost = item_cost(classifier, path, error, budget)
            room.take(cost)
            future = pool.submit(classify_one, classifier, path, error)
            future.add_done_callback(lambda _, cost=cost: room.give(cost))
            pending.append(future)
            # A bounded look-ahead, so Ctrl-C or a closed pipe waits for a few files, not all.
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def item_cost(classifier: Classifier, path: str, error: str | None, budget: int) -> int:
    """Estimated bytes classifying `path` takes, from its header; `budget` (alone) if unknown."""
    if error is not None:
        return 0
    from .preprocess import decode_cost

    cost = decode_cost(path, classifier.spec)
    return budget if cost is None else min(cost, budget)


def classify_one(classifier: Classifier, path: str, error: str | None) -> Prediction:
    from .classifier import Prediction

    if error is None:
        try:
            # predict_many turns an InputError into a Prediction with `error` set.
            prediction = next(iter(classifier.predict_many([path])))
        except CtEdgeError:
            raise  # a model that cannot run is the bundle's problem (exit 2), not this file's
        except Exception as exc:  # a bug, but one bad file must not stop the batch
            prediction = Prediction(path=path, label=None, probabilities={},
                                    error=f"unexpected {type(exc).__name__}: {exc} "
                                          "(please report this file)")
        prediction.path = path  # as the user wrote it, not normalised by Path()
        if prediction.error is not None:
            prediction.error = " ".join(prediction.error.split())
        return prediction
    return Prediction(path=path, label=None, probabilities={}, error=error)
