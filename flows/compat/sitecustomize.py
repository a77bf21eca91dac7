"""Applies flows.fastapi_compat in Python processes started with this folder on PYTHONPATH."""

try:
    from flows.fastapi_compat import apply

    apply()
except Exception:  # never break interpreter start-up
    pass
