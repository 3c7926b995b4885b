"""How a dataset hook says that one source file failed.

`download_file`, `read_data` and `read_data_into` raise one of these for a file the source lacks, cannot deliver
or delivers in a form that cannot be read; the framework then marks that file failed for the variables it
carried (NaN there), logs it, counts it in the run's summary, and the run goes on. Any other exception from a hook
is taken for a bug in the dataset's code: the task fails (download and upload tasks are tried again first, in case
the failure was transient), the run stops with its traceback, publishes nothing new and exits non-zero.

Python's own `FileNotFoundError` (what fsspec raises for a missing object) counts as `SourceNotFoundError`.
"""

from __future__ import annotations


class SourceFileError(Exception):
    """One source file failed; the run goes on without it."""


class SourceNotFoundError(SourceFileError, FileNotFoundError):
    """The source has no such file (yet): the normal state of leads not published."""


class SourceUnreadableError(SourceFileError):
    """The file could not be fetched (after retries) or its bytes cannot be read: a malformed inventory, a message
    that does not decode, a body that is an error page."""


class SourceGridError(SourceFileError):
    """The file decodes to another grid than the dataset's template has."""


# What the framework catches from a hook as one failed file.
SOURCE_FILE_FAILURES: tuple[type[Exception], ...] = (SourceFileError, FileNotFoundError)
