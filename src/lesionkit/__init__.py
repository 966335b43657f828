"""lesionkit: train, evaluate and serve skin-lesion classifiers on dermoscopic images."""

__version__ = "0.1.0"

# HAM10000's seven diagnoses, in the order every model head, report and CSV uses.
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


class LesionkitError(Exception):
    """A problem the user can fix: the message says what to change. The CLI prints it without a traceback."""


def some(names: list[str], most: int = 5) -> str:
    """``names`` for a message: the first ``most`` of them, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
