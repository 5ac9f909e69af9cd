"""`+mode=sync`: the reconciler that keeps the running Serve app at what a Git branch says
(state machine: state.py; the watched repository: repo.py; compose, apply, drift: reconciler.py)."""
