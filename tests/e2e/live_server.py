"""What the end-to-end tests know of the shared live server (`conftest.py` starts it)."""

API_KEY = "e2e-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
