# -- start quickstart --
"""filterhost plugin "nospam": refuse messages an upstream filter marked as spam."""

from filterhost import Transaction, Verdict, hookimpl


@hookimpl
def filterhost_message(transaction: Transaction) -> Verdict | None:
    if (transaction.message.get("X-Spam-Flag") or "").upper() == "YES":
        return Verdict.reject("5.7.1", "Message looks like spam")
    return None  # let the next plugin look at it


# -- end quickstart --
