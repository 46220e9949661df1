"""The store-and-forward buffer: all SQL (store.py) and what it takes in (intake.py)."""
