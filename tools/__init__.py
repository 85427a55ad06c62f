"""Tools that check or prepare rather than measure (benchmarks/ measures):

    python -m tools.sass        # make sass: static SASS instruction budget (sm_90, no GPU)
    python -m tools.gpu_check   # make gpu-check: everything to do on the day a GPU is lent
    tools/compat.sh <torch>     # make compat: install into another torch, run the compat subset
    tools/build_backend.py      # pyproject's PEP 517 backend (setuptools', + a wheel writer)
"""
